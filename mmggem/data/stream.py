"""One rank's endless stream of batches, dealt over the DataLoader's worker processes.

Batch j of an epoch comes from logical worker ``j % workers``; each logical worker turns its raw
samples (:class:`~mmggem.data.reader.RawReader`) into decoded, transformed, tokenised batches,
seeding each sample's transform from its worker's seed and its count of samples pulled, and tags
each batch with its state after it (:class:`~mmggem.data.state.BatchTag`).
"""
from __future__ import annotations

import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .images import Skip
from .reader import RawReader
from .samples import decode_sample
from .schedule import Schedule
from .state import BatchTag, LoaderState, WorkerState
from .watch import ReadBoard

MAX_CONSECUTIVE_SKIPS = 10_000
"""A worker that skips this many samples in a row stops with an error: its data is unusable."""

Batch = tuple[torch.Tensor, torch.Tensor, BatchTag]


class Stream(IterableDataset):
    """The batches of one rank from ``start`` on, without end; each DataLoader worker yields its slot's share.

    Picklable: the DataLoader sends it to its worker processes. Each slot notes the shards it opens
    on ``board`` (:mod:`mmggem.data.watch`).
    """

    def __init__(self, schedule: Schedule, start: LoaderState, transform: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], board: ReadBoard | None = None):
        super().__init__()
        self.schedule = schedule
        self.start = replace(start, workers=list(start.workers))  # the loader's own state moves on as batches arrive
        self.transform, self.tokenizer, self.board = transform, tokenizer, board

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        return self._slot_batches(info.id if info is not None else 0, self.schedule.setup.workers)

    def _slot_batches(self, slot: int, slots: int) -> Iterator[Batch]:
        """DataLoader worker ``slot``'s batches, epoch after epoch.

        The DataLoader takes batch k of its (endless) iteration from worker ``k % slots``: counted from
        the start position, the k-th batch of the run's sequence of epochs, and batch ``j`` of an
        epoch belongs to logical worker ``j % slots``. So within one epoch a slot always plays one
        logical worker, and at each epoch boundary it moves on to the logical worker its next index
        falls to.
        """
        epoch, index = self.start.epoch, self.start.batches + slot  # this slot's next batch: index in epoch
        while True:
            while index >= self.schedule.epoch_batches(epoch):
                index -= self.schedule.epoch_batches(epoch)
                epoch += 1
            worker = index % slots
            start = self.start.workers[worker] if epoch == self.start.epoch else WorkerState()
            if start.batches != index // slots:
                raise RuntimeError(f"loader state is inconsistent: worker {worker} consumed {start.batches} batches, "
                                   f"its next one is batch {index} of the epoch")
            served = 0
            for batch in self._worker_batches(epoch, worker, start, slot):
                served += 1
                yield batch
            index += served * slots

    def _worker_batches(self, epoch: int, worker: int, start: WorkerState, slot: int) -> Iterator[Batch]:
        """The rest of logical ``worker``'s part of ``epoch`` from ``start``, read by DataLoader worker ``slot``."""
        setup = self.schedule.setup
        quota = self.schedule.quota(epoch, worker)
        skips: Counter = Counter(start.skipped)
        opening = None if self.board is None else partial(self.board.reading, slot)
        raw = RawReader(self.schedule, epoch, worker, skips, start.reader, opening)
        base_seed = raw.sequence.seed
        pulled, batches, consecutive_skips = start.pulled, start.batches, 0
        images: list[torch.Tensor] = []
        captions: list[str] = []
        while batches < quota:
            sample = next(raw)
            pulled += 1
            try:
                image, caption = decode_sample(sample)
            except Skip as skip:
                skips[skip.reason] += 1
                consecutive_skips += 1
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"rank {setup.rank} worker {worker}: {consecutive_skips} unusable samples in "
                                       f"a row (last from {sample.get('__url__')}); skipped: {dict(skips)}") from None
                continue
            consecutive_skips = 0
            with _seeded(base_seed + pulled):
                images.append(self.transform(image))
            captions.append(caption)
            if len(images) == setup.batch_size:
                batches += 1
                tag = BatchTag(epoch, worker, WorkerState(pulled, batches, dict(skips), raw.snapshot()))
                yield torch.stack(images), self.tokenizer(captions), tag
                images, captions = [], []


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and ``random`` for one sample, restoring the caller's state after."""
    torch_state, random_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(random_state)
