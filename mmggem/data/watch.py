"""What the loader's worker processes are reading, a warning when a read stalls, and their stop signals.

A cluster stops a job by signalling every process of it, the DataLoader's worker processes
included. A worker killed by SIGTERM makes the main process raise before it can checkpoint, so
workers do not act on the stop signals (:data:`STOP_SIGNALS`): the main process
decides, checkpoints, and only then shuts them down. Their handler is a Python function, not
``SIG_IGN``, so the programs a ``pipe:`` shard runs start with the default handlers and stop
with the job.

A shard whose read hangs (a stuck ``pipe:aws s3 cp``, an HTTP read that never returns) would
block training without a word. Each worker notes in shared memory which shard it opened and when
(:class:`ReadBoard`); a thread of the main process (:class:`StallWatch`) prints, once the main
process has waited ``data.stall_warn_s`` seconds for a batch, one line naming the shard each
worker is reading and for how long, and repeats it at most once per ``data.stall_warn_s``. The
training loop only stores a clock reading per batch; nothing waits on the device.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What a cluster (SLURM: SIGUSR1 before the time limit, SIGTERM on preemption) or a user (Ctrl-C) sends to stop a job."""

URL_BYTES = 1024
"""Room for one worker's shard URL in shared memory; a longer one is cut (the warning says so with ...)."""


class ReadBoard:
    """Shared memory in which each worker slot notes the shard it reads and since when, plus a closing flag.

    Made in the main process before the DataLoader starts its workers, which inherit it.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._urls = multiprocessing.RawArray("c", slots * URL_BYTES)
        self._since = multiprocessing.RawArray("d", slots)
        self._closing = multiprocessing.RawValue("b", 0)
        atexit.register(self.close)  # before multiprocessing's exit hook terminates the workers (atexit is LIFO)

    def reading(self, slot: int, url: str) -> None:
        """Worker ``slot`` opens shard ``url`` now."""
        data = url.encode("utf-8", "replace")[:URL_BYTES]
        start = slot * URL_BYTES
        self._urls[start:start + URL_BYTES] = data.ljust(URL_BYTES, b"\0")
        self._since[slot] = time.monotonic()

    def readings(self) -> list[tuple[int, str | None, float]]:
        """``(slot, url or None, seconds since it was opened)`` for every worker slot."""
        now, found = time.monotonic(), []
        for slot in range(self.slots):
            raw = bytes(self._urls[slot * URL_BYTES:(slot + 1) * URL_BYTES]).rstrip(b"\0")
            url = raw.decode("utf-8", "replace") + ("..." if len(raw) == URL_BYTES else "") if raw else None
            found.append((slot, url, now - self._since[slot] if url else 0.0))
        return found

    def close(self) -> None:
        """The main process is done with the workers: a stop signal now ends them."""
        self._closing.value = 1

    @property
    def closing(self) -> bool:
        return bool(self._closing.value)

    def init_worker(self, worker_id: int) -> None:
        """DataLoader ``worker_init_fn``: the stop signals end the worker only once :meth:`close` was called."""
        def on_stop_signal(signum: int, frame: FrameType | None) -> None:
            if self.closing:
                os._exit(0)

        for signum in STOP_SIGNALS:
            signal.signal(signum, on_stop_signal)


class StallWatch:
    """Warns, from a daemon thread, when the main process has waited ``limit_s`` seconds for a batch.

    Wrap each wait for a batch in :meth:`waiting`; the warning names every worker's shard
    (:class:`ReadBoard`) and repeats at most once per ``limit_s``.
    """

    def __init__(self, board: ReadBoard, rank: int, limit_s: float, emit: Callable[[str], None] | None = None):
        self.board, self.rank, self.limit_s = board, rank, limit_s
        self._emit = emit or (lambda line: print(line, flush=True))
        self._since: float | None = None
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """The block waits for a batch."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mmggem-stall-watch", daemon=True)
            self._thread.start()
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        last_warning = float("-inf")
        while not self.board.closing:
            time.sleep(min(self.limit_s / 4, 5.0))
            since, now = self._since, time.monotonic()
            if since is not None and now - since >= self.limit_s and now - last_warning >= self.limit_s:
                self._emit(self.message(now - since))
                last_warning = now

    def message(self, waited_s: float) -> str:
        """The warning line after ``waited_s`` seconds without a batch."""
        parts = [f"worker {slot} reading {url!r} for {seconds:.0f} s" if url else f"worker {slot} has opened no shard"
                 for slot, url, seconds in self.board.readings()]
        return f"WARNING: rank {self.rank}: no batch for {waited_s:.0f} s; " + "; ".join(parts)
