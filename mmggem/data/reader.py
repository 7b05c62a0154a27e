"""A logical worker's raw samples in one epoch (tar -> shuffle buffer), and the small snapshot it resumes from."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .samples import tar_samples
from .schedule import Schedule, ShardSequence, mix_seed

Origin = tuple[int, int, int]
"""Where a raw sample came from: (pass, index of its shard in the worker's sequence, index in the shard)."""


@dataclass(frozen=True)
class ReaderSnapshot:
    """Where a reader is: its read position, the origins of the samples it buffers, its random state."""

    position: Origin  # the next sample to read
    buffer: tuple[Origin, ...]
    draining: tuple[Origin, ...]
    rng: tuple[Any, ...]  # random.Random.getstate()
    empty_shards: int
    pass_samples: int

    def to_json(self) -> dict[str, Any]:
        """The form saved in a checkpoint's data state."""
        version, internal, gauss = self.rng
        return {"position": list(self.position), "buffer": [list(o) for o in self.buffer],
                "draining": [list(o) for o in self.draining], "rng": [version, list(internal), gauss],
                "empty_shards": self.empty_shards, "pass_samples": self.pass_samples}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReaderSnapshot:
        """Inverse of :meth:`to_json`."""
        version, internal, gauss = data["rng"]
        return cls(_origin(data["position"]), tuple(map(_origin, data["buffer"])),
                   tuple(map(_origin, data["draining"])),
                   (version, tuple(internal), gauss), int(data["empty_shards"]), int(data["pass_samples"]))


def _origin(values: list[int]) -> Origin:
    return int(values[0]), int(values[1]), int(values[2])


class RawReader:
    """A logical worker's raw samples in one epoch (tar -> shuffle buffer), resumable from a small snapshot.

    The shuffle buffer works as webdataset's: once full, each new sample takes the place of a random
    one, which is handed out; in epoch mode the buffer is shuffled and emptied at the end of each
    pass over the worker's shards, so a pass holds each of their samples once. The snapshot names
    the samples by origin (pass, shard, index) instead of holding them, and restoring it reads only
    the shards those samples and the current read position are in: the cost of a resume is bounded
    by the shards feeding the buffer, not by the position in the epoch.

    ``opening(url)`` is called as each shard is opened (the stall warning names it,
    :mod:`mmggem.data.watch`).
    """

    def __init__(self, schedule: Schedule, epoch: int, worker: int, skips: Counter,
                 snapshot: ReaderSnapshot | None = None, opening: Callable[[str], None] | None = None):
        self.setup, self.worker, self.skips = schedule.setup, worker, skips
        self._opening = opening
        self.sequence = ShardSequence(schedule, epoch, worker)
        self.rng = random.Random(mix_seed(self.sequence.seed, 3))
        self.position: Origin = (0, 0, 0)  # the next sample to read
        self.buffer: list[tuple[Origin, dict[str, Any]]] = []
        self.draining: list[tuple[Origin, dict[str, Any]]] = []  # a finished pass's buffer, handed out from the end
        self.empty_shards = 0  # shards in a row without a sample
        self.pass_samples = 0  # samples read in the current pass
        self._shard: Iterator[dict[str, Any]] | None = None
        if snapshot is not None:
            self._restore(snapshot)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.draining:
                return self.draining.pop()[1]
            item = self._read()
            if item is None:  # end of an epoch-mode pass
                if self.pass_samples == 0:
                    raise RuntimeError(f"rank {self.setup.rank} worker {self.worker}: no sample in its shards "
                                       f"{list(self.sequence.shards)}; skipped: {dict(self.skips)}")
                self.rng.shuffle(self.buffer)
                self.draining, self.buffer = self.buffer, []
                self.position, self.pass_samples = (self.position[0] + 1, 0, 0), 0
                continue
            if self.setup.shuffle_buffer <= 1:
                return item[1]
            if len(self.buffer) < self.setup.shuffle_buffer:
                self.buffer.append(item)
                continue
            index = self.rng.randrange(self.setup.shuffle_buffer)
            taken, self.buffer[index] = self.buffer[index], item
            return taken[1]

    def _read(self) -> tuple[Origin, dict[str, Any]] | None:
        """The next sample of the shard sequence with its origin; None at the end of an epoch-mode pass."""
        while True:
            pass_index, shard_index, sample_index = self.position
            if self._shard is None:
                url = self.sequence.url(pass_index, shard_index)
                if url is None:
                    return None
                self._shard = self._open(url, self.skips)
            sample = next(self._shard, None)
            if sample is not None:
                self.position = (pass_index, shard_index, sample_index + 1)
                self.pass_samples += 1
                return (pass_index, shard_index, sample_index), sample
            self._shard = None
            self.empty_shards = 0 if sample_index else self.empty_shards + 1
            limit = 2 * len(self.setup.urls) + 2
            if self.setup.resampled and self.empty_shards >= limit:
                raise RuntimeError(f"{self.empty_shards} shards in a row gave no sample (last: "
                                   f"{self.sequence.url(pass_index, shard_index)}); skipped: {dict(self.skips)}")
            self.position = (pass_index, shard_index + 1, 0)

    def _open(self, url: str, skips: Counter) -> Iterator[dict[str, Any]]:
        if self._opening is not None:
            self._opening(url)
        return tar_samples(url, skips)

    def snapshot(self) -> ReaderSnapshot:
        """The reader's state: origins, not samples."""
        version, internal, gauss = self.rng.getstate()
        return ReaderSnapshot(self.position, tuple(o for o, _ in self.buffer), tuple(o for o, _ in self.draining),
                              (version, internal, gauss), self.empty_shards, self.pass_samples)

    def _restore(self, snapshot: ReaderSnapshot) -> None:
        self.rng.setstate(snapshot.rng)
        self.empty_shards, self.pass_samples = snapshot.empty_shards, snapshot.pass_samples
        samples = self._fetch(set(snapshot.buffer) | set(snapshot.draining))
        self.buffer = [(o, samples[o]) for o in snapshot.buffer]
        self.draining = [(o, samples[o]) for o in snapshot.draining]
        pass_index, shard_index, sample_index = self.position = snapshot.position
        if sample_index:  # reopen the shard being read and skip what was read of it
            url = self.sequence.url(pass_index, shard_index)
            counted = Counter(self.skips)  # the skips of the part read again were counted before the checkpoint
            self._shard = self._open(url, self.skips)
            for _ in range(sample_index):
                if next(self._shard, None) is None:
                    raise RuntimeError(f"{url} holds fewer than the {sample_index} samples read from it before the "
                                       "checkpoint: the shard changed")
            self.skips.clear()
            self.skips.update(counted)

    def _fetch(self, origins: set[Origin]) -> dict[Origin, dict[str, Any]]:
        """Re-read the samples at ``origins``, one pass over each shard they are in."""
        found: dict[Origin, dict[str, Any]] = {}
        for pass_index, shard_index in sorted({o[:2] for o in origins}):
            wanted = {o[2] for o in origins if o[:2] == (pass_index, shard_index)}
            url = self.sequence.url(pass_index, shard_index)
            for index, sample in enumerate(self._open(url, Counter())):  # skips were counted the first time
                if index in wanted:
                    found[(pass_index, shard_index, index)] = sample
                if index >= max(wanted):
                    break
        missing = origins - set(found)
        if missing:
            origin = min(missing)
            raise RuntimeError(f"cannot resume: sample {origin[2]} of {self.sequence.url(*origin[:2])} is gone "
                               "(the shard changed since the checkpoint)")
        return found
