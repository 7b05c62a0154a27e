"""Build training shards and CLIP_benchmark evaluation sets from folders and caption files.

The writers of both layouts, the input checks they share, and the builders of the ``mmggem data``
commands, each writing one output directory:

- ``mmggem.data.captions.build_from_captions``: images + a CSV/TSV/JSONL file of (file name, caption)
  rows -> training shards (``layout="training"``), or a CLIP_benchmark retrieval set
  (``layout="retrieval"``, several rows per image allowed);
- ``build_classification_set``: one sub-folder per class -> a CLIP_benchmark classification set.

Every builder writes into a hidden temporary directory beside OUT and renames it to OUT only when
everything is written, so an interrupted run never leaves a complete-looking OUT. A non-empty OUT is
refused unless ``overwrite``. Inputs that cannot be used (a missing or unreadable image, an empty
caption, ...) are skipped and listed, with the reason, in the returned ``WriteReport``.

Images that are already JPEG, PNG or WebP are stored byte for byte (the extension follows the real
format, not the file name); other formats Pillow reads (BMP, GIF, TIFF, ...) are re-encoded as PNG.
"""
from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..errors import MissingPathError, UsageError, UserError
from ..fileio import atomic_directory
from . import formats
from .classnames import class_folders, imagenet_classnames, openai_imagenet_templates, read_classnames
from .skips import skip_reason

_NATIVE_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEG + extra frames
_TAR_MTIME = 0.0  # fixed member times: the same input gives byte-identical shards


@dataclass(frozen=True)
class EncodedImage:
    """An image as stored in a shard: its extension (a formats.IMAGE_EXTENSIONS member) and bytes."""

    ext: str
    data: bytes


@dataclass(frozen=True)
class TrainingSample:
    image: EncodedImage
    caption: str
    meta: dict | None = None


@dataclass(frozen=True)
class ClassSample:
    image: EncodedImage
    label: int


@dataclass(frozen=True)
class RetrievalSample:
    image: EncodedImage
    captions: list[str]


@dataclass(frozen=True)
class Skipped:
    """An input left out: what it was, and why (one of :data:`mmggem.data.skips.SKIP_REASONS`)."""

    item: str
    reason: str

    def __post_init__(self) -> None:
        skip_reason(self.reason)

TRAINING_SHARDS = "training shards"
"""The kind of a report on webdataset training shards (its summary names the ``data.train`` pattern)."""


@dataclass
class WriteReport:
    """What a builder wrote and what it skipped and why."""

    out: Path
    kind: str
    samples: int = 0
    shards: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def skip_lines(self, max_items: int = 5) -> list[str]:
        """One ``skipped N (reason): first, items, ...`` per skip reason, reasons sorted."""
        lines = []
        for reason, count in sorted(self.skipped_by_reason().items()):
            items = [s.item for s in self.skipped if s.reason == reason]
            shown = ", ".join(items[:max_items]) + (", ..." if len(items) > max_items else "")
            lines.append(f"skipped {count} ({reason}): {shown}")
        return lines

    def summary(self, max_items: int = 5) -> str:
        """Human-readable lines: counts, location, then each skip reason with a few examples."""
        lines = [f"wrote {self.kind}: {self.samples} samples in {self.shards} shard(s) to {self.out}"]
        if self.kind == TRAINING_SHARDS and self.shards:
            lines.append(f"train on them with data.train='{self.out}/{{00000..{self.shards - 1:05d}}}.tar'")
        return "\n".join(lines + [f"  {line}" for line in self.skip_lines(max_items)])


class ImageError(ValueError):
    """An input image that cannot be stored; the message is the skip reason."""


class NothingToWrite(UserError):
    """No usable sample reached a writer, so it wrote nothing; ``what`` names the kind of sample."""

    def __init__(self, what: str, directory: Path) -> None:
        super().__init__(f"no usable {what} to write into {directory}")
        self.what = what


