"""Evaluation results: CLIP_benchmark's JSON schema, atomic files, readable tables, a summary CSV.

A result file holds CLIP_benchmark's keys (``dataset``, ``model``, ``pretrained``,
``task``, ``metrics``, ``language``), so tools reading CLIP_benchmark output read
mmggem's, plus ``num_samples``, ``skipped`` (samples left out, by reason) and
``precision`` (``fp32``, or ``amp_bf16`` / ``amp_fp16`` for autocast) so a number is
never shown without what it was computed on and how.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import MissingPathError, UsageError, UserError
from ..fileio import write_text_atomic

ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"
"""CLIP_benchmark's task names."""

REQUIRED_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
OUTPUT_FIELDS = ("dataset", "model", "pretrained", "task", "language")
"""Placeholders an output pattern may use, as CLIP_benchmark's ``--output``."""

DEFAULT_RECALL_K = (1, 5, 10)
"""The k of Recall@k reported for retrieval (CLIP papers' choice; CLIP_benchmark's --recall_k)."""

DEFAULT_OUTPUT_PATTERN = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
"""CLIP_benchmark's default output file name."""


@dataclass(frozen=True)
class EvalResult:
    """The metrics of one model on one set, and what they were computed on."""

    dataset: str
    task: str
    metrics: dict[str, float]
    num_samples: int
    precision: str
    skipped: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """What the metrics were computed from, for pictures and losses (not written to files): retrieval's
    ``image_features``, ``text_features``, ``text_image`` and ``samples`` (one per image row); zero-shot's
    ``predicted``, ``target`` and ``classnames``."""

    def record(self, *, model: str, pretrained: str, language: str = "en") -> dict[str, Any]:
        """The CLIP_benchmark-schema record of this result."""
        return {
            "dataset": self.dataset,
            "model": model,
            "pretrained": pretrained,
            "task": self.task,
            "metrics": dict(self.metrics),
            "language": language,
            "num_samples": self.num_samples,
            "skipped": dict(self.skipped),
            "precision": self.precision,
        }


def output_path(pattern: str, record: dict[str, Any]) -> Path:
    """Fill an output pattern's ``{dataset}``, ``{model}``, ``{pretrained}``, ``{task}``, ``{language}``.

    The caller gives ``pretrained`` as the name to file the result under (CLIP_benchmark uses the
    weights file's base name; ``mmggem eval`` the run and checkpoint, see ``LoadedModel.label``);
    ``/`` in any value becomes ``_`` so a value never makes a folder.
    """
    values = {name: str(record[name]) for name in OUTPUT_FIELDS}
    try:
        return Path(pattern.format(**{name: value.replace("/", "_") for name, value in values.items()}))
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(
            f"output pattern {pattern!r} is not valid ({type(error).__name__}: {error}); "
            f"placeholders: {', '.join('{' + name + '}' for name in OUTPUT_FIELDS)}"
        ) from None


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    """Write ``record`` to ``path`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return path


def refuse_other_model(path: Path, model: str, pretrained: str, task: str) -> None:
    """Refuse to write a result of ``model`` ``pretrained`` over ``path`` when it holds another model's or task's.

    A result of the same model and task is replaced: evaluating a model again (new code, another
    precision, a changed set) gives its current numbers. Anything else is refused with both models'
    weights paths, so no result is ever lost without a word.
    """
    if not path.exists():
        return
    try:
        existing = read_result(path)
    except UserError:
        raise UserError(f"{path} exists and is not a result file: not writing over it; choose another --output")
    if (existing["model"], existing["pretrained"], existing["task"]) != (model, pretrained, task):
        raise UserError(f"{path} holds the {existing['task']} result of {existing['model']} {existing['pretrained']}; "
                        f"not writing the result of {model} {pretrained} over it: choose another --output")


def read_result(path: str | Path) -> dict[str, Any]:
    """Read one result file; a clear error when it is not JSON or lacks a schema key."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a JSON result file ({error})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise UserError(f"{path}: not a CLIP_benchmark result, missing {', '.join(missing)}")
    if not isinstance(record["metrics"], dict):
        raise UserError(f"{path}: 'metrics' must be an object of metric name to value")
    return record


