"""Who reads what: the set-up of one rank's stream, and the shards and seeds of each logical worker per epoch.

Everything random in the training data (shard order, shuffle buffer, the transform's draws) follows
from (seed, epoch, rank, worker) through :func:`mix_seed`, so any worker's part of any epoch can be
rebuilt from these few numbers: that is what makes an exact resume cheap. An approximate resume
(:mod:`mmggem.data.elastic`) replaces one epoch's shard list and batch count and salts its seeds,
so that epoch's streams are fresh ones (:class:`EpochOverride`).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (room to add a sample index and stay a valid torch seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class Setup:
    """What one rank's stream is made of, fixed when the loader is built; its JSON form is the state's layout."""

    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers of this rank
    resampled: bool
    urls: tuple[str, ...]
    weights: tuple[float, ...]
    batch_size: int
    shuffle_buffer: int
    batches_per_epoch: int

    def layout(self) -> dict[str, Any]:
        """The JSON form saved with a state; two setups with equal layouts resume each other exactly."""
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "workers": self.workers,
                "batch_size": self.batch_size, "resampled": self.resampled, "shuffle_buffer": self.shuffle_buffer,
                "shards": len(self.urls), "shards_digest": self.digest, "first_shard": self.urls[0],
                "last_shard": self.urls[-1], "batches_per_epoch": self.batches_per_epoch}

    @cached_property
    def digest(self) -> str:
        """:func:`shards_digest` of the shards, computed once."""
        return shards_digest(self.urls)

    @classmethod
    def from_layout(cls, layout: dict[str, Any], urls: tuple[str, ...], weights: tuple[float, ...]) -> Setup:
        """The setup a saved layout describes, over ``urls`` (a layout keeps only their digest)."""
        return cls(seed=layout["seed"], rank=layout["rank"], world_size=layout["world_size"],
                   workers=layout["workers"], resampled=layout["resampled"], urls=urls, weights=weights,
                   batch_size=layout["batch_size"], shuffle_buffer=layout["shuffle_buffer"],
                   batches_per_epoch=layout["batches_per_epoch"])


def shards_digest(urls: tuple[str, ...]) -> str:
    """A short fingerprint of a shard list, to tell whether a saved run read the same shards."""
    return hashlib.sha1("\n".join(urls).encode()).hexdigest()


@dataclass(frozen=True)
class EpochOverride:
    """What an approximate resume left to one epoch: its remaining batches, its shards, its seed salt."""

    epoch: int
    batches: int
    urls: tuple[str, ...] | None  # epoch mode: the shards no old worker had started; None in resampled mode
    salt: int  # nonzero: the epoch's streams are seeded apart from the ones the old run had


@dataclass(frozen=True)
class Schedule:
    """A setup and the override of an approximate resume, if any: batch counts, seeds and shards per epoch."""

    setup: Setup
    override: EpochOverride | None = None

    def _overrides(self, epoch: int) -> EpochOverride | None:
        return self.override if self.override is not None and self.override.epoch == epoch else None

    def epoch_batches(self, epoch: int) -> int:
        """Batches of ``epoch`` on this rank."""
        override = self._overrides(epoch)
        return override.batches if override is not None else self.setup.batches_per_epoch

    def quota(self, epoch: int, worker: int) -> int:
        """Batches of logical ``worker`` in ``epoch``: batch j of an epoch is worker ``j % workers``'s."""
        batches, workers = self.epoch_batches(epoch), self.setup.workers
        return batches // workers + (worker < batches % workers)

    def _salt(self, epoch: int) -> tuple[int, ...]:
        override = self._overrides(epoch)
        return (override.salt,) if override is not None and override.salt else ()

    def worker_seed(self, epoch: int, worker: int) -> int:
        """The seed of everything random in a logical worker's part of an epoch."""
        return mix_seed(self.setup.seed, epoch, self.setup.rank, worker, *self._salt(epoch))

    def assignment(self, epoch: int) -> tuple[tuple[str, ...], ...]:
        """Epoch mode: the epoch's shard order dealt round-robin to all ranks' workers; this rank's part."""
        override = self._overrides(epoch)
        order = list(override.urls if override is not None and override.urls else self.setup.urls)
        random.Random(mix_seed(self.setup.seed, epoch, *self._salt(epoch))).shuffle(order)
        setup = self.setup
        slots = setup.world_size * setup.workers
        return tuple(tuple(order[setup.rank * setup.workers + w::slots]) for w in range(setup.workers))


class ShardSequence:
    """The shards a logical worker reads in one epoch, addressable by (pass, index) without replaying.

    Epoch mode: pass k goes through the worker's shards in an order seeded by k. Resampled mode: one
    endless pass whose i-th shard is a weighted draw seeded by i.
    """

    def __init__(self, schedule: Schedule, epoch: int, worker: int):
        self.setup = schedule.setup
        self.seed = schedule.worker_seed(epoch, worker)
        self.shards = () if self.setup.resampled else schedule.assignment(epoch)[worker]
        self._orders: dict[int, list[str]] = {}

    def url(self, pass_index: int, index: int) -> str | None:
        """The shard at ``index`` of pass ``pass_index``; None past the end of an epoch-mode pass."""
        if self.setup.resampled:
            return random.Random(mix_seed(self.seed, 1, index)).choices(self.setup.urls, self.setup.weights)[0]
        if pass_index not in self._orders:
            order = list(self.shards)
            random.Random(mix_seed(self.seed, 2, pass_index)).shuffle(order)
            self._orders = {pass_index: order}
        order = self._orders[pass_index]
        return order[index] if index < len(order) else None
