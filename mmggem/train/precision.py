"""Which mixed precision a run trains in: the launcher's, unless the run config says otherwise.

accelerate owns mixed precision. ``accelerate launch`` passes the choice of its config file
(``mixed_precision: bf16``) or of ``--mixed_precision`` to the processes as the
``ACCELERATE_MIXED_PRECISION`` variable, which ``Accelerator(mixed_precision=None)`` reads; an
argument given to ``Accelerator`` wins over it. So:

- ``train.precision`` unset (the default) passes None: the launcher decides, and without one
  (plain ``python``/``mmggem``, the variable unset) accelerate trains in fp32.
- ``train.precision`` set wins, as accelerate's own argument does; when the launcher named
  another precision, one printed line names both (:func:`resolve_precision`).

fp16 needs accelerate's loss scaler, which it creates only for GPU-like devices; without one
fp16 would silently be fp32 (no autocast on CPU), so :func:`check_precision` refuses it.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from accelerate import Accelerator

from ..errors import UserError

__all__ = ["LAUNCHER_VARIABLE", "check_precision", "configure_matmul_precision", "describe_precision",
           "effective_precision", "precision_line", "resolve_precision"]

LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` sets from its config or flag


def resolve_precision(configured: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """``(argument for Accelerator, note)``: ``configured`` as is (None lets accelerate read the
    launcher's choice), and a one-line note when the launcher asked for something else."""
    launcher = environ.get(LAUNCHER_VARIABLE, "").lower() or None
    if configured is None or launcher is None or launcher == configured:
        return configured, None
    return configured, (f"precision: train.precision={configured} wins over the launcher's {launcher} "
                        f"({LAUNCHER_VARIABLE}, from the accelerate config file or --mixed_precision); "
                        f"unset train.precision to follow the launcher")


def describe_precision(accelerator: Accelerator, configured: str | None) -> str:
    """The line printed at start: the precision in effect and who chose it."""
    return precision_line(accelerator.mixed_precision, configured)


def effective_precision(configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The precision ``Accelerator(mixed_precision=configured)`` would train in, without building one
    (what ``mmggem train --dry-run`` reports): ``configured``, else the launcher's, else ``no``."""
    return configured or environ.get(LAUNCHER_VARIABLE, "").lower() or "no"


def precision_line(effective: str, configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """One line: the precision ``effective`` and who chose it (``train.precision``, the launcher or the default)."""
    source = "train.precision" if configured is not None else (
        "the launcher" if environ.get(LAUNCHER_VARIABLE) else "the default")
    what = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a loss scaler"}
    return f"precision: {effective} ({what.get(effective, effective)}; set by {source})"


def check_precision(accelerator: Accelerator, fsdp: bool) -> None:
    """Refuse a precision this trainer cannot run as asked (fp16 without accelerate's loss scaler,
    or under FSDP, where it is unproven)."""
    if accelerator.mixed_precision != "fp16":
        return
    if accelerator.scaler is None:
        raise UserError(f"precision fp16: accelerate has no fp16 autocast or loss scaler on device "
                        f"{accelerator.device.type!r} (it would train in fp32); use bf16 or no")
    if fsdp:
        raise UserError("precision fp16 under FSDP is not supported (the loss scaler of a sharded model is "
                        "untested here); use bf16")


def configure_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 matmuls on CUDA when ``tf32`` (open_clip does the same); full fp32 otherwise."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
