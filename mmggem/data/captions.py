"""Reading caption files: CSV/TSV with a header row, or JSONL, of (file name, caption[, split]) rows.

The writers (:mod:`mmggem.data.write`) group the rows by file name; an optional split column
(Flickr8k's ``split``, COCO Karpathy's) lets one caption file serve the training shards and the
held-out retrieval set alike.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingPathError, UserError

__all__ = ["CAPTION_FILE_SUFFIXES", "CaptionRow", "read_caption_rows"]

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
