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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NonFiniteCounts", "NonFiniteSteps"]


@dataclass(frozen=True)
class NonFiniteCounts:
    """Host copies of the counters, as of one read."""

    total: int  # non-finite steps in the whole run
    in_a_row: int  # the current streak (0 after a finite step)
    longest_streak: int  # the longest streak since the previous read (or the resumed one)
    last_step: int  # the last non-finite step (0: none)


class NonFiniteSteps:
    """Device-side count of non-finite steps; :meth:`update` gives the ``found_inf`` flag of a step."""

    def __init__(self, device: torch.device | str, total: int = 0, in_a_row: int = 0) -> None:
        def counter(value: int) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.int64, device=device)

        self.total, self.in_a_row = counter(total), counter(in_a_row)
        self.longest_streak, self.last_step = counter(in_a_row), counter(0)

    def update(self, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """Count ``step`` by its (whole, plain-tensor) gradient norm; return ``found_inf`` (float32 0 or 1)."""
        bad = ~torch.isfinite(grad_norm)
        self.total += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest_streak = torch.maximum(self.longest_streak, self.in_a_row)
        self.last_step.masked_fill_(bad, step)
        return bad.to(torch.float32)

    def read(self) -> NonFiniteCounts:
        """Copy the counters to the host (this waits for the device) and start a new longest-streak window."""
        total, in_a_row, longest, last = torch.stack(
            [self.total, self.in_a_row, self.longest_streak, self.last_step]).tolist()
        self.longest_streak = self.in_a_row.clone()
        return NonFiniteCounts(total, in_a_row, longest, last)
