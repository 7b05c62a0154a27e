"""The training loader's position, in one typed form with its JSON form (a checkpoint's data_state_rank*.json).

A :class:`WorkerState` is where one logical worker is after the last batch the caller consumed; a
batch carries its worker's state out of the DataLoader worker (:class:`BatchTag`), and the loader
keeps the latest one per worker in its :class:`LoaderState`. ``to_json``/``from_json`` are the only
places that know the saved format, which stays readable across versions of this code as long as
STATE_VERSION does not change.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .reader import ReaderSnapshot
from .schedule import EpochOverride

STATE_VERSION = 2


@dataclass(frozen=True)
class WorkerState:
    """A logical worker's position in the current epoch, as of the last batch the caller consumed."""

    pulled: int = 0  # raw samples taken from the shuffle buffer (they seed the augmentations)
    batches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    reader: ReaderSnapshot | None = None  # None before the worker's first batch of the epoch

    def to_json(self) -> dict[str, Any]:
        """The form saved in a checkpoint's data state."""
        return {"pulled": self.pulled, "batches": self.batches, "skipped": dict(self.skipped),
                "reader": None if self.reader is None else self.reader.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerState:
        """Inverse of :meth:`to_json`."""
        reader = None if data["reader"] is None else ReaderSnapshot.from_json(data["reader"])
        return cls(int(data["pulled"]), int(data["batches"]), {str(k): int(v) for k, v in data["skipped"].items()},
                   reader)


@dataclass(frozen=True)
class BatchTag:
    """What a batch tells the loader: its epoch, its logical worker, and that worker's state after it."""

    epoch: int
    worker: int
    state: WorkerState


@dataclass
class LoaderState:
    """Where a rank's loader is: the epoch, its batches consumed, each logical worker's position, skip counts."""

    epoch: int
    batches: int  # batches of ``epoch`` consumed
    workers: list[WorkerState]
    skipped_before: Counter = field(default_factory=Counter)  # skips of the epochs before this one
    override: EpochOverride | None = None  # set by an approximate resume, for ``epoch`` only

    @classmethod
    def start(cls, epoch: int, workers: int, skipped_before: Counter | None = None) -> LoaderState:
        """The position at the start of ``epoch``, before any batch."""
        return cls(epoch, 0, [WorkerState() for _ in range(workers)], Counter(skipped_before or {}))

    def next_epoch(self) -> LoaderState:
        """The start of the following epoch, the skips of this one carried over."""
        skipped = Counter(self.skipped_before)
        for worker in self.workers:
            skipped.update(worker.skipped)
        return LoaderState.start(self.epoch + 1, len(self.workers), skipped)

    def skipped(self) -> Counter:
        """Skipped samples by reason, over all workers, up to the last batch consumed."""
        total = Counter(self.skipped_before)
        for worker in self.workers:
            total.update(worker.skipped)
        return total

    def to_json(self, layout: dict[str, Any]) -> dict[str, Any]:
        """The saved form, with the setup's ``layout`` (:meth:`mmggem.data.schedule.Setup.layout`)."""
        override = self.override
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches,
            "workers": [worker.to_json() for worker in self.workers],
            "skipped_before": dict(self.skipped_before), "layout": layout,
            "epoch_urls": None if override is None or override.urls is None else list(override.urls),
            "epoch_batches": None if override is None else override.batches,
            "salt": 0 if override is None else override.salt,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoaderState:
        """Inverse of :meth:`to_json` (the layout is checked by the caller); UserError for another version."""
        check_version(data)
        workers = [WorkerState.from_json(w) for w in data["workers"]]
        if sum(w.batches for w in workers) != data["batches"]:
            raise ValueError("loader state is inconsistent: worker batch counts do not add up to 'batches'")
        epoch = int(data["epoch"])
        override = None
        if data["epoch_batches"] is not None:
            urls = None if data["epoch_urls"] is None else tuple(data["epoch_urls"])
            override = EpochOverride(epoch, int(data["epoch_batches"]), urls, int(data["salt"]))
        skipped = Counter({str(k): int(v) for k, v in data["skipped_before"].items()})
        return cls(epoch, int(data["batches"]), workers, skipped, override)


def check_version(data: dict[str, Any]) -> None:
    """UserError unless ``data`` is a state of this code's STATE_VERSION."""
    if data.get("version") != STATE_VERSION:
        raise UserError(f"loader state version {data.get('version')!r} is not {STATE_VERSION}: the checkpoint comes "
                        "from another mmggem version")
