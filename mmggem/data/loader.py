"""The training data pipeline: webdataset tar shards -> shuffled, decoded, transformed, tokenised batches.

Shard spec: one or more ``::``-joined sources, each a brace pattern, glob or webdataset URL with an
optional ``@WEIGHT`` (:mod:`mmggem.data.shards`). The sample count per epoch comes from ``sizes.json``
beside the shards unless ``num_samples`` is given.

Modes:

- resampled: every worker draws shards with replacement (weighted), infinitely; iteration never ends.
- epoch: the shards, shuffled per epoch, are dealt to the ``world_size x num_workers`` workers so each
  sees a disjoint part; one iteration yields exactly ``batches_per_epoch`` batches on every rank. A
  worker whose shards run out goes through them again (in a new order), so uneven shards never make
  ranks disagree on the batch count; in exchange, with uneven shards some samples of an epoch repeat
  and others wait for the next epoch.

In both modes an epoch is ``num_samples // (batch_size * world_size)`` batches per rank, batch j of an
epoch comes from (logical) worker ``j % num_workers``, and everything random (shard order, shuffle
buffer, the transform's torch and ``random`` draws, seeded per sample) follows from (seed, epoch, rank,
worker). The DataLoader's worker processes persist across epochs: each plays, epoch after epoch, the
logical worker its next batch falls to.

Resume: each batch carries its worker's reader snapshot (position in its shard sequence, the origins
of the samples in its shuffle buffer, the buffer's random state) and its count of samples pulled. The
loader records it for the batches the caller consumed (``state_dict()``); a loader built with that
state has each worker re-read only the shards those samples and its read position are in, so the next
batch equals the one an uninterrupted run would have yielded and a resume costs a few shards, not the
epoch so far. A state from another setup (world size, workers, batch size, ...) continues
approximately (``resume_approximately``).

Bad samples are skipped and counted by reason (``skipped()``, reasons of :mod:`mmggem.data.skips`);
images are decoded by :mod:`mmggem.data.images` (transparency on white), captions by
:mod:`mmggem.data.samples`.

Reading order: :class:`TrainLoader` -> :class:`~mmggem.data.stream.Stream` (which worker makes which batch)
-> :class:`~mmggem.data.reader.RawReader` (tar -> shuffle buffer) -> :mod:`~mmggem.data.samples`;
who reads which shard with which seed: :mod:`~mmggem.data.schedule`; the position and its JSON:
:mod:`~mmggem.data.state`; approximate resume: :mod:`~mmggem.data.elastic`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..errors import UserError
from . import elastic
from .schedule import Schedule, Setup, mix_seed
from .shards import Source, count_samples, is_remote, parse_spec
from .state import BatchTag, LoaderState, check_version
from .stream import Stream
from .watch import ReadBoard, StallWatch

__all__ = ["TrainLoader", "Source", "count_samples", "is_remote", "parse_spec"]


class TrainLoader:
    """Iterable of (images [B,3,H,W], tokens [B,L] long) training batches; see the module docstring.

    Epoch mode: one ``iter()`` yields the rest of the current epoch; the next ``iter()`` starts the next
    epoch. Resampled mode: one ``iter()`` never ends. Either way ``iter()`` continues from the batches
    consumed so far, so a loader built with ``state=old.state_dict()`` continues where ``old`` stopped.
    The images are whatever ``transform`` returns (uint8 for the trainer, see :mod:`mmggem.data.device`).

    The DataLoader and its worker processes are created at the first ``iter()`` and live as long as
    the loader: epochs follow each other in the same workers, which already prefetch the next epoch's
    first batches while the current one ends. ``pin_memory`` puts batches in page-locked memory for
    non-blocking copies to a GPU.

    The worker processes outlive a stop signal (:mod:`mmggem.data.watch`) until :meth:`close`.
    With ``stall_warn_s`` > 0, a wait of that long for a batch prints a warning naming the
    shard each worker is reading. ``waiting()``, when given, is entered around each wait for a
    batch and may end it with an exception (the trainer's stop on a signal,
    :meth:`mmggem.train.stopping.StopControl.waiting_for_data`); a batch is recorded only once the
    wait is over, so the position stays that of the batches handed out.
    """

    def __init__(
        self,
        spec: str,
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        batch_size: int,
        num_workers: int,
        seed: int,
        resampled: bool,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        num_samples: int | None = None,
        state: dict | None = None,
        pin_memory: bool = False,
        stall_warn_s: float = 0.0,
        waiting: Callable[[], AbstractContextManager[None]] | None = None,
    ):
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0; got {batch_size}, "
                             f"{num_workers}, {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        sources = parse_spec(spec)
        urls = tuple(url for source in sources for url in source.urls)
        weights = tuple(source.weight for source in sources for _ in source.urls)
        workers = max(1, num_workers)
        if not resampled:
            if any(weight != 1.0 for weight in weights):
                raise UserError(f"shard spec {spec!r}: sampling weights need resampled mode")
            if len(urls) < world_size * workers:
                raise UserError(
                    f"epoch mode needs at least world_size x workers = {world_size} x {workers} shards, "
                    f"{spec!r} has {len(urls)}; use resampled mode, fewer workers, or more shards")
        self.num_samples = num_samples if num_samples is not None else count_samples(list(urls))
        self.batches_per_epoch = self.num_samples // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise UserError(f"{self.num_samples} samples make no full batch of {batch_size} on each of "
                            f"{world_size} rank(s)")
        self.setup = Setup(seed=seed, rank=rank, world_size=world_size, workers=workers, resampled=resampled,
                           urls=urls, weights=weights, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                           batches_per_epoch=self.batches_per_epoch)
        self.resampled, self.num_workers = resampled, num_workers
        self.transform, self.tokenizer, self.pin_memory = transform, tokenizer, pin_memory
        self._state = LoaderState.start(0, workers)
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor, BatchTag]] | None = None
        self._board = ReadBoard(workers)
        self._watch = StallWatch(self._board, rank, stall_warn_s) if stall_warn_s > 0 else None
        self._interruptible = waiting or nullcontext
        if state is not None:
            self.load_state_dict(state)

    # -- iteration --

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None:
            stream = Stream(self._schedule(), self._state, self.transform, self.tokenizer, self._board)
            self._batches = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                            pin_memory=self.pin_memory, worker_init_fn=self._board.init_worker,
                                            generator=self._base_seed_generator()))
        while True:
            with self._waiting():
                images, tokens, tag = next(self._batches)
            self._record(tag)
            epoch_ended = self._state.batches == self._schedule().epoch_batches(self._state.epoch)
            if epoch_ended:
                self._state = self._state.next_epoch()
            yield images, tokens
            if epoch_ended and not self.resampled:
                return

    def _base_seed_generator(self) -> torch.Generator:
        """The generator the DataLoader draws its workers' base seed from when it starts them.

        Without one it draws from torch's global generator of the main process, at the first batch:
        at step 1 of a run but after the RNG state is restored in a resumed one, which would leave
        the main process's randomness one draw apart from the uninterrupted run's. The base seed
        itself changes no sample: every sample's transform is seeded on its own (:mod:`.stream`).
        """
        return torch.Generator().manual_seed(mix_seed(self.setup.seed, self.setup.rank))

    @contextmanager
    def _waiting(self) -> Iterator[None]:
        with self._watch.waiting() if self._watch is not None else nullcontext(), self._interruptible():
            yield

    def close(self) -> None:
        """Shut the worker processes down (a stop signal now ends them, even one blocked in a read)."""
        self._board.close()
        self._batches = None  # the DataLoader's iterator joins its workers, then signals those that hang

    def _schedule(self) -> Schedule:
        return Schedule(self.setup, self._state.override)

    def _record(self, tag: BatchTag) -> None:
        """Note the position a batch reached; the batches arrive in the order :class:`Stream` deals them."""
        expected = (self._state.epoch, self._state.batches % self.setup.workers)
        if (tag.epoch, tag.worker) != expected:
            raise RuntimeError(f"batch from epoch {tag.epoch} worker {tag.worker} arrived where epoch "
                               f"{expected[0]} worker {expected[1]} was due")
        self._state.workers[tag.worker] = tag.state
        self._state.batches += 1

    # -- bookkeeping --

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._state.epoch

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, over all workers, up to the last batch consumed."""
        return dict(self._state.skipped())

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the batches consumed so far (pass as ``state=`` to resume)."""
        return self._state.to_json(self.setup.layout())

    def layout_differences(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Setup keys whose value differs in a saved state, as ``{key: (now, saved)}``; empty: exact resume."""
        check_version(state)
        return {key: (value, state["layout"].get(key)) for key, value in self.setup.layout().items()
                if state["layout"].get(key) != value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a loader of the same setup was (see :meth:`state_dict`)."""
        mismatched = self.layout_differences(state)
        if mismatched:
            details = ", ".join(f"{k}: now {now!r}, saved {saved!r}" for k, (now, saved) in mismatched.items())
            raise UserError(f"loader state was saved with a different setup, cannot resume exactly; {details}")
        self._state = LoaderState.from_json(state)

    def resume_approximately(self, saved: list[dict[str, Any]], accept_changed_shards: bool = False) -> str:
        """Continue a run saved with another world size, worker count, batch size or sample count.

        ``saved`` holds every old rank's state; :func:`mmggem.data.elastic.resume_approximately` says
        what the rest of the epoch holds. Returns the warning to show.
        """
        resumed = elastic.resume_approximately(saved, self.setup, accept_changed_shards)
        self._state = resumed.state
        return resumed.warning
