"""When a run stops early: a chosen step, a wall-clock budget, or a signal.

SLURM sends SIGUSR1 ahead of a time limit (``--signal=USR1@120``) and SIGTERM on
preemption; users press Ctrl-C (SIGINT). The handlers only raise a flag: the
step in flight finishes, then every process agrees through one all-reduce, so a
signal that reached a single rank still stops all of them at the same step and
none waits on another. A second signal while the checkpoint is written only
raises the flag again and cannot interrupt the save.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
from accelerate import Accelerator

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal or train.time_limit; resume with train.resume=latest
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopControl:
    """Decides, identically on every process, whether training stops after a step."""

    def __init__(self, stop_at_step: int | None, time_limit_s: float | None) -> None:
        self.stop_at_step = stop_at_step
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.signal_name: str | None = None

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """Catch the stop signals inside the block, then restore the previous handlers (main thread only)."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def check(self, step: int, accelerator: Accelerator) -> str | None:
        """The reason to stop after ``step`` (``"stop_at_step"``, ``"time_limit"``, ``"signal"``) or None.

        Collective: every process must call it after every step.
        """
        local = 0
        if self.signal_name is not None:
            local = 3
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 2
        flag = torch.tensor([local], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="max")
        code = int(flag.item())
        if code == 0 and self.stop_at_step is not None and step >= self.stop_at_step:
            return "stop_at_step"
        return {0: None, 2: "time_limit", 3: "signal"}[code]
