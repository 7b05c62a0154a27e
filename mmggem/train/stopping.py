"""When a run stops early: a chosen step, a wall-clock budget, or a signal.

SLURM sends SIGUSR1 ahead of a time limit (``--signal=USR1@120``) and SIGTERM on
preemption; users press Ctrl-C (SIGINT). The handlers only raise a flag. The
processes must agree on the step to stop at, or one would wait forever in a
collective the others never join; but a blocking all-reduce and a read of its
result after every step would stall the host each step. So the agreement is
read one step late: after step ``s`` every process starts an asynchronous
all-reduce (MAX) of its flag, and after step ``s + 1`` it reads the result.
Every process reads the same value after the same step, so a signal that
reached one rank stops all of them after the same step, at most two steps after
it arrived.

The flag travels over a gloo group on a buffer that lives in host memory: no
device value is read, and with NCCL training the exchange never waits for the
GPU. A second signal while the checkpoint is written only raises the flag again
and cannot interrupt the save. ``train.stop_at_step`` needs no exchange: every
process knows the step.

A cluster signals every process of the job, the DataLoader's workers too; they do not act on
it (:mod:`mmggem.data.watch`), so the main process still reaches its stop check. A single
process that is waiting for a batch when the signal comes (a stalled shard) stops at once: the
handler raises :class:`StopRequested` out of the wait, and the run checkpoints the last
completed step. With several processes the others may already be inside the next step's
collectives, so a waiting rank keeps waiting and the stall warning names the shard.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import numpy as np
import torch
import torch.distributed as dist

from ..data.watch import STOP_SIGNALS

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal or train.time_limit; resume with train.resume=latest
EXIT_DISK_FULL = 74  # EX_IOERR: a checkpoint did not fit on the disk; free space, then resume with train.resume=latest
_REASONS = {0: None, 2: "time_limit", 3: "signal"}  # MAX over processes: a signal wins over the clock


class StopRequested(BaseException):
    """Raised by the signal handler out of a single process's wait for a batch.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way (the
    DataLoader's, a reader's) takes it for a failure.
    """


class StopControl:
    """Decides, identically on every process, whether training stops after a step.

    Build it on every process after the process group exists (it creates a gloo group when there
    are several processes: a collective call).
    """

    def __init__(self, stop_at_step: int | None, time_limit_s: float | None) -> None:
        self.stop_at_step = stop_at_step
        self.deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self.signal_name: str | None = None
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if self._distributed else None
        self._flag = np.zeros(1, dtype=np.int64)  # host memory the all-reduce writes into
        self._pending: dist.Work | None = None
        self._waiting = False

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
        if self._waiting:
            self._waiting = False  # a second signal must not interrupt the checkpoint
            raise StopRequested(self.signal_name)

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """A wait for a batch that a stop signal ends with :class:`StopRequested` (one process only)."""
        if self._distributed:
            yield
            return
        if self.signal_name is not None:
            raise StopRequested(self.signal_name)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def _local_code(self) -> int:
        if self.signal_name is not None:
            return 3
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return 2
        return 0

    def check(self, step: int) -> str | None:
        """The reason to stop after ``step`` (``"stop_at_step"``, ``"time_limit"``, ``"signal"``) or None.

        Every process must call it after every step (with several processes it joins the exchange).
        """
        if not self._distributed:
            code = self._local_code()
        else:
            code = 0
            if self._pending is not None:  # the exchange started after the previous step
                self._pending.wait()
                self._pending, code = None, int(self._flag[0])
            if code == 0:
                self._flag[0] = self._local_code()
                self._pending = dist.all_reduce(torch.from_numpy(self._flag), op=dist.ReduceOp.MAX,
                                                group=self._group, async_op=True)
        if code == 0 and self.stop_at_step is not None and step >= self.stop_at_step:
            return "stop_at_step"
        return _REASONS[code]

    def close(self) -> None:
        """Finish an exchange still in flight (every process, once training is over)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