class _Shards:
    """webdataset's ShardWriter, numbering shards by ``pattern``, with a count of samples per shard.

    The counts are what ``sizes.json`` and ``nshards.txt`` record.
    """

    def __init__(self, directory: Path, pattern: str, per_shard: int):
        if per_shard < 1:
            raise UsageError(f"samples per shard must be at least 1, got {per_shard}")
        self.counts: Counter[str] = Counter()
        self._writer = wds.ShardWriter(str(directory / pattern), maxcount=per_shard, maxsize=float("inf"),
                                       verbose=0, mtime=_TAR_MTIME)

    def write(self, sample: dict) -> None:
        self._writer.write(sample)
        self.counts[Path(self._writer.fname).name] += 1

    def close(self) -> None:
        self._writer.close()


# --- writing samples into a directory ------------------------------------------------------------


def write_training_shards(
    directory: Path, samples: Iterable[TrainingSample], samples_per_shard: int = formats.DEFAULT_SAMPLES_PER_SHARD
) -> dict[str, int]:
    """Write training shards and ``sizes.json`` into an existing ``directory``; return shard name -> count."""
    shards = _Shards(Path(directory), formats.TRAIN_SHARD_PATTERN, samples_per_shard)
    try:
        for index, sample in enumerate(samples):
            record = {formats.KEY_FIELD: f"{index:09d}", sample.image.ext: sample.image.data,
                      formats.CAPTION_KEY: sample.caption}
            if sample.meta is not None:
                record[formats.JSON_KEY] = sample.meta
            shards.write(record)
    finally:
        shards.close()
    if not shards.counts:
        raise NothingToWrite("(image, caption) pair", directory)
    (Path(directory) / formats.SIZES_FILE).write_text(json.dumps(shards.counts, indent=1) + "\n")
    return shards.counts


def _write_eval_shards(directory: Path, records: Iterable[dict], samples_per_shard: int) -> dict[str, int]:
    split_dir = Path(directory) / formats.EVAL_SPLIT
    split_dir.mkdir(parents=True, exist_ok=True)
    shards = _Shards(split_dir, formats.EVAL_SHARD_PATTERN, samples_per_shard)
    try:
        for index, record in enumerate(records):
            shards.write({formats.KEY_FIELD: formats.eval_sample_key(index), **record})
    finally:
        shards.close()
    if not shards.counts:
        raise NothingToWrite("sample", directory)
    (split_dir / formats.NSHARDS_FILE).write_text(f"{len(shards.counts)}\n")
    return shards.counts


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_classification_set(
    directory: Path,
    samples: Iterable[ClassSample],
    classnames: Sequence[str],
    templates: Sequence[str] = formats.DEFAULT_TEMPLATES,
    samples_per_shard: int = formats.DEFAULT_SAMPLES_PER_SHARD,
) -> dict[str, int]:
    """Write a CLIP_benchmark classification set into an existing ``directory``; return shard name -> count."""
    formats.check_templates(templates, "zero-shot templates")
    for name in classnames:
        if not name.strip() or "\n" in name:
            raise UserError(f"class name {name!r} must be non-empty and on one line")
    records = ({sample.image.ext: sample.image.data, formats.LABEL_KEY: int(sample.label)} for sample in samples)
    counts = _write_eval_shards(directory, records, samples_per_shard)
    _write_lines(Path(directory) / formats.DATASET_TYPE_FILE, [formats.CLASSIFICATION])
    _write_lines(Path(directory) / formats.CLASSNAMES_FILE, list(classnames))
    _write_lines(Path(directory) / formats.TEMPLATES_FILE, list(templates))
    return counts


def write_retrieval_set(
    directory: Path, samples: Iterable[RetrievalSample], samples_per_shard: int = formats.DEFAULT_SAMPLES_PER_SHARD
) -> dict[str, int]:
    """Write a CLIP_benchmark retrieval set into an existing ``directory``; return shard name -> count."""
    records = ({sample.image.ext: sample.image.data, formats.CAPTION_KEY: formats.join_captions(sample.captions)}
               for sample in samples)
    counts = _write_eval_shards(directory, records, samples_per_shard)
    _write_lines(Path(directory) / formats.DATASET_TYPE_FILE, [formats.RETRIEVAL])
    return counts


# --- reading inputs ------------------------------------------------------------------------------


