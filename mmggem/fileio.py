"""Writing files and folders so that a reader never sees a half-written one.

Everything is written under a hidden staging name beside its target and renamed
into place only when complete (a rename within one folder is atomic), so a
crash or kill leaves either the old content or the new, never a mix. It is also
durable: the staged files and folders are fsynced before the rename, and the
parent folder after it, so that after a power loss or node crash the name never
points at files the disk has not yet received (a rename is journaled ahead of
unsynced data on common filesystems).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from .errors import OutputExistsError


def _current_umask() -> int:
    """The process's umask (read by setting it and putting it back: once, at import, before any thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` when the block finishes without error.

    Refuses a non-empty ``out`` unless ``overwrite``; the old content is removed only after the
    new directory is in place. On error the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} is not empty; choose an empty or new directory, or overwrite (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's is 0700: give the folder mkdir's permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_tree(tmp)
    replace_directory(tmp, out)


_REPLACED = ".old-"
_REPLACED_NAME = re.compile(rf"^\.(?P<target>.+){re.escape(_REPLACED)}[0-9a-f]{{8}}$")


def replace_directory(staged: Path, target: Path) -> None:
    """Put the complete folder ``staged`` at ``target`` (a sibling), replacing any folder there, durably.

    By renames only: the old ``target`` moves to a hidden ``.NAME.old-XXXXXXXX`` beside it, ``staged``
    takes its name, the parent folder is fsynced, and only then is the old one removed. The old
    content is never deleted before the new is in place: a kill between the two renames leaves it
    whole under the hidden name (:func:`recover_replacements` puts it back). ``staged``'s own files must
    already be on disk (:func:`fsync_tree`).
    """
    old = target.with_name(f".{target.name}{_REPLACED}{uuid.uuid4().hex[:8]}") if target.exists() else None
    if old is not None:
        target.rename(old)
    staged.rename(target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)


def recover_replacements(parent: Path) -> list[str]:
    """Finish the :func:`replace_directory` calls in ``parent`` that a kill cut short; what was done, in words.

    A hidden ``.NAME.old-XXXXXXXX`` left behind is renamed back to ``NAME`` if the kill came between
    the two renames (``NAME`` is missing: the old folder is the complete one), or removed if it came
    after them (``NAME`` is the new folder, complete).
    """
    done = []
    for old in sorted(parent.iterdir()):
        found = _REPLACED_NAME.match(old.name)
        if found is None or not old.is_dir():
            continue
        target = parent / found["target"]
        if target.exists():
            shutil.rmtree(old)
            done.append(f"removed {old}, the old copy of {target} that a kill left after replacing it")
        else:
            old.rename(target)
            done.append(f"restored {target} from {old}, where a kill left it while replacing it")
    if done:
        fsync_dir(parent)
    return done


def fsync_dir(folder: Path) -> None:
    """Make ``folder``'s entries (names created, renamed or removed in it) durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Make every file under ``folder`` durable, then every folder's entries, ``folder``'s own last.

    What a writer that does not fsync (torch.save, safetensors, accelerate) left in the page cache
    reaches the disk before ``folder`` is renamed into place.
    """
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        else:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for each in reversed(folders):  # the deepest first, ``folder`` last
        fsync_dir(each)


def flush_to_disk(handle: IO) -> None:
    """Flush ``handle``'s buffer and fsync its file: the content is on disk when this returns."""
    handle.flush()
    os.fsync(handle.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _mode_for(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the file's own if it exists, else the umask's default.

    A temporary file is created readable by its owner only, so without this every file written atomically
    (a run's config, the ablation's tables) would be hidden from the rest of a team sharing the folder.
    """
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file fsynced and renamed into place, then fsync
    the folder (the new name is durable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            flush_to_disk(f)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem ``path`` (or its nearest existing parent) is on."""
    current = Path(os.path.abspath(path))
    while not current.exists():
        current = current.parent
    while not os.path.ismount(current):
        current = current.parent
    return current


def describe_filesystem(path: str | os.PathLike) -> str:
    """``path``'s filesystem as one names it: its mount point, with the device and type where /proc/mounts says."""
    mount, found = mount_point(path), None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:  # the last entry of a mount point is the one on top
                device, point, kind = line.split()[:3]
                if Path(point.replace("\\040", " ")) == mount:
                    found = f"{mount} ({kind} on {device})"
    except OSError:
        pass
    return found or str(mount)
