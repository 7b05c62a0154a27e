"""Reading a CLIP_benchmark-layout evaluation set from a local folder, split over processes.

The layout (see :mod:`mmggem.data.formats`) is the one
``clip_benchmark.datasets.builder.build_wds_dataset`` reads. Samples are
grouped from tar members by webdataset's own rules and grouping, which the
training loader shares (:mod:`mmggem.data.tars`), and the image is the first
of ``webp``, ``png``, ``jpg``, ``jpeg`` present, decoded as webdataset's
``"pil"`` image handler does (open, load, convert to RGB: :func:`mmggem.data.images.decode_image`
with ``exact=True``).

Why not a webdataset pipeline: a set is scanned once, reading only tar headers
and the small ``cls`` / ``txt`` members, into a list of samples with the byte
offset of each image. That gives the exact sample count (progress with ETA),
validates labels before any model work, and lets each process and loader worker
read and decode only the images it encodes, whatever the number of shards.
Processes take contiguous blocks of the sample list; gathering their results in
index order gives exactly the features one process would compute.

Samples that cannot be used are skipped and counted by reason (``no_image``,
``no_label``, ``no_caption``, ``corrupt_image``: the vocabulary of
:mod:`mmggem.data.skips`); anything that would make a number wrong
(a malformed label, a truncated shard, duplicate members) is an error naming the
shard and key.
"""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import formats
from ..data.images import decode_image
from ..data.skips import skip_reason
from ..data.tars import group_samples
from ..errors import MissingPathError, UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

# webdataset's rules: key = everything up to the first dot of the base name; "__x__" members are metadata.


@dataclass(frozen=True)
class Sample:
    """One usable sample of a set: where its image bytes lie, and its label or captions."""

    shard: Path
    key: str
    image_offset: int
    image_size: int
    label: int | None = None
    captions: tuple[str, ...] | None = None

    @property
    def where(self) -> str:
        """``shard:key``, the way errors and skip reports name a sample."""
        return f"{self.shard}:{self.key}"


@dataclass
class Skips:
    """Samples left out, counted by reason, with the first one of each reason for the report."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[skip_reason(reason)] += 1
        self.first.setdefault(reason, where)

    def update(self, other: "Skips") -> None:
        self.counts.update(other.counts)
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)

    def describe(self) -> str:
        """One line per reason: count, reason and the first sample skipped for it."""
        return "; ".join(f"{n} x {reason} (first: {self.first[reason]})" for reason, n in sorted(self.counts.items()))


@dataclass
class EvalSet:
    """A scanned evaluation set: its type, its own class names / templates (None when absent), its samples."""

    root: Path
    dataset_type: str
    samples: list[Sample]
    skips: Skips
    classnames: list[str] | None
    templates: list[str] | None

    @property
    def name(self) -> str:
        """The set's name: its folder's name."""
        return self.root.resolve().name


def open_eval_set(root: str | Path, split: str = formats.EVAL_SPLIT) -> EvalSet:
    """Scan the set in ``root`` (headers and labels or captions only; no image is decoded).

    Raises MissingPathError for a missing folder, ``nshards.txt`` or shard, and UserError
    for a set with no usable sample or a sample that would make a metric wrong.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingPathError(f"evaluation set folder not found: {root}")
    dataset_type = formats.read_dataset_type(root)
    nshards = formats.read_nshards(root, split)
    samples: list[Sample] = []
    skips = Skips()
    for index in range(nshards):
        shard = root / split / formats.eval_shard_name(index)
        if not shard.is_file():
            raise MissingPathError(f"{shard} is missing ({root / split / formats.NSHARDS_FILE} says {nshards} shards)")
        for key, members, tar in _grouped_members(shard):
            _add_sample(shard, key, members, tar, dataset_type, samples, skips)
    if not samples:
        detail = f" ({skips.describe()})" if skips.counts else ""
        raise UserError(f"{root / split}: no usable sample in {nshards} shard(s){detail}")
    return EvalSet(
        root=root,
        dataset_type=dataset_type,
        samples=samples,
        skips=skips,
        classnames=_optional_lines(root / formats.CLASSNAMES_FILE),
        templates=_optional_lines(root / formats.TEMPLATES_FILE),
    )


def _optional_lines(path: Path) -> list[str] | None:
    return formats.read_lines(path) if path.is_file() else None


def _grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """Yield ``(key, {extension: member}, tar)`` per sample of ``shard``, grouped by webdataset's rules.

    Only tar headers are read here; a member ending past the end of the file, a corrupt header
    or a duplicate member is an error naming the shard.
    """
    shard_bytes = shard.stat().st_size
    try:
        tar = tarfile.open(shard, mode="r:")
    except tarfile.TarError as error:
        raise UserError(f"{shard}: not a readable uncompressed tar file ({error})") from None

    def members() -> Iterator[tuple[str, tarfile.TarInfo]]:
        for info in tar:
            if not info.isreg():
                continue
            if info.offset_data + info.size > shard_bytes:
                raise UserError(f"{shard}: truncated; member {info.name!r} ends past the end of the file")
            yield info.name, info

    def duplicate(key: str, name: str) -> None:
        raise UserError(f"{shard}: sample {key!r} has two members with the extension of {name!r}")

    with tar:
        try:
            for sample in group_samples(members(), str(shard), on_duplicate=duplicate):
                yield sample[formats.KEY_FIELD], {k: v for k, v in sample.items() if not k.startswith("__")}, tar
        except tarfile.TarError as error:
            raise UserError(f"{shard}: corrupt tar file ({error})") from None
        _check_end_of_archive(shard, tar.offset)


