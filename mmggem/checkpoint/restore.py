"""Reading a checkpoint's files without running code from them, each failure named by its file.

accelerate restores the model, optimizer and scaler; what it would do silently or
unsafely mmggem does itself: the scheduler's state is JSON (accelerate unpickles a
registered object with ``weights_only=False``), and the RNG state is restored here
too, since accelerate logs a failure to restore it at info level and carries on,
which would make an "exact" resume inexact without a word. Every torch file is
loaded with ``weights_only=True`` and only the globals accelerate allows for its RNG
state (numpy arrays), so a pickle carrying code is refused, never run.
"""
from __future__ import annotations

import json
import pickle
import random
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import RNG_STATE_NAME
from accelerate.utils import load as accelerate_load
from safetensors import safe_open

from .manifest import CheckpointDamaged

SCHEDULER_FILE = "scheduler.json"
# Checkpoints written before the scheduler was stored as JSON: accelerate's pickle of its state dict,
# which holds plain numbers only and so loads with weights_only=True.
LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"
_TORCH_SUFFIXES = (".bin", ".pt", ".pkl")


def one_line(error: BaseException) -> str:
    """``error`` as one line for a message: its type and first non-empty line (for torch's refused
    unpickling, just the global it refused, without the long advice after it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refusal = [line.split(" was not an allowed global")[0] for line in lines if "Unsupported global" in line]
    return f"{type(error).__name__}: {(refusal or lines or [''])[0]}"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`CheckpointDamaged` naming it when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointDamaged(f"{path}: not readable JSON ({one_line(error)})") from None
    if not isinstance(data, dict):
        raise CheckpointDamaged(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def load_torch_file(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and accelerate's allowed globals; one-line errors."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise CheckpointDamaged(f"{path}: cut short or not a torch file (torch.save writes a zip archive, "
                                "this is not one)")
    try:
        return accelerate_load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path}: missing") from None
    except pickle.UnpicklingError as error:
        raise CheckpointDamaged(f"{path}: refused: it holds objects other than tensors and plain data, which "
                                f"mmggem does not unpickle ({one_line(error)})") from None
    except Exception as error:  # torch raises RuntimeError, OSError, ValueError, ... for a damaged zip
        raise CheckpointDamaged(f"{path}: cannot be read as a torch file ({one_line(error)})") from None


def check_readable(folder: Path) -> None:
    """Open every JSON, safetensors and torch file at the top of ``folder`` (headers only, memory-mapped)
    so that a damaged one is named before accelerate reads it; sharded folders are left to torch."""
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt") as handle:
                    handle.keys()
            except Exception as error:
                raise CheckpointDamaged(f"{path}: not a readable safetensors file ({one_line(error)})") from None
        elif path.suffix in _TORCH_SUFFIXES:
            load_torch_file(path, mmap=True)


def restore_scheduler(scheduler: Any, folder: Path) -> None:
    """Put the learning-rate scheduler at the position saved in ``scheduler.json`` (or an older checkpoint's
    pickle).

    The schedule itself follows the current config (the trainer's scheduler restores its position
    only, :class:`mmggem.train.optim.WarmupCosineLR`); each of the saved schedule's settings that
    differs from it (a longer ``train.steps``, another ``train.lr``) is named in one line, old -> new.
    """
    path = folder / SCHEDULER_FILE
    if path.is_file() or not (folder / LEGACY_SCHEDULER_FILE).is_file():
        state = read_json(path)
    else:
        path = folder / LEGACY_SCHEDULER_FILE
        state = load_torch_file(path)
    try:
        changed = _schedule_changes(scheduler.state_dict(), state)
        scheduler.load_state_dict(state)
    except Exception as error:
        raise CheckpointDamaged(f"{path}: not a learning-rate scheduler state ({one_line(error)})") from None
    if changed:
        PartialState().print(f"the schedule follows the config: {', '.join(changed)}")


def _schedule_changes(current: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Each setting of a saved ``LambdaLR`` state that differs from the current one's, as ``"name old -> new"``:
    the fields its factor object saves (``total_steps``: "total steps") and its base learning rates."""
    def fields(state: dict[str, Any]) -> dict[str, Any]:
        first = (state.get("lr_lambdas") or [None])[0]
        return first if isinstance(first, dict) else {}

    now, then = fields(current), fields(saved)
    found = [f"{name.replace('_', ' ')} {then[name]} -> {value}" for name, value in now.items()
             if name in then and then[name] != value]
    if "base_lrs" in saved and list(saved["base_lrs"]) != list(current["base_lrs"]):
        rates = lambda values: ", ".join(f"{value:g}" for value in values)  # noqa: E731
        found.append(f"learning rates {rates(saved['base_lrs'])} -> {rates(current['base_lrs'])}")
    return found


def restore_rng(folder: Path, rank: int) -> None:
    """Set Python's, numpy's, torch's and CUDA's RNG to this rank's state in ``folder``; an error if it fails."""
    path = folder / f"{RNG_STATE_NAME}_{rank}.pkl"
    states = load_torch_file(path)
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"][:torch.cuda.device_count()])
    except Exception as error:
        raise CheckpointDamaged(f"{path}: not an RNG state that can be restored ({one_line(error)})") from None


@contextmanager
def accelerate_view(folder: Path) -> Iterator[Path]:
    """``folder`` as ``Accelerator.load_state`` should see it: without ``custom_checkpoint_*.pkl``.

    Older checkpoints hold the scheduler as accelerate's custom pickle, which ``load_state`` would
    unpickle with ``weights_only=False`` (and refuse to skip); for those, a temporary folder of links
    to every other file stands in for ``folder``.
    """
    pickles = set(folder.glob("custom_checkpoint_*.pkl"))
    if not pickles:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mmggem-resume-") as view:
        for entry in folder.iterdir():
            if entry not in pickles:
                (Path(view) / entry.name).symlink_to(entry.resolve())
        yield Path(view)
