"""Writing files and folders so that a reader never sees a half-written one.

Everything is written under a hidden staging name beside its target and renamed
into place only when complete (a rename within one folder is atomic), so a
crash or kill leaves either the old content or the new, never a mix.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


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
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


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
