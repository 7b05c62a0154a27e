"""The training data pipeline: webdataset tar shards -> shuffled, decoded, transformed, tokenised batches.

Shard spec: one or more sources joined with ``::``; each source is a brace pattern (or glob) of local
paths, or a webdataset URL (``pipe:aws s3 cp s3://bucket/{000..099}.tar -``, ``https://...``), with an
optional sampling weight as a ``@WEIGHT`` suffix::

    /data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar@2

A weight is an upsampling factor, as open_clip's ``--train-data-upsampling-factors``: each shard of
that source is drawn WEIGHT times as often as a shard of weight 1 (weights need resampled mode). A
local pattern that matches no file is a ValueError at construction. The sample count per epoch comes
from ``sizes.json`` beside the shards (summed over the listed shards) unless ``num_samples`` is given.

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

Tar members group into samples by webdataset's own rules (:mod:`mmggem.data.tars`). Bad samples are
skipped and counted by reason (``skipped()``, reasons of :mod:`mmggem.data.skips`): unreadable_shard,
truncated_tar, duplicate_member, no_image, no_caption, caption_not_utf8, empty_caption, corrupt_image,
image_too_large (above Pillow's MAX_IMAGE_PIXELS). Images are converted to RGB: palette and grey via
Pillow, CMYK via Pillow, 16-bit ('I;16', 'I') by keeping the high byte, and images with transparency
composited on white, as a viewer shows them (plain conversion would expose whatever colour hides under
transparent pixels, often black). Captions are stripped and cut to MAX_CAPTION_CHARS characters before
tokenisation (more than any tokenizer context holds).
"""
from __future__ import annotations

import glob
import hashlib
import io
import random
import re
import tarfile
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from . import formats
from .skips import skip_reason
from .tars import DUPLICATE_MEMBER, group_samples
from ..errors import UserError

MAX_CAPTION_CHARS = 8192
MAX_CONSECUTIVE_SKIPS = 10_000
"""A worker that skips this many samples in a row stops with an error: its data is unusable."""

STATE_VERSION = 2
_WEIGHT = re.compile(r"^(?P<pattern>.+)@(?P<weight>\d+(?:\.\d*)?|\.\d+)$")
_GLOB = re.compile(r"[*?[]")
_NUM_SAMPLES_HINT = ("set the number of samples an epoch holds with the config key data.num_samples "
                     "(on the command line: mmggem train CONFIG data.num_samples=N)")


# --- shard specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One ``::``-separated part of a spec: its expanded shard URLs and sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    """True for URLs webdataset opens through a scheme (pipe:, http://, s3://, ...), not the local file system."""
    return url.startswith("pipe:") or "://" in url


def parse_spec(spec: str) -> list[Source]:
    """Split a shard spec into sources and expand each; a local pattern matching no file is a ValueError."""
    sources = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            raise UserError(f"shard spec {spec!r} has an empty source between '::'")
        match = _WEIGHT.match(part)
        pattern, weight = (match["pattern"], float(match["weight"])) if match else (part, 1.0)
        if weight <= 0:
            raise UserError(f"source {part!r}: the weight after '@' must be positive")
        sources.append(Source(tuple(_expand(pattern)), weight))
    return sources


def _expand(pattern: str) -> list[str]:
    urls = list(braceexpand.braceexpand(pattern))
    if is_remote(pattern):
        return urls
    found: list[str] = []
    missing = []
    for url in urls:
        matches = sorted(glob.glob(url)) if _GLOB.search(url) else ([url] if Path(url).is_file() else [])
        found.extend(matches)
        if not matches:
            missing.append(url)
    if not found:
        raise UserError(f"shard pattern {pattern!r} matches no file")
    if missing:
        raise UserError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} shards do not exist, "
                        f"e.g. {missing[0]}")
    return found