def encode_image_file(path: Path) -> EncodedImage:
    """Read an image file for a shard: JPEG/PNG/WebP bytes as they are, other formats as PNG.

    Raises ImageError (message = skip reason) for a missing or unreadable file, undecodable bytes, or an
    image over Pillow's decompression-bomb limit.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("missing_file") from None
    except OSError:
        raise ImageError("unreadable_file") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in _NATIVE_FORMATS:
                return EncodedImage(_NATIVE_FORMATS[image.format], data)
            buffer = io.BytesIO()
            try:
                image.save(buffer, format="PNG")
            except (OSError, KeyError, ValueError):  # modes PNG cannot hold, e.g. CMYK or float
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
            return EncodedImage("png", buffer.getvalue())
    except Image.DecompressionBombError:
        raise ImageError("image_too_large") from None
    except Exception:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...) for bad bytes
        raise ImageError("corrupt_image") from None


def _image_files(directory: Path) -> list[Path]:
    """Non-hidden files under ``directory``, recursively, sorted."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _require_dir(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingPathError(f"{directory} is not a directory of images")
    return directory


def progress_bar(items: Iterable, desc: str, total: int, enabled: bool = True) -> Iterable:
    """``items`` with a tqdm bar (images per second, ETA) on stderr when ``enabled``."""
    return tqdm(items, desc=desc, total=total, unit="img", disable=not enabled, dynamic_ncols=True)


def _encoded(images: Path, name: str, skipped: list[Skipped]) -> EncodedImage | None:
    try:
        return encode_image_file(images / name)
    except ImageError as error:
        skipped.append(Skipped(name, str(error)))
        return None


def _write_atomically(report: WriteReport, overwrite: bool, write: Callable[[Path], dict[str, int]]) -> WriteReport:
    """Run ``write`` on a staging folder that becomes ``report.out`` only when complete; count what it wrote.

    When no input was usable the error names ``report.out`` (not the staging folder, which is gone) and
    why each input was skipped.
    """
    try:
        with atomic_directory(report.out, overwrite) as tmp:
            counts = write(tmp)
    except NothingToWrite as error:
        reasons = "; ".join(report.skip_lines()) or "the input lists none"
        raise UserError(f"nothing written to {report.out}: no usable {error.what} ({reasons})") from None
    report.samples, report.shards = sum(counts.values()), len(counts)
    return report


# --- builders (one per CLI command) ------------------------------------------------------------


def build_classification_set(
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    classnames: Sequence[str] | str | os.PathLike | None = None,
    templates: Sequence[str] | None = None,
    samples_per_shard: int = formats.DEFAULT_SAMPLES_PER_SHARD,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteReport:
    """A CLIP_benchmark classification set from a folder with one sub-folder of images per class.

    Labels follow the sorted folder names. Class names are ``classnames`` (a list or a file, one per
    folder in that order), else ImageNet's for WordNet-id folders, else the folder names; templates
    are ``templates``, else OpenAI's 80 for WordNet-id folders, else formats.DEFAULT_TEMPLATES
    (see :mod:`mmggem.data.classnames`).
    """
    images = _require_dir(images)
    classes = class_folders(images)
    imagenet = imagenet_classnames([folder.name for _, folder in classes])
    if templates is None:
        templates = openai_imagenet_templates() if imagenet else formats.DEFAULT_TEMPLATES
    templates = list(templates)
    formats.check_templates(templates, "zero-shot templates")
    if isinstance(classnames, (str, os.PathLike)):
        classnames = read_classnames(classnames, len(classes))
    elif classnames is not None and len(classnames) != len(classes):
        raise UserError(f"{len(classnames)} class names for {len(classes)} class folders in {images}")
    names = list(classnames or imagenet or [name for name, _ in classes])
    report = WriteReport(Path(out), "classification set")
    report.skipped.extend(Skipped(p.name, "not_in_class_folder") for p in images.iterdir()
                          if p.is_file() and not p.name.startswith("."))
    files = [(label, path) for label, (_, folder) in enumerate(classes) for path in _image_files(folder)]

    def samples() -> Iterator[ClassSample]:
        for label, path in progress_bar(files, "classification set", len(files), progress):
            image = _encoded(images, str(path.relative_to(images)), report.skipped)
            if image is not None:
                yield ClassSample(image, label)

    return _write_atomically(report, overwrite,
                             lambda tmp: write_classification_set(tmp, samples(), names, templates, samples_per_shard))
