"""Training checkpoints: atomic and durable on disk, the last K kept, verified and restored exactly at resume.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_<8 digits>/`` holding accelerate's
state (model, optimizer, grad scaler, every process's RNG state), the scheduler's
state (``scheduler.json``), one ``data_state_rank<r>.json`` per process (the
loader's position), ``trainer_state.json`` (step, counters, world size) and, last,
``manifest.json`` (every file's size and SHA-256, :mod:`mmggem.checkpoint.manifest`). It is
written under a ``.partial`` name and renamed into place only once every process
has finished and the manifest is on disk, so a kill at any moment, ``kill -9``
included, leaves the previous checkpoint intact and the partial one ignored.
Before the rename every file of the partial folder (accelerate's, which it does
not fsync, included) and the folder itself are fsynced, and ``checkpoints/``
after it, so a node crash cannot leave ``step_N`` named in place with short
files. A step saved again replaces its folder by renames (the complete one is
never deleted before its successor is in place; a kill between the renames leaves
it under a hidden name, and the next resume puts it back). A write that fails (a full
disk above all) removes the partial folder on the spot; a full disk is reported
as one :class:`CheckpointDiskFull` line naming the filesystem, the bytes needed
and the bytes free.

Which checkpoints are kept: the run's checkpoints form one line of steps. After a
save of step S, the ``keep`` newest checkpoints with a step <= S stay and the
older ones are deleted; the one just written always stays, and none newer than S
is ever deleted by a save. At resume from step R, the checkpoints of this run's
``checkpoints/`` newer than R belong to the line the resume abandons (an older
checkpoint chosen on purpose, or ``latest`` passing over damaged newer ones):
they are moved, never deleted, into ``checkpoints/superseded_from_step_<R>/``
(``_2``, ``_3``... if that exists), which :func:`list_checkpoints` ignores, with
one warning naming them. So the resumed line's saves are pruned among themselves
and ``latest`` finds them, not the abandoned line's newest. A resume from another
run's checkpoint moves nothing in that run's folder.

At resume the main process checks the checkpoint against its manifest; ``latest``
passes over a damaged one to the newest that verifies, with a warning naming it.
Then every file is read without running code from it (:mod:`mmggem.checkpoint.restore`).
"""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..errors import UserError
from ..fileio import (describe_filesystem, flush_to_disk, fsync_dir, fsync_tree, mount_point, recover_replacements,
                      replace_directory)
from .manifest import CheckpointDamaged, verify_manifest, write_manifest
from .restore import (SCHEDULER_FILE, accelerate_view, check_readable, one_line, read_json, restore_rng,
                      restore_scheduler)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """The folder of a run's checkpoints, ``OUTPUT_DIR/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is (or would be)."""
    return checkpoint_dir(output_dir) / f"step_{step:08d}"


def _step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``step_N`` folder of a run's ``checkpoints/``, complete or not, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), key=lambda p: p.name)


def _step_of(folder: Path) -> int:
    """The step a ``step_N`` folder's name gives."""
    return int(_NAME.match(folder.name)[1])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in _step_folders(output_dir) if (p / STATE_FILE).is_file()]


def unverified_message(path: Path) -> str:
    """The one warning for a checkpoint without a manifest: at resume, evaluation and export alike."""
    return f"{path} has no manifest.json (written before mmggem verified checkpoints): its files are not checked"