def count_samples(urls: list[str]) -> int:
    """Total sample count of local shards from the ``sizes.json`` beside them; ValueError when unknown."""
    total = 0
    sizes_by_dir: dict[Path, dict[str, int] | None] = {}
    for url in urls:
        if is_remote(url):
            raise UserError(f"cannot count the samples of remote shard {url}; {_NUM_SAMPLES_HINT}")
        directory = Path(url).parent
        if directory not in sizes_by_dir:
            sizes_by_dir[directory] = formats.read_sizes(directory)
        sizes = sizes_by_dir[directory]
        if sizes is None:
            raise UserError(f"no {formats.SIZES_FILE} in {directory}; {_NUM_SAMPLES_HINT}")
        if Path(url).name not in sizes:
            raise UserError(f"{directory / formats.SIZES_FILE} has no entry for {Path(url).name}; {_NUM_SAMPLES_HINT}")
        total += sizes[Path(url).name]
    return total


# --- decoding one sample --------------------------------------------------------------------------


class Skip(Exception):
    """A sample that cannot be used; ``reason`` is one of :data:`mmggem.data.skips.SKIP_REASONS`."""

    def __init__(self, reason: str):
        super().__init__(skip_reason(reason))
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the choices)."""
    if image.mode == "RGB":
        return image
    if image.mode == "F":
        image = image.convert("L")  # clips to 0..255
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        high = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB image; raises Skip('corrupt_image' or 'image_too_large')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Skip("image_too_large") from None
    except Exception:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) for bad bytes
        raise Skip("corrupt_image") from None


def decode_caption(sample: dict[str, Any]) -> str:
    """The sample's caption, stripped and bounded; raises Skip for a missing, empty or non-UTF-8 one."""
    if formats.CAPTION_KEY not in sample:
        raise Skip("no_caption")
    try:
        caption = sample[formats.CAPTION_KEY].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    if not caption:
        raise Skip("empty_caption")
    return caption[:MAX_CAPTION_CHARS]


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, str]:
    """(RGB image, caption) of a raw sample; raises Skip."""
    ext = formats.image_key(sample)
    if ext is None:
        raise Skip("no_image")
    caption = decode_caption(sample)
    return decode_image(sample[ext]), caption


# --- raw sample streams ---------------------------------------------------------------------------


def tar_samples(url: str, skips: Counter) -> Iterator[dict[str, Any]]:
    """Samples (dicts of raw bytes by extension) of one shard, as webdataset reads them (:mod:`.tars`).

    A read error ends the shard and is counted (``truncated_tar``; the sample being read is
    dropped), as is a shard that cannot be opened (``unreadable_shard``) and a sample with two
    members of one extension (``duplicate_member``).
    """
    try:
        stream = wds.gopen(url)
    except Exception:
        skips["unreadable_shard"] += 1
        return
    status = None  # stays None only while the consumer closes this generator early
    try:
        members = ((member["fname"], member["data"]) for member in tar_file_iterator(stream))
        yield from group_samples(members, url, on_duplicate=lambda key, name: skips.update([DUPLICATE_MEMBER]))
        status = "ok"
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        status = "truncated_tar"
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: command that failed (not counted when closed early on purpose)
            if status is not None:
                status = "unreadable_shard"
    if status != "ok":
        skips[status] += 1


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from ``parts`` (room to add a sample index and stay a valid torch seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]) >> 1


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


# --- one worker's raw samples, resumable ----------------------------------------------------------

Origin = tuple[int, int, int]
"""Where a raw sample came from: (pass, index of its shard in the worker's sequence, index in the shard)."""


class _ShardSequence:
    """The shards a logical worker reads in one epoch, addressable by (pass, index) without replaying.

    Epoch mode: pass k goes through the worker's shards in an order seeded by k. Resampled mode: one
    endless pass whose i-th shard is a weighted draw seeded by i.
    """

    def __init__(self, plan: _StreamPlan, epoch: int, worker: int, base_seed: int):
        self.plan, self.base_seed = plan, base_seed
        self.shards = () if plan.resampled else plan.assignment(epoch)[worker]
        self._orders: dict[int, list[str]] = {}

    def url(self, pass_index: int, index: int) -> str | None:
        """The shard at ``index`` of pass ``pass_index``; None past the end of an epoch-mode pass."""
        if self.plan.resampled:
            return random.Random(_seed(self.base_seed, 1, index)).choices(self.plan.urls, self.plan.weights)[0]
        if pass_index not in self._orders:
            order = list(self.shards)
            random.Random(_seed(self.base_seed, 2, pass_index)).shuffle(order)
            self._orders = {pass_index: order}
        order = self._orders[pass_index]
        return order[index] if index < len(order) else None


