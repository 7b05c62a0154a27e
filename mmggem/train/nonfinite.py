"""Skipping optimizer steps whose gradients are not finite, decided on the device.

Reading a device value (``.item()``, ``bool(t)``) makes the host wait until the
device has run everything queued so far; doing so between forward and backward
of every step, as a finite-loss check does, keeps the host from queueing work
ahead. The decision here needs no read:

- The gradient norm that clipping computes after backward is the same on every
  process (DDP has averaged the gradients; under FSDP the norm is reduced over
  all shards), and a non-finite loss or activation gives a non-finite norm.
- Fused AdamW takes a ``found_inf`` tensor and skips the update (parameters,
  moments and step count) on the device when it is 1, as it does for AMP's
  grad scaler.
- The counters live on the device and are read only where the trainer reads
  values anyway: at log and checkpoint steps.

With fp16, accelerate's loss scaler skips the steps whose scaled gradients
overflow (it sets ``found_inf`` itself) and halves its scale; such overflows
are routine while the scale falls from 2^16 in the first steps. They are counted
apart, as ``scaler_skips``, and never toward divergence: a non-finite step is
the scaler's when the loss was finite on every process and the scale was above
1 (so the gradients were scaled up). A non-finite loss, or gradients that stay
non-finite once the scale is down to 1, count as non-finite steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from .fsdp import full_tensor

__all__ = ["NonFiniteCounts", "NonFiniteSteps", "optimizer_step"]


@dataclass(frozen=True)
class NonFiniteCounts:
    """Host copies of the counters, as of one read."""

    total: int  # non-finite steps in the whole run
    in_a_row: int  # the current streak (0 after a finite step)
    longest_streak: int  # the longest streak since the previous read (or the resumed one)
    last_step: int  # the last non-finite step (0: none)
    scaler_skips: int = 0  # steps the fp16 loss scaler skipped for overflow (not counted above)


class NonFiniteSteps:
    """Device-side count of non-finite steps; :meth:`update` gives the ``found_inf`` flag of a step."""

    def __init__(self, device: torch.device | str, total: int = 0, in_a_row: int = 0, scaler_skips: int = 0) -> None:
        def counter(value: int) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.int64, device=device)

        self.total, self.in_a_row = counter(total), counter(in_a_row)
        self.longest_streak, self.last_step = counter(in_a_row), counter(0)
        self.scaler_skips = counter(scaler_skips)

    def update(self, grad_norm: torch.Tensor, step: int, scaler_may_skip: torch.Tensor | None = None) -> torch.Tensor:
        """Count ``step`` by its (whole, plain-tensor) gradient norm; return ``found_inf`` (float32 0 or 1).

        ``scaler_may_skip`` (a bool tensor, fp16 only) says whether an overflow of this step is the
        loss scaler's: a non-finite step is then a scaler skip, not a non-finite step.
        """
        nonfinite = ~torch.isfinite(grad_norm)
        bad = nonfinite
        if scaler_may_skip is not None:
            skipped = nonfinite & scaler_may_skip
            self.scaler_skips += skipped
            bad = nonfinite & ~skipped
        self.total += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest_streak = torch.maximum(self.longest_streak, self.in_a_row)
        self.last_step.masked_fill_(bad, step)
        return nonfinite.to(torch.float32)

    def read(self) -> NonFiniteCounts:
        """Copy the counters to the host (this waits for the device) and start a new longest-streak window."""
        total, in_a_row, longest, last, skips = torch.stack(
            [self.total, self.in_a_row, self.longest_streak, self.last_step, self.scaler_skips]).tolist()
        self.longest_streak = self.in_a_row.clone()
        return NonFiniteCounts(total, in_a_row, longest, last, skips)


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   nonfinite: NonFiniteSteps, grad_clip: float | None, step: int, loss: torch.Tensor) -> torch.Tensor:
    """Clip, then update unless the gradient norm is non-finite (skipped on the device); returns the norm.

    The norm is always computed (with ``grad_clip`` unset, clipping at infinity changes nothing)
    because it is what decides, identically on every process, whether the step is skipped. With
    fp16, accelerate unscales the gradients before clipping and its scaler gives fused AdamW the
    ``found_inf`` flag; ``loss`` (this process's, detached) then tells an overflow of the scaler
    from a non-finite loss, at the cost of one 1-element all-reduce per step (no host read).
    """
    grad_norm = full_tensor(accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)).detach()
    scaler = accelerator.scaler
    if scaler is None:
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
        torch_optimizer.found_inf = nonfinite.update(grad_norm, step)  # read by fused AdamW: 1 skips the update
    else:
        finite_losses = accelerator.reduce(torch.isfinite(loss.detach()).to(torch.float32).reshape(1), "sum")
        # the scale this step's gradients were multiplied by (a device tensor: GradScaler.step reads it the same way)
        scale = scaler._get_scale_async()
        nonfinite.update(grad_norm, step, (finite_losses == accelerator.num_processes).squeeze(0) & (scale > 1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