def _choose(output_dir: str | Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint ``resume`` names, verified, and the warnings to print about the choice."""
    if not resume:
        if list_checkpoints(output_dir):
            raise UserError(
                f"{checkpoint_dir(output_dir)} already holds checkpoints: set train.resume=latest to continue "
                "that run, or choose another output_dir"
            )
        return None, []
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"train.resume={resume!r}: not a complete checkpoint ({path / STATE_FILE} is missing)")
        return path, [] if verify_manifest(path) else [unverified_message(path)]
    existing, damaged = list_checkpoints(output_dir), []
    for candidate in reversed(existing):
        try:
            verified = verify_manifest(candidate)
        except CheckpointDamaged as damage:
            damaged.append(damage)
            continue
        skipped = [f"skipping a damaged checkpoint ({damage}); resuming from {candidate.name}" for damage in damaged]
        return candidate, skipped + ([] if verified else [unverified_message(candidate)])
    if existing:
        raise CheckpointDamaged(f"train.resume=latest: no checkpoint in {checkpoint_dir(output_dir)} verifies; "
                                f"the newest: {damaged[0]}")
    return None, []


def resolve_resume(accelerator: Accelerator, output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from (collective): ``latest`` (None if the run has none), a path, or None for ``''``.

    The main process first puts back a checkpoint a kill left hidden (:func:`_recover_interrupted_saves`),
    verifies the chosen one against its manifest (hashing each file once, not once per process),
    moves this run's checkpoints newer than it aside (:func:`_set_aside_newer`), prints a warning for
    each checkpoint passed over or moved and shares the choice, or the error, with all.
    """
    shared: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            warnings = _recover_interrupted_saves(output_dir)
            path, more = _choose(output_dir, resume)
            warnings += more
            if path is not None:
                warnings += _set_aside_newer(output_dir, path)
            for warning in warnings:
                print(f"WARNING: {warning}", flush=True)
            shared = [("ok", str(path) if path else None)]
        except UserError as error:
            shared = [("error", str(error))]
    kind, value = broadcast_object_list(shared)[0]
    if kind == "error":
        raise UserError(value)
    return Path(value) if value else None


def _recover_interrupted_saves(output_dir: str | Path) -> list[str]:
    """Put back a checkpoint that a kill left hidden while the same step was saved again (the warnings)."""
    root = checkpoint_dir(output_dir)
    return recover_replacements(root) if root.is_dir() else []


def _saved_step(checkpoint: Path) -> int:
    """The step ``checkpoint``'s trainer state records (its folder may have any name)."""
    step = read_json(checkpoint / STATE_FILE).get("step")
    if not isinstance(step, int):
        raise CheckpointDamaged(f"{checkpoint / STATE_FILE}: 'step' is {step!r}, not a step number")
    return step


def _free_name(wanted: Path) -> Path:
    """``wanted``, or ``wanted_2``, ``wanted_3``... the first that does not exist."""
    candidate, number = wanted, 1
    while candidate.exists():
        number += 1
        candidate = wanted.with_name(f"{wanted.name}_{number}")
    return candidate


def _set_aside_newer(output_dir: str | Path, resumed: Path) -> list[str]:
    """Move this run's checkpoints newer than ``resumed`` into ``checkpoints/superseded_from_step_<R>/``
    (durably; nothing is deleted); the warning saying so, if any moved.

    They belong to the line the resume abandons: left in place, a save of the resumed line would be
    pruned as older than they, and ``latest`` would go back to them.
    """
    step = _saved_step(resumed)
    newer = [p for p in _step_folders(output_dir) if _step_of(p) > step]
    if not newer:
        return []
    root = checkpoint_dir(output_dir)
    aside = _free_name(root / f"superseded_from_step_{step:08d}")
    try:
        aside.mkdir()
        for path in newer:
            path.rename(aside / path.name)
        fsync_dir(aside)
        fsync_dir(root)
    except OSError as error:  # a UserError, so every process learns it (resolve_resume)
        raise UserError(f"resuming from {resumed} (step {step}): could not move the newer checkpoints of {root} "
                        f"aside into {aside} ({one_line(error)}); move {', '.join(p.name for p in newer)} out of "
                        f"{root} by hand, then resume again") from None
    return [f"resuming from {resumed} (step {step}), so the newer checkpoints of {root} belong to the line it "
            f"abandons: moved {', '.join(p.name for p in newer)} to {aside} (kept, not deleted), so that saves of "
            "the resumed line are not pruned in their favour and train.resume=latest does not go back to them"]


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        flush_to_disk(handle)


def _prune(output_dir: str | Path, step: int, keep: int) -> None:
    """Delete the checkpoints of the line ending at ``step`` older than its ``keep`` newest; none newer
    than ``step`` (so never the one just written)."""
    line = [p for p in list_checkpoints(output_dir) if _step_of(p) <= step]
    for old in line[:-keep]:
        shutil.rmtree(old)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` on every process (a collective call) and prune old ones
    (the ``keep`` newest with a step <= ``step`` stay).

    A write that fails on any process fails on all of them, after the same exchanges (none waits
    in a barrier another left): the partial folder is removed, the earlier checkpoints stay, and
    a full disk raises :class:`CheckpointDiskFull` naming the filesystem and the bytes.
    """
    root = checkpoint_dir(output_dir)
    final = step_dir(output_dir, step)
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()

    def own_files() -> None:  # every process: its share of accelerate's state and its loader position
        accelerator.save_state(str(partial))
        _write_json(partial / f"data_state_rank{accelerator.process_index}.json", data_state)
        if accelerator.is_main_process:
            _write_json(partial / SCHEDULER_FILE, scheduler_state)
            _write_json(partial / STATE_FILE, {**trainer_state, "step": step, "world_size": accelerator.num_processes})

    def complete() -> None:  # the main process, once every process's files are written
        write_manifest(partial)  # last: it lists every process's files
        fsync_tree(partial)  # accelerate's files too: on disk before the name says the checkpoint is there
        replace_directory(partial, final)  # then checkpoints/ fsynced; the same step saved again is swapped
        _prune(output_dir, step, keep)  # only once the new checkpoint is durable

    _all_or_none(accelerator, own_files, final, partial)
    _all_or_none(accelerator, complete if accelerator.is_main_process else lambda: None, final, partial)
    return final


class CheckpointDiskFull(Exception):
    """A checkpoint did not fit on its filesystem; its partial folder is gone, the earlier checkpoints stay."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 16 * 2**20
"""Free bytes below which a failed write counts as a full disk: torch's own writer reports ENOSPC
only as ``basic_ios::clear: iostream error``."""


def _failure(error: BaseException, folder: Path) -> tuple[bool, int, str]:
    """(whether ``error`` is a full disk, the free bytes now, the error in one line)."""
    free = shutil.disk_usage(mount_point(folder)).free
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True, free, one_line(error)
        cause = cause.__cause__ or cause.__context__
    return free < NEARLY_FULL_BYTES, free, one_line(error)


def _all_or_none(accelerator: Accelerator, write: Callable[[], None], final: Path, partial: Path) -> None:
    """Run this process's ``write``, then learn every process's outcome (collective); on any failure remove
    ``partial`` and raise on every process."""
    try:
        write()
        mine = None
    except Exception as error:  # judged below, together with the other processes' outcomes
        mine, raised = _failure(error, partial), error
    failures = [(rank, f) for rank, f in enumerate(gather_object([mine])) if f is not None]
    if not failures:
        return
    written = _folder_bytes(partial) if accelerator.is_main_process else 0  # the main process tells the user
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    rank, (disk_full, free, description) = failures[0]
    if disk_full:
        raise CheckpointDiskFull(_disk_full_message(final, partial, written, free)) from None
    message = f"writing checkpoint {final} failed on rank {rank}: {description}; the partial folder was removed"
    if mine is not None:
        raise RuntimeError(message) from raised
    raise RuntimeError(message)


def _disk_full_message(final: Path, partial: Path, written: int, free: int) -> str:
    previous = list_checkpoints(final.parent.parent)
    if previous:
        need = f"needs about {_size(_folder_bytes(previous[-1]))} (the size of {previous[-1].name})"
    else:
        need = f"needs more than the {_size(written)} written before the disk filled"
    kept = f"the earlier checkpoints are intact (latest: {previous[-1].name})" if previous else "no earlier checkpoint"
    return (f"disk full while writing checkpoint {final} on {describe_filesystem(final.parent)}: it {need}, "
            f"{_size(free)} ({free} bytes) were free; removed {partial.name}; {kept}. Free space, then resume "
            "with train.resume=latest")


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def load_checkpoint(accelerator: Accelerator, path: Path, scheduler: Any) -> dict[str, Any]:
    """Restore accelerate's state and ``scheduler`` from ``path``; return the trainer state (with the
    saving ``world_size``).

    The model, optimizer and scheduler restore exactly whatever the number of processes now; so
    does each process's RNG state where the checkpoint has one for its rank. Whether the data
    position carries over exactly is the loader's decision (:func:`read_data_states`). A file
    that cannot be read is a :class:`CheckpointDamaged` naming it.
    """
    trainer_state = read_json(path / STATE_FILE)
    missing = sorted({"step", "world_size"} - trainer_state.keys())
    if missing:
        raise CheckpointDamaged(f"{path / STATE_FILE}: lacks {', '.join(missing)}")
    check_readable(path)
    restore_scheduler(scheduler, path)
    try:
        with accelerate_view(path) as folder:
            accelerator.load_state(str(folder))
    except Exception as error:  # what the checks above cannot see: weights of another model, a bad shard
        raise CheckpointDamaged(f"{path}: accelerate could not restore it ({one_line(error)})") from None
    if accelerator.process_index < trainer_state["world_size"]:  # a process the saving run did not have keeps its seed
        restore_rng(path, accelerator.process_index)
    return trainer_state


def read_data_states(path: Path, ranks: Iterable[int]) -> list[dict[str, Any]]:
    """The loader positions the processes ``ranks`` of the saving run wrote into checkpoint ``path``."""
    return [read_json(path / f"data_state_rank{rank}.json") for rank in ranks]
