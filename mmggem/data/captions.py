"""Caption files in, training shards or a retrieval set out (``mmggem data captions`` / ``retrieval``).

A caption file is a CSV/TSV with a header row, or JSONL, of (file name, caption[, split]) rows.
Its rows are grouped by file name, so an image may have several captions; an optional split
column (Flickr8k's ``split``, COCO Karpathy's) lets one caption file serve the training shards and
the held-out retrieval set alike. The writing itself (shards, staging folder, reports) is
:mod:`mmggem.data.write`'s.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from ..errors import MissingPathError, UsageError, UserError
from . import formats
from .write import (TRAINING_SHARDS, EncodedImage, RetrievalSample, Skipped, TrainingSample, WriteReport, _encoded,
                    _image_files, _require_dir, _write_atomically, progress_bar, write_retrieval_set,
                    write_training_shards)

__all__ = ["CAPTION_FILE_SUFFIXES", "CaptionLayout", "CaptionRow", "build_from_captions", "read_caption_rows"]

CAPTION_FILE_SUFFIXES: dict[str, str] = {".csv": ",", ".tsv": "\t", ".jsonl": ""}
"""Accepted caption-file suffixes and their column delimiter (JSONL has none)."""


@dataclass(frozen=True)
class CaptionRow:
    """One (file name, caption) row of a caption file; ``line`` locates it for messages, ``split`` is the
    row's value in the split column (None when none was asked for)."""

    file: str
    caption: str
    line: int
    split: str | None = None


def read_caption_rows(
    path: str | os.PathLike, file_column: str = "file", caption_column: str = "caption",
    split_column: str | None = None,
) -> list[CaptionRow]:
    """Rows of a CSV/TSV (with a header row) or JSONL caption file, in file order.

    In JSONL a caption may also be a list of strings (one row per caption). With ``split_column``
    every row must have that column; its value is kept in :attr:`CaptionRow.split`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CAPTION_FILE_SUFFIXES:
        raise UserError(f"{path}: caption file must end in one of {', '.join(CAPTION_FILE_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MissingPathError(f"caption file not found: {path}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error})") from None
    columns = [file_column, caption_column] + ([split_column] if split_column else [])
    if suffix == ".jsonl":
        return _jsonl_rows(path, text, columns)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=CAPTION_FILE_SUFFIXES[suffix])
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: header has columns {reader.fieldnames}, missing {missing}; "
                        "name the columns with --file-column / --caption-column / --split-column")
    return [CaptionRow(str(row[file_column] or ""), str(row[caption_column] or ""), reader.line_num,
                       str(row[split_column] or "").strip() if split_column else None) for row in reader]


def _jsonl_rows(path: Path, text: str, columns: list[str]) -> list[CaptionRow]:
    file_column, caption_column, *split = columns
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not a JSON object ({error})") from None
        if not isinstance(obj, dict) or any(column not in obj for column in columns):
            raise UserError(f"{path}:{number}: expected an object with keys {', '.join(map(repr, columns))}; "
                            "name them with --file-column / --caption-column / --split-column")
        captions = obj[caption_column] if isinstance(obj[caption_column], list) else [obj[caption_column]]
        value = str(obj[split[0]]).strip() if split else None
        rows.extend(CaptionRow(str(obj[file_column]), str(caption), number, value) for caption in captions)
    return rows


def _group_captions(rows: list[CaptionRow], images: Path, skipped: list[Skipped],
                    split: str | None = None) -> dict[str, list[str]]:
    """File name -> its non-empty captions, in order of first appearance; skips empty captions and
    names left without one, and lists images under ``images`` that no row names. With ``split`` only
    rows of that split count, and an image that only other splits' rows name is skipped as ``other_split``."""
    grouped: dict[str, list[str]] = {}
    elsewhere: set[str] = set()
    for row in rows:
        if split is not None and row.split != split:
            elsewhere.add(row.file)
            continue
        if not row.file.strip():
            skipped.append(Skipped(f"line {row.line}", "empty_file_name"))
            continue
        grouped.setdefault(row.file, [])
        if not row.caption.strip():
            skipped.append(Skipped(f"{row.file} (line {row.line})", "empty_caption"))
        else:
            grouped[row.file].append(row.caption.strip())
    listed = {str((images / name).resolve()) for name in grouped}
    elsewhere = {str((images / name).resolve()) for name in elsewhere} - listed
    for path in _image_files(images):
        if (resolved := str(path.resolve())) not in listed:
            skipped.append(Skipped(str(path.relative_to(images)),
                                   "other_split" if resolved in elsewhere else "no_caption_row"))
    skipped.extend(Skipped(name, "no_caption") for name, captions in grouped.items() if not captions)
    return {name: captions for name, captions in grouped.items() if captions}