def _check_end_of_archive(shard: Path, end: int) -> None:
    """Raise unless the bytes after the last member are an end-of-archive marker (zero blocks).

    ``tarfile`` stops silently at a cut header, so a truncated download would otherwise
    look like a shorter shard.
    """
    with open(shard, "rb") as f:
        f.seek(end)
        rest = f.read()
    if len(rest) < tarfile.BLOCKSIZE or rest.strip(b"\0"):
        raise UserError(f"{shard}: truncated or corrupt after byte {end} (no end-of-archive marker)")


def _add_sample(
    shard: Path,
    key: str,
    members: dict[str, tarfile.TarInfo],
    tar: tarfile.TarFile,
    dataset_type: str,
    samples: list[Sample],
    skips: Skips,
) -> None:
    where = f"{shard}:{key}"
    extension = formats.image_key(members)
    if extension is None:
        skips.add("no_image", where)
        return
    image = members[extension]
    place = dict(shard=shard, key=key, image_offset=image.offset_data, image_size=image.size)
    if dataset_type == formats.RETRIEVAL:
        if formats.CAPTION_KEY not in members:
            skips.add("no_caption", where)
            return
        text = _read_member(tar, members[formats.CAPTION_KEY])
        try:
            captions = formats.split_captions(text.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise UserError(f"{where}.{formats.CAPTION_KEY}: captions are not UTF-8 ({error})") from None
        samples.append(Sample(**place, captions=tuple(captions)))
    else:
        if formats.LABEL_KEY not in members:
            skips.add("no_label", where)
            return
        raw = _read_member(tar, members[formats.LABEL_KEY])
        try:
            label = int(raw)
        except ValueError:
            raise UserError(f"{where}.{formats.LABEL_KEY}: label {raw[:40]!r} is not an integer class index") from None
        samples.append(Sample(**place, label=label))


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(info)
    assert handle is not None  # regular files only reach here
    return handle.read()


def image_bytes(sample: Sample) -> bytes:
    """The encoded image of ``sample``, read with one seek into its shard."""
    with open(sample.shard, "rb") as f:
        f.seek(sample.image_offset)
        return f.read(sample.image_size)


def read_image(sample: Sample) -> PIL.Image.Image:
    """The image of ``sample`` as the evaluation decodes it (CLIP_benchmark's pixels), for showing it."""
    return decode_image(image_bytes(sample), exact=True)


class ImageDataset(Dataset):
    """Map-style dataset over a set's samples: ``(index, image tensor or None, failure or None)``.

    Each item reads only its image's bytes (one seek into the shard) and decodes them; an
    image that fails to decode yields ``None`` and the decoder's message, to be counted.
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Callable[[PIL.Image.Image], torch.Tensor]):
        self.samples = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        data = image_bytes(self.samples[index])
        try:
            image = decode_image(data, exact=True)  # CLIP_benchmark's pixels (see mmggem.data.images)
        except Exception as error:  # any decoder failure (PIL raises OSError, ValueError, SyntaxError, ...)
            return index, None, f"{type(error).__name__}: {error}"
        return index, self.preprocess(image), None


@dataclass
class Batch:
    """Images that decoded, their sample indices, and the failures of this batch."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str]]

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with ``pin_memory=True`` (CUDA), for faster copies to the GPU."""
        images = self.images.pin_memory() if self.images is not None else None
        return Batch(self.indices, images, self.failures)


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    """Stack the decoded images of a batch and keep the failures apart."""
    decoded = [(index, image) for index, image, _ in items if image is not None]
    return Batch(
        indices=[index for index, _ in decoded],
        images=torch.stack([image for _, image in decoded]) if decoded else None,
        failures=[(index, failure) for index, _, failure in items if failure is not None],
    )


class Processes:
    """This process's place among the evaluating processes, and gathering from all of them.

    Without an accelerator (or with one process) everything is local. With one, each
    process takes a contiguous block of the samples and ``gather`` concatenates the
    processes' lists in process order.
    """

    def __init__(self, accelerator: "Accelerator | None" = None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> list[int]:
        """The contiguous block of ``range(n)`` this process handles: accelerate's ``split_between_processes``
        (blocks in process order, differing in size by at most one)."""
        if self.accelerator is None:
            return list(range(n))
        with self.accelerator.split_between_processes(list(range(n))) as mine:
            return mine

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's ``items`` concatenated in process order, on every process."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def loader(
    evalset: EvalSet,
    preprocess: Callable[[PIL.Image.Image], torch.Tensor],
    processes: Processes,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of this process's block of samples, in sample order."""
    dataset = ImageDataset(evalset.samples, preprocess)
    return DataLoader(
        Subset(dataset, processes.part(len(dataset))),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
    )
