"""Training checkpoints: atomic on disk, the last K kept, resumable exactly.

A checkpoint is ``OUTPUT_DIR/checkpoints/step_<8 digits>/`` holding accelerate's
state (model, optimizer, scheduler, grad scaler, every process's RNG state), one
``data_state_rank<r>.json`` per process (the loader's position) and
``trainer_state.json`` (step, counters, world size). It is written under a
``.partial`` name and renamed into place only once every process has finished
and ``trainer_state.json`` is on disk, so a kill at any moment, ``kill -9``
included, leaves the previous checkpoint intact and the partial one ignored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from accelerate import Accelerator

from .errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is (or would be)."""
    return checkpoint_dir(output_dir) / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``latest`` (or None if the run has none), a path, or None for ``''``."""
    if not resume:
        if list_checkpoints(output_dir):
            raise UserError(
                f"{checkpoint_dir(output_dir)} already holds checkpoints: set train.resume=latest to continue "
                "that run, or choose another output_dir"
            )
        return None
    if resume == "latest":
        existing = list_checkpoints(output_dir)
        return existing[-1] if existing else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume={resume!r}: not a complete checkpoint ({path / STATE_FILE} is missing)")
    return path


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` on every process (a collective call) and prune old ones."""
    root = checkpoint_dir(output_dir)
    final = step_dir(output_dir, step)
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    _write_json(partial / f"data_state_rank{accelerator.process_index}.json", data_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(partial / STATE_FILE, {**trainer_state, "step": step, "world_size": accelerator.num_processes})
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        partial.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore accelerate's state from ``path``; return the trainer state (with the saving ``world_size``).

    The model, optimizer and scheduler restore exactly whatever the number of processes now; so
    does each process's RNG state where the checkpoint has one for its rank. Whether the data
    position carries over exactly is the loader's decision (:func:`read_data_states`).
    """
    trainer_state = json.loads((path / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    return trainer_state


def read_data_states(path: Path, ranks: Iterable[int]) -> list[dict[str, Any]]:
    """The loader positions the processes ``ranks`` of the saving run wrote into checkpoint ``path``."""
    return [json.loads((path / f"data_state_rank{rank}.json").read_text()) for rank in ranks]