def format_tables(records: Iterable[dict[str, Any]]) -> str:
    """The summary people read after a run: one compact table per task, values in %, tasks in order of first result.

    Zero-shot classification shows acc1, acc5 and the mean per-class recall; retrieval shows Recall@k from
    text to image (``T2I@k``) and from image to text (``I2T@k``) for every k reported. Every row also says
    how many samples its numbers are over, how many were skipped, and the precision they were computed in,
    so a number is not read without them. A metric a result lacks (acc5 with fewer than 5 classes) is ``-``.
    """
    records = list(records)
    tables = []
    for task in dict.fromkeys(record["task"] for record in records):
        rows = [record for record in records if record["task"] == task]
        title, columns = _task_columns(task, rows)
        header = ["dataset", "samples", "skipped", "precision", *(label for _, label in columns)]
        cells = [
            [str(row["dataset"]), str(row.get("num_samples", "")), str(sum(row.get("skipped", {}).values())),
             str(row.get("precision", "")), *(percent(row["metrics"].get(metric)) for metric, _ in columns)]
            for row in rows
        ]
        tables.append(title + "\n" + aligned([header, *cells], text_columns=(0, 3)))
    return "\n\n".join(tables)


def _task_columns(task: str, records: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
    """A task's table title and its (metric name, column label) pairs."""
    if task == ZEROSHOT_CLASSIFICATION:
        return "zero-shot classification, %", [("acc1", "acc1"), ("acc5", "acc5"),
                                               ("mean_per_class_recall", "mean_per_class_recall")]
    if task == ZEROSHOT_RETRIEVAL:
        ks = sorted({int(name.rsplit("@", 1)[1]) for record in records for name in record["metrics"]})
        return ("zero-shot retrieval, recall@k in % (T2I: text to image, I2T: image to text)",
                [(f"image_retrieval_recall@{k}", f"T2I@{k}") for k in ks]
                + [(f"text_retrieval_recall@{k}", f"I2T@{k}") for k in ks])
    raise ValueError(f"no summary table for task {task!r}; tasks: {ZEROSHOT_CLASSIFICATION}, {ZEROSHOT_RETRIEVAL}")


def percent(value: Any) -> str:
    """A fraction as a table cell in percent with one decimal, ``-`` for a missing or non-finite value."""
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def aligned(rows: list[list[str]], text_columns: tuple[int, ...]) -> str:
    """Rows as columns two spaces apart: text columns left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) if i in text_columns else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    )


def summary_rows(results_dir: str | Path) -> list[dict[str, Any]]:
    """One row per ``*.json`` result in ``results_dir`` (sorted by file name), metrics as columns.

    Rows are flattened as CLIP_benchmark's ``build`` does, with ``model_fullname`` =
    ``model + " " + pretrained``; ``skipped`` becomes the total count of skipped samples.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise MissingPathError(f"results folder not found: {results_dir}")
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise UserError(f"{results_dir}: no *.json result files")
    rows = []
    for path in files:
        record = read_result(path)
        row = {key: value for key, value in record.items() if key != "metrics"}
        row["skipped"] = sum(record.get("skipped", {}).values())
        row["model_fullname"] = f"{record['model']} {record['pretrained']}"
        row.update(record["metrics"])
        rows.append(row)
    return rows


def write_summary_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write summary rows as CSV (schema columns first, then metrics sorted), atomically."""
    leading = ["dataset", "model", "pretrained", "task", "language", "num_samples", "skipped", "precision",
               "model_fullname"]
    leading = [name for name in leading if any(name in row for row in rows)]
    rest = sorted({name for row in rows for name in row} - set(leading))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=leading + rest, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    write_text_atomic(path, buffer.getvalue())
    return path