def _caption_groups(images: Path, captions: str | os.PathLike, columns: dict[str, str | None], split: str | None,
                    report: WriteReport) -> dict[str, list[str]]:
    """File name -> captions of the caption file (read and checked now, before anything is written);
    what cannot be used goes to ``report.skipped``. ``columns``: the file, caption and split columns."""
    rows = read_caption_rows(captions, columns["file"], columns["caption"], columns["split"])
    if split is not None and not any(row.split == split for row in rows):
        values = sorted({row.split for row in rows if row.split is not None})
        raise UserError(f"{captions}: no row has {columns['split']} == {split!r}; its values: {', '.join(values)}")
    return _group_captions(rows, images, report.skipped, split)


def _captioned_images(images: Path, grouped: dict[str, list[str]], report: WriteReport,
                      progress: bool) -> Iterator[tuple[str, EncodedImage, list[str]]]:
    """(file name, encoded image, its captions) per readable image; the rest go to ``report.skipped``."""
    for name in progress_bar(list(grouped), report.kind, len(grouped), progress):
        image = _encoded(images, name, report.skipped)
        if image is not None:
            yield name, image, grouped[name]


def _caption_rounds(images: Path, grouped: dict[str, list[str]], report: WriteReport,
                    progress: bool) -> Iterator[TrainingSample]:
    """One training sample per (image, caption) pair, in rounds: every image with its first caption,
    then every image with its second, and so on.

    Each pair is a sample, so an epoch sees every caption once and the loader needs no rule for
    choosing one caption of several (open_clip's loader and img2dataset's layout expect one ``txt``).
    In rounds, the copies of an image lie a whole round apart in the shards: a shuffle buffer then
    rarely puts two of them in one batch, where each would be the other's false negative. An image
    that cannot be read is skipped (and reported) once.
    """
    readable = list(grouped)
    for round_index in range(max(map(len, grouped.values()), default=0)):
        names = [name for name in readable if len(grouped[name]) > round_index]
        desc = f"{report.kind}, caption {round_index + 1}"
        readable = []
        for name in progress_bar(names, desc, len(names), progress):
            image = _encoded(images, name, report.skipped if round_index == 0 else [])
            if image is not None:
                readable.append(name)
                yield TrainingSample(image, grouped[name][round_index], {"file": name})



CaptionLayout = Literal["training", "retrieval"]
"""What :func:`build_from_captions` writes: training shards, or a CLIP_benchmark retrieval set."""


def build_from_captions(
    images: str | os.PathLike,
    captions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: CaptionLayout,
    samples_per_shard: int = formats.DEFAULT_SAMPLES_PER_SHARD,
    overwrite: bool = False,
    file_column: str = "file",
    caption_column: str = "caption",
    split_column: str | None = None,
    split: str | None = None,
    progress: bool = True,
) -> WriteReport:
    """Training shards or a retrieval set from a folder of images and a caption file (``mmggem data captions``
    and ``mmggem data retrieval``); both read and check the inputs the same way and differ in what they write.

    - ``layout="training"``: one sample per caption row, written in rounds (:func:`_caption_rounds`),
      in training shards with ``sizes.json``;
    - ``layout="retrieval"``: a CLIP_benchmark retrieval set, one sample per image holding all its captions
      (the rows that share its file name).

    With ``split_column`` and ``split`` only the rows whose ``split_column`` is ``split`` are used
    (e.g. Flickr8k's ``split`` column: ``train`` for shards, ``test`` for the retrieval set).
    """
    if (split_column is None) != (split is None):
        raise UsageError("--split-column and --split go together: the column, and the value of the rows to use")
    images = _require_dir(images)
    report = WriteReport(Path(out), TRAINING_SHARDS if layout == "training" else "retrieval set")
    columns = {"file": file_column, "caption": caption_column, "split": split_column}
    grouped = _caption_groups(images, captions, columns, split, report)
    if layout == "training":
        training = _caption_rounds(images, grouped, report, progress)
        return _write_atomically(report, overwrite, lambda tmp: write_training_shards(tmp, training, samples_per_shard))
    retrieval = (RetrievalSample(image, texts) for _, image, texts in _captioned_images(images, grouped, report,
                                                                                          progress))
    return _write_atomically(report, overwrite, lambda tmp: write_retrieval_set(tmp, retrieval, samples_per_shard))
