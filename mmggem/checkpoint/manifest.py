"""A checkpoint's manifest: every file with its size and SHA-256, so damage is found before a resume.

The manifest is the last file written into a checkpoint, after every process has
written its own files and before the folder is renamed into place. At resume the
folder must hold exactly the files it lists, with those sizes and hashes; a file
cut short, overwritten, missing, added or copied from another checkpoint is named
in one line. A full hash rather than a sample of each file: it also catches damage
in the middle of a large file, and costs a few seconds for a ViT-B/16-size
checkpoint (1.8 GB; measured in docs/benchmarks.md, "Checkpoint manifest"). The
files are hashed on threads, since hashlib releases the GIL while it hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError

MANIFEST = "manifest.json"
_FORMAT = 1


class CheckpointDamaged(UserError):
    """A checkpoint's files do not match its manifest, or one of them cannot be read."""


def _sha256(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        raise CheckpointDamaged(f"{path}: cannot be read ({type(error).__name__}: {error.strerror})") from None


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file, several at a time."""
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(folder / name), names)))


def write_manifest(folder: Path) -> None:
    """List every file of ``folder`` with its size and SHA-256 in ``folder/manifest.json`` (fsynced)."""
    names = _files(folder)
    digests = _hash_all(folder, names)
    files = {name: {"size": (folder / name).stat().st_size, "sha256": digests[name]} for name in names}
    with open(folder / MANIFEST, "w") as handle:
        json.dump({"format": _FORMAT, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def verify_manifest(folder: Path) -> bool:
    """Check ``folder`` against its manifest: True when it matches, False when it has none (written
    before manifests existed); raises :class:`CheckpointDamaged` naming the first file that differs."""
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        listed = json.loads(path.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointDamaged(f"{path}: not a readable manifest ({type(error).__name__}: {error})") from None
    present = set(_files(folder))
    missing, added = sorted(expected.keys() - present), sorted(present - expected.keys())
    if missing:
        raise CheckpointDamaged(f"{folder / missing[0]}: missing (the manifest lists it)")
    if added:
        raise CheckpointDamaged(f"{folder / added[0]}: not in the checkpoint's manifest (added after it was written)")
    for name, (size, _) in expected.items():
        actual = (folder / name).stat().st_size
        if actual != size:
            raise CheckpointDamaged(f"{folder / name}: {actual} bytes, the manifest says {size} "
                                    "(cut short or replaced)")
    for name, digest in _hash_all(folder, sorted(expected)).items():
        if digest != expected[name][1]:
            raise CheckpointDamaged(f"{folder / name}: content differs from the manifest (SHA-256 {digest[:12]}..., "
                                    f"expected {expected[name][1][:12]}...): changed after it was written")
    return True
