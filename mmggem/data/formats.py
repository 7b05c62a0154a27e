"""The two on-disk layouts mmggem reads and writes, as constants and small helpers.

Training shards (the img2dataset / open_clip convention)::

    DIR/00000.tar, DIR/00001.tar, ...   samples {key}.jpg|jpeg|png|webp + {key}.txt (+ {key}.json)
    DIR/sizes.json                      {"00000.tar": 1000, ...}, the sample count of each shard

Evaluation sets (CLIP_benchmark's webdataset layout, as read by
``clip_benchmark.datasets.builder.build_wds_dataset``)::

    DIR/dataset_type.txt                   "classification" or "retrieval" (absent means classification)
    DIR/classnames.txt                     one class name per line, line i is label i
    DIR/zeroshot_classification_templates.txt  one template per line, "{c}" marks the class name
    DIR/test/nshards.txt                   the number of shards N
    DIR/test/0.tar ... DIR/test/{N-1}.tar  samples {key}.webp|png|jpg|jpeg + {key}.cls (label index,
                                           ASCII integer) or {key}.txt (captions, one per line)

The metadata readers here take local directories; evaluation code that reads
remote sets resolves URLs itself.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import MissingPathError, UserError

# --- sample keys (shared by both layouts) ----------------------------------------------------

KEY_FIELD = "__key__"
"""The webdataset field holding a sample's key (the tar member name before the extension)."""

IMAGE_EXTENSIONS: tuple[str, ...] = ("webp", "png", "jpg", "jpeg")
"""Image extensions both layouts accept, in the order CLIP_benchmark looks for them."""

CAPTION_KEY = "txt"
"""Training caption; in a retrieval set, the image's captions one per line."""

JSON_KEY = "json"
"""Optional per-sample metadata in training shards (img2dataset writes url, size, ...)."""

LABEL_KEY = "cls"
"""Class index of a classification sample, stored as an ASCII integer."""

# --- training shards ---------------------------------------------------------------------------

SIZES_FILE = "sizes.json"
"""Beside the shards: maps a shard's file name to its sample count (open_clip reads it)."""

DEFAULT_SAMPLES_PER_SHARD = 10_000
"""Shard size when none is given, as img2dataset and CLIP_benchmark's exporter."""

TRAIN_SHARD_PATTERN = "%05d.tar"
"""Training shards are named like img2dataset's: 00000.tar, 00001.tar, ..."""

# --- CLIP_benchmark evaluation sets -------------------------------------------------------------

DATASET_TYPE_FILE = "dataset_type.txt"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
NSHARDS_FILE = "nshards.txt"
EVAL_SPLIT = "test"
EVAL_SHARD_PATTERN = "%d.tar"
"""Evaluation shards are named as CLIP_benchmark's exporter names them: 0.tar, 1.tar, ..."""
"""The split mmggem writes and evaluates (CLIP_benchmark's default)."""

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
DATASET_TYPES: tuple[str, ...] = (CLASSIFICATION, RETRIEVAL)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a photo of the {c}.",
    "a close-up photo of a {c}.",
    "a low resolution photo of a {c}.",
)
"""Templates written for a classification set when the user gives none."""

CLASS_PLACEHOLDER = "{c}"
"""Marks the class name in a zero-shot template; templates are filled with ``template.format(c=name)``."""


def eval_shard_name(index: int) -> str:
    """File name of evaluation shard ``index``: ``0.tar``, ``1.tar``, ... (no padding)."""
    return EVAL_SHARD_PATTERN % index


def eval_sample_key(index: int) -> str:
    """Sample key CLIP_benchmark's exporter uses: ``s0000000`` style."""
    return f"s{index:07d}"


def image_key(sample: Mapping[str, object]) -> str | None:
    """The first key of ``sample`` that is an accepted image extension, or None."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    return None


def join_captions(captions: list[str]) -> str:
    """Encode a retrieval sample's captions as CLIP_benchmark does: one per line.

    A newline inside a caption becomes a literal backslash-n so that line i stays caption i.
    """
    return "\n".join(caption.replace("\n", r"\n") for caption in captions)


def split_captions(text: str) -> list[str]:
    """Decode a retrieval sample's ``txt`` field into its captions (``str.splitlines``, as CLIP_benchmark)."""
    return text.splitlines()


def check_templates(templates: Sequence[str], source: str) -> None:
    """Raise a UserError naming ``source`` and the first template that cannot be filled with a class name.

    Checked when a set is written and again when it is evaluated (a set may come from elsewhere): a
    template needs ``{c}`` and no other format field, since it is filled with ``template.format(c=name)``
    as CLIP_benchmark does; literal braces are written ``{{ }}``.
    """
    if not templates:
        raise UserError(f"{source}: no templates")
    for line, template in enumerate(templates, start=1):
        if CLASS_PLACEHOLDER not in template:
            raise UserError(f"{source}: line {line} template {template!r} has no {CLASS_PLACEHOLDER} placeholder "
                            f"(write e.g. 'a photo of a {CLASS_PLACEHOLDER}.')")
        try:
            template.format(c="x")
        except (IndexError, KeyError, ValueError) as error:
            raise UserError(f"{source}: line {line} template {template!r} is not a format string with only "
                            f"{CLASS_PLACEHOLDER} ({type(error).__name__}: {error}); write literal braces as {{{{ }}}}"
                            ) from None


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a UTF-8 text file, stripped, as CLIP_benchmark reads class names and templates."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        raise MissingPathError(f"file not found: {path}") from None


def read_dataset_type(root: str | os.PathLike) -> str:
    """``dataset_type.txt`` of a set, lower-cased; a missing file means classification (as CLIP_benchmark)."""
    path = Path(root) / DATASET_TYPE_FILE
    if not path.exists():
        return CLASSIFICATION
    value = path.read_text(encoding="utf-8").strip().lower()
    if value not in DATASET_TYPES:
        raise UserError(f"{path}: dataset type {value!r} is not supported; valid: {', '.join(DATASET_TYPES)}")
    return value


def read_nshards(root: str | os.PathLike, split: str = EVAL_SPLIT) -> int:
    """The shard count in ``ROOT/SPLIT/nshards.txt``; a clear error when missing or not a positive integer."""
    path = Path(root) / split / NSHARDS_FILE
    if not path.exists():
        raise MissingPathError(f"{path} is missing: not a CLIP_benchmark webdataset set (split {split!r})")
    text = path.read_text(encoding="utf-8").strip()
    try:
        nshards = int(text)
    except ValueError:
        raise UserError(f"{path}: expected a positive integer shard count, got {text!r}") from None
    if nshards < 1:
        raise UserError(f"{path}: expected a positive integer shard count, got {nshards}")
    return nshards


def read_sizes(directory: str | os.PathLike) -> dict[str, int] | None:
    """``sizes.json`` of a training shard directory (shard file name -> count), or None when absent."""
    path = Path(directory) / SIZES_FILE
    if not path.exists():
        return None
    expected = 'a JSON object mapping shard file name to sample count, e.g. {"00000.tar": 10000}'
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not readable JSON ({error}); expected {expected}") from None
    if not isinstance(sizes, dict):
        raise UserError(f"{path}: expected {expected}")
    counts = {}
    for name, count in sizes.items():
        try:  # int() as open_clip reads it, so "1000" is a count too
            counts[str(name)] = int(count)
        except (TypeError, ValueError):
            raise UserError(f"{path}: the sample count of {name!r} is {count!r}, not an integer") from None
    return counts