class _RawReader:
    """A logical worker's raw samples in one epoch (tar -> shuffle buffer), resumable from a small snapshot.

    The shuffle buffer works as webdataset's: once full, each new sample takes the place of a random
    one, which is handed out; in epoch mode the buffer is shuffled and emptied at the end of each
    pass over the worker's shards, so a pass holds each of their samples once. The snapshot names
    the samples by origin (pass, shard, index) instead of holding them, and restoring it reads only
    the shards those samples and the current read position are in: the cost of a resume is bounded
    by the shards feeding the buffer, not by the position in the epoch.
    """

    def __init__(self, plan: _StreamPlan, epoch: int, worker: int, base_seed: int, skips: Counter,
                 snapshot: dict[str, Any] | None = None):
        self.plan, self.worker, self.skips = plan, worker, skips
        self.sequence = _ShardSequence(plan, epoch, worker, base_seed)
        self.rng = random.Random(_seed(base_seed, 3))
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
                    raise RuntimeError(f"rank {self.plan.rank} worker {self.worker}: no sample in its shards "
                                       f"{list(self.sequence.shards)}; skipped: {dict(self.skips)}")
                self.rng.shuffle(self.buffer)
                self.draining, self.buffer = self.buffer, []
                self.position, self.pass_samples = (self.position[0] + 1, 0, 0), 0
                continue
            if self.plan.shuffle_buffer <= 1:
                return item[1]
            if len(self.buffer) < self.plan.shuffle_buffer:
                self.buffer.append(item)
                continue
            index = self.rng.randrange(self.plan.shuffle_buffer)
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
                self._shard = tar_samples(url, self.skips)
            sample = next(self._shard, None)
            if sample is not None:
                self.position = (pass_index, shard_index, sample_index + 1)
                self.pass_samples += 1
                return (pass_index, shard_index, sample_index), sample
            self._shard = None
            self.empty_shards = 0 if sample_index else self.empty_shards + 1
            limit = 2 * len(self.plan.urls) + 2
            if self.plan.resampled and self.empty_shards >= limit:
                raise RuntimeError(f"{self.empty_shards} shards in a row gave no sample (last: "
                                   f"{self.sequence.url(pass_index, shard_index)}); skipped: {dict(self.skips)}")
            self.position = (pass_index, shard_index + 1, 0)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able description of the reader's state: origins, not samples."""
        version, internal, gauss = self.rng.getstate()
        return {"position": list(self.position), "buffer": [list(o) for o, _ in self.buffer],
                "draining": [list(o) for o, _ in self.draining], "rng": [version, list(internal), gauss],
                "empty_shards": self.empty_shards, "pass_samples": self.pass_samples}

    def _restore(self, snapshot: dict[str, Any]) -> None:
        version, internal, gauss = snapshot["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.empty_shards, self.pass_samples = int(snapshot["empty_shards"]), int(snapshot["pass_samples"])
        buffer = [tuple(o) for o in snapshot["buffer"]]
        draining = [tuple(o) for o in snapshot["draining"]]
        samples = self._fetch(set(buffer) | set(draining))
        self.buffer = [(o, samples[o]) for o in buffer]
        self.draining = [(o, samples[o]) for o in draining]
        pass_index, shard_index, sample_index = self.position = tuple(snapshot["position"])
        if sample_index:  # reopen the shard being read and skip what was read of it
            url = self.sequence.url(pass_index, shard_index)
            self._shard = tar_samples(url, self.skips)
            for _ in range(sample_index):
                if next(self._shard, None) is None:
                    raise RuntimeError(f"{url} holds fewer than the {sample_index} samples read from it before the "
                                       "checkpoint: the shard changed")

    def _fetch(self, origins: set[Origin]) -> dict[Origin, dict[str, Any]]:
        """Re-read the samples at ``origins``, one pass over each shard they are in."""
        found: dict[Origin, dict[str, Any]] = {}
        for pass_index, shard_index in sorted({o[:2] for o in origins}):
            wanted = {o[2] for o in origins if o[:2] == (pass_index, shard_index)}
            url = self.sequence.url(pass_index, shard_index)
            for index, sample in enumerate(tar_samples(url, Counter())):  # skips were counted the first time
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


# --- one worker's batches -----------------------------------------------------------------------------


@dataclass
class WorkerState:
    """A worker's position in the current epoch, as of the last batch the caller consumed."""

    pulled: int = 0  # raw samples taken from the shuffle buffer (they seed the augmentations)
    batches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    reader: dict[str, Any] | None = None  # _RawReader.snapshot(); None before the first batch


@dataclass(frozen=True)
class _StreamPlan:
    """Everything a DataLoader worker needs to produce batches from the loader's position on (picklable)."""

    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers of this rank
    resampled: bool
    urls: tuple[str, ...]
    weights: tuple[float, ...]
    batches_per_epoch: int
    start_epoch: int
    start_batches: int  # batches of start_epoch already consumed
    starts: tuple[WorkerState, ...]  # each logical worker's position in start_epoch
    batch_size: int
    shuffle_buffer: int
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    start_epoch_urls: tuple[str, ...] | None = None  # the shards an approximate resume left to start_epoch
    start_epoch_batches: int | None = None  # its remaining batches
    salt: int = 0  # nonzero after an approximate resume: start_epoch's streams are fresh ones

    def epoch_batches(self, epoch: int) -> int:
        if epoch == self.start_epoch and self.start_epoch_batches is not None:
            return self.start_epoch_batches
        return self.batches_per_epoch

    def quota(self, epoch: int, worker: int) -> int:
        """Batches of logical ``worker`` in ``epoch``: batch j of an epoch is worker ``j % workers``'s."""
        batches = self.epoch_batches(epoch)
        return batches // self.workers + (worker < batches % self.workers)

    def _salted(self, epoch: int) -> tuple[int, ...]:
        return (self.salt,) if self.salt and epoch == self.start_epoch else ()

    def worker_seed(self, epoch: int, worker: int) -> int:
        """The seed of everything random in a logical worker's part of an epoch."""
        return _seed(self.seed, epoch, self.rank, worker, *self._salted(epoch))

    def assignment(self, epoch: int) -> tuple[tuple[str, ...], ...]:
        """Epoch mode: the epoch's shard order dealt round-robin to all ranks' workers; this rank's part."""
        urls = self.start_epoch_urls if epoch == self.start_epoch and self.start_epoch_urls else self.urls
        order = list(urls)
        random.Random(_seed(self.seed, epoch, *self._salted(epoch))).shuffle(order)
        slots = self.world_size * self.workers
        return tuple(tuple(order[self.rank * self.workers + w::slots]) for w in range(self.workers))


def _worker_batches(plan: _StreamPlan, epoch: int, worker: int,
                    start: WorkerState) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """The rest of logical ``worker``'s part of ``epoch`` from ``start``: (images, tokens, tag) batches.

    The tag locates the batch (epoch, worker, counts) and carries the reader's snapshot after it.
    """
    quota = plan.quota(epoch, worker)
    base_seed = plan.worker_seed(epoch, worker)
    skips: Counter = Counter(start.skipped)
    raw = _RawReader(plan, epoch, worker, base_seed, skips, start.reader)
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
                raise RuntimeError(f"rank {plan.rank} worker {worker}: {consecutive_skips} unusable samples in a "
                                   f"row (last from {sample.get('__url__')}); skipped: {dict(skips)}") from None
            continue
        consecutive_skips = 0
        with _seeded(base_seed + pulled):
            images.append(plan.transform(image))
        captions.append(caption)
        if len(images) == plan.batch_size:
            batches += 1
            tag = {"epoch": epoch, "worker": worker, "pulled": pulled, "batches": batches, "skipped": dict(skips),
                   "reader": raw.snapshot()}
            yield torch.stack(images), plan.tokenizer(captions), tag
            images, captions = [], []


def _slot_batches(plan: _StreamPlan, slot: int, slots: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """DataLoader worker ``slot``'s batches, epoch after epoch, without end.

    The DataLoader takes batch k of its (endless) iteration from worker ``k % slots``: counted from
    the loader's start position, the k-th batch of the run's sequence of epochs, and batch ``j`` of an
    epoch belongs to logical worker ``j % slots``. So within one epoch a slot always plays one
    logical worker, and at each epoch boundary it moves on to the logical worker its next index
    falls to.
    """
    epoch, index = plan.start_epoch, plan.start_batches + slot  # this slot's next batch: index in epoch
    while True:
        while index >= plan.epoch_batches(epoch):
            index -= plan.epoch_batches(epoch)
            epoch += 1
        worker = index % slots
        start = plan.starts[worker] if epoch == plan.start_epoch else WorkerState()
        if start.batches != index // slots:
            raise RuntimeError(f"loader state is inconsistent: worker {worker} consumed {start.batches} batches, "
                               f"its next one is batch {index} of the epoch")
        served = 0
        for batch in _worker_batches(plan, epoch, worker, start):
            served += 1
            yield batch
        index += served * slots


class _Stream(IterableDataset):
    """The endless batch stream of one rank; each DataLoader worker yields its slot's share."""

    def __init__(self, plan: _StreamPlan):
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        return _slot_batches(self.plan, info.id if info is not None else 0, self.plan.workers)


# --- the loader -------------------------------------------------------------------------------------


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
    ):
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, shuffle_buffer >= 0; got {batch_size}, "
                             f"{num_workers}, {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        sources = parse_spec(spec)
        self.urls = tuple(url for source in sources for url in source.urls)
        self.weights = tuple(source.weight for source in sources for _ in source.urls)
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.resampled, self.shuffle_buffer, self.rank, self.world_size = resampled, shuffle_buffer, rank, world_size
        self.pin_memory = pin_memory
        self._workers = max(1, num_workers)
        if not resampled:
            if any(weight != 1.0 for weight in self.weights):
                raise UserError(f"shard spec {spec!r}: sampling weights need resampled mode")
            if len(self.urls) < world_size * self._workers:
                raise UserError(
                    f"epoch mode needs at least world_size x workers = {world_size} x {self._workers} shards, "
                    f"{spec!r} has {len(self.urls)}; use resampled mode, fewer workers, or more shards")
        self.num_samples = num_samples if num_samples is not None else count_samples(list(self.urls))
        self.batches_per_epoch = self.num_samples // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise UserError(f"{self.num_samples} samples make no full batch of {batch_size} on each of "
                            f"{world_size} rank(s)")
        self._digest = hashlib.sha1("\n".join(self.urls).encode()).hexdigest()
        self._epoch, self._batches = 0, 0
        self._epoch_urls: tuple[str, ...] | None = None  # set by an approximate resume, for the current epoch
        self._epoch_batches: int | None = None
        self._salt = 0
        self._positions = [WorkerState() for _ in range(self._workers)]
        self._skipped_before: Counter = Counter()
        self._stream: Iterator[tuple[torch.Tensor, torch.Tensor, dict]] | None = None
        if state is not None:
            self.load_state_dict(state)

    # -- iteration --

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._stream is None:
            self._stream = iter(DataLoader(_Stream(self._plan()), batch_size=None, num_workers=self.num_workers,
                                           pin_memory=self.pin_memory))
        while True:
            images, tokens, tag = next(self._stream)
            self._record(tag)
            epoch_ended = self._batches == self._current_epoch_batches()
            if epoch_ended:
                self._next_epoch()
            yield images, tokens
            if epoch_ended and not self.resampled:
                return

    def _record(self, tag: dict[str, Any]) -> None:
        """Note the position a batch reached; the batches arrive in the order :func:`_slot_batches` deals."""
        expected = (self._epoch, self._batches % self._workers)
        if (tag["epoch"], tag["worker"]) != expected:
            raise RuntimeError(f"batch from epoch {tag['epoch']} worker {tag['worker']} arrived where epoch "
                               f"{expected[0]} worker {expected[1]} was due")
        self._positions[tag["worker"]] = WorkerState(tag["pulled"], tag["batches"], tag["skipped"], tag["reader"])
        self._batches += 1

    def _current_epoch_batches(self) -> int:
        return self._epoch_batches if self._epoch_batches is not None else self.batches_per_epoch

    def _plan(self) -> _StreamPlan:
        return _StreamPlan(
            seed=self.seed, rank=self.rank, world_size=self.world_size, workers=self._workers,
            resampled=self.resampled, urls=self.urls, weights=self.weights, batches_per_epoch=self.batches_per_epoch,
            start_epoch=self._epoch, start_batches=self._batches, starts=tuple(self._positions),
            batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer, transform=self.transform,
            tokenizer=self.tokenizer, start_epoch_urls=self._epoch_urls, start_epoch_batches=self._epoch_batches,
            salt=self._salt,
        )

    def _next_epoch(self) -> None:
        for position in self._positions:
            self._skipped_before.update(position.skipped)
        self._epoch, self._batches = self._epoch + 1, 0
        self._epoch_urls, self._epoch_batches, self._salt = None, None, 0
        self._positions = [WorkerState() for _ in range(self._workers)]

    # -- bookkeeping --

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, over all workers, up to the last batch consumed."""
        total = Counter(self._skipped_before)
        for position in self._positions:
            total.update(position.skipped)
        return dict(total)

    def _layout(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "workers": self._workers,
                "batch_size": self.batch_size, "resampled": self.resampled, "shuffle_buffer": self.shuffle_buffer,
                "shards": len(self.urls), "shards_digest": self._digest, "first_shard": self.urls[0],
                "last_shard": self.urls[-1], "batches_per_epoch": self.batches_per_epoch}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the batches consumed so far (pass as ``state=`` to resume)."""
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "batches": self._batches,
            "workers": [{"pulled": p.pulled, "batches": p.batches, "skipped": dict(p.skipped), "reader": p.reader}
                        for p in self._positions],
            "skipped_before": dict(self._skipped_before), "layout": self._layout(),
            "epoch_urls": None if self._epoch_urls is None else list(self._epoch_urls),
            "epoch_batches": self._epoch_batches, "salt": self._salt,
        }

    def layout_differences(self, state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Setup keys whose value differs in a saved state, as ``{key: (now, saved)}``; empty: exact resume."""
        _check_version(state)
        return {key: (value, state["layout"].get(key)) for key, value in self._layout().items()
                if state["layout"].get(key) != value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where a loader of the same setup was (see :meth:`state_dict`)."""
        mismatched = self.layout_differences(state)
        if mismatched:
            details = ", ".join(f"{k}: now {now!r}, saved {saved!r}" for k, (now, saved) in mismatched.items())
            raise UserError(f"loader state was saved with a different setup, cannot resume exactly; {details}")
        workers = [WorkerState(int(w["pulled"]), int(w["batches"]), {str(k): int(v) for k, v in w["skipped"].items()},
                               w["reader"]) for w in state["workers"]]
        if sum(w.batches for w in workers) != state["batches"]:
            raise ValueError("loader state is inconsistent: worker batch counts do not add up to 'batches'")
        self._epoch, self._batches, self._positions = int(state["epoch"]), int(state["batches"]), workers
        self._skipped_before = Counter({str(k): int(v) for k, v in state["skipped_before"].items()})
        self._epoch_urls = None if state["epoch_urls"] is None else tuple(state["epoch_urls"])
        self._epoch_batches, self._salt = state["epoch_batches"], int(state["salt"])

    # -- resuming after the cluster changed --

    def resume_approximately(self, saved: list[dict[str, Any]], accept_changed_shards: bool = False) -> str:
        """Continue a run saved with another world size, worker count, batch size or sample count.

        ``saved`` holds every old rank's state. The epoch and the skip counts carry over; the rest
        of the epoch is the samples it had left, in batches of the new shape: in epoch mode drawn
        from the shards no old worker had started, re-dealt to the new workers; in resampled mode
        from fresh streams. Returns the warning to show. A shard list other than the saved one is
        a UserError unless ``accept_changed_shards``; then the rest of the epoch is dealt from the
        new list.
        """
        for state in saved:
            _check_version(state)
        old = saved[0]["layout"]
        changed_shards = old["shards_digest"] != self._digest
        if changed_shards and not accept_changed_shards:
            same_ends = (old["shards"], old["first_shard"], old["last_shard"]) == (len(self.urls), self.urls[0],
                                                                                   self.urls[-1])
            raise UserError(
                f"data.train lists other shards than the checkpoint's run: now {len(self.urls)} "
                f"({self.urls[0]} .. {self.urls[-1]}), then {old['shards']} ({old['first_shard']} .. "
                f"{old['last_shard']}){', the same ends with others between' if same_ends else ''}; set "
                "data.accept_changed_shards=true to continue with the new list (approximate resume)")
        epoch = int(saved[0]["epoch"])
        consumed = sum(int(state["batches"]) for state in saved) * old["batch_size"]
        epoch_samples = (saved[0]["epoch_batches"] or old["batches_per_epoch"]) * old["batch_size"] * len(saved)
        left = max(0, epoch_samples - consumed) // (self.batch_size * self.world_size)
        urls: tuple[str, ...] | None = None
        if not self.resampled:
            finished = set() if changed_shards else _finished_shards(saved, self.urls, self.weights)
            urls = tuple(url for url in self.urls if url not in finished)
            if len(urls) < self.world_size * self._workers:
                left = 0
        if self.rank == 0:  # the old runs' skip counts, counted once over the ranks
            for state in saved:
                self._skipped_before.update(state["skipped_before"])
                for worker in state["workers"]:
                    self._skipped_before.update(worker["skipped"])
        was = (f"world_size {old['world_size']}, {old['workers']} workers, batch_size {old['batch_size']}, "
               f"{old['shards']} shards")
        now = f"world_size {self.world_size}, {self._workers} workers, batch_size {self.batch_size}, " \
              f"{len(self.urls)} shards"
        header = (f"resuming approximately: the checkpoint was written with {was}, this run has {now}. The model, "
                  "optimizer, scheduler and step are restored exactly; the data position is not: ")
        if left < 1:
            self._epoch = epoch + 1
            return header + f"the rest of epoch {epoch} is skipped, epoch {epoch + 1} starts now."
        self._epoch, self._epoch_batches, self._epoch_urls = epoch, left, urls
        self._salt = max(int(state["salt"]) for state in saved) + 1
        if self.resampled:
            return header + f"epoch {epoch} continues for its remaining {left} batches from fresh shard streams."
        return header + (f"epoch {epoch} continues for its remaining {left} batches with the {len(urls)} of "
                         f"{len(self.urls)} shards no worker had started, re-dealt to the new workers (samples in "
                         "the old shuffle buffers and in shards being read may be missed or repeated this epoch).")


def _check_version(state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise UserError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: the checkpoint comes "
                        "from another mmggem version")


def _finished_shards(saved: list[dict[str, Any]], urls: tuple[str, ...], weights: tuple[float, ...]) -> set[str]:
    """Epoch mode: the shards the saved ranks' workers had read to the end in the saved epoch."""
    finished: set[str] = set()
    for state in saved:
        layout = state["layout"]
        plan = _StreamPlan(
            seed=layout["seed"], rank=layout["rank"], world_size=layout["world_size"], workers=layout["workers"],
            resampled=False, urls=urls, weights=weights, batches_per_epoch=layout["batches_per_epoch"],
            start_epoch=int(state["epoch"]), start_batches=int(state["batches"]), starts=(),
            batch_size=layout["batch_size"], shuffle_buffer=layout["shuffle_buffer"], transform=None,
            tokenizer=None, start_epoch_urls=None if state["epoch_urls"] is None else tuple(state["epoch_urls"]),
            start_epoch_batches=state["epoch_batches"], salt=int(state["salt"]))
        for worker, position in enumerate(state["workers"]):
            if position["reader"] is None:
                continue
            pass_index, shard_index, _ = position["reader"]["position"]
            sequence = _ShardSequence(plan, plan.start_epoch, worker, plan.worker_seed(plan.start_epoch, worker))
            done = len(sequence.shards) if pass_index > 0 else shard_index
            finished.update(sequence.url(0, index) for index in range(done))
    return finished
