"""Metric against training step: the table and the plot ``mmggem eval summary`` shows.

Results of a run's models carry ``run`` and ``step`` (see ``LoadedModel.provenance``), so the
results of ``mmggem eval --all-checkpoints`` line up into one curve per run and set: the table
has one row per run and set and one column per step, and the plot one line each. A result from
outside a run (a model folder, an open_clip baseline) is its own "run", named by model and
weights, with no step (column ``-``; not plotted).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ..fileio import write_bytes_atomic
from .results import ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, aligned, percent

HEADLINES = {
    ZEROSHOT_CLASSIFICATION: [("acc1", "acc1")],
    ZEROSHOT_RETRIEVAL: [("image_retrieval_recall@1", "T2I@1"), ("text_retrieval_recall@1", "I2T@1")],
}
"""Per task, the metrics followed over training and their short labels."""

Curve = dict[int | None, float]
"""Step (None outside a run) -> metric value."""


def run_name(row: dict[str, Any]) -> str:
    """The run a result belongs to; model and weights for a result from outside a run."""
    return str(row["run"]) if "run" in row else f"{row['model']} {Path(str(row['pretrained'])).name}"


def curves(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[str, str], Curve]]:
    """``(task, metric label) -> (run, dataset) -> step -> value`` for every headline metric present.

    ``rows`` are :func:`mmggem.evaluate.results.summary_rows`: one per result, metrics as keys.
    """
    found: dict[tuple[str, str], dict[tuple[str, str], Curve]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        for metric, label in HEADLINES.get(row["task"], []):
            if metric in row:
                found[(row["task"], label)][(run_name(row), str(row["dataset"]))][row.get("step")] = row[metric]
    return {key: dict(value) for key, value in found.items()}


def format_curves(rows: Iterable[dict[str, Any]]) -> str:
    """One table per headline metric: a row per run and set, a column per step, values in %."""
    tables = []
    for (task, label), lines in curves(rows).items():
        steps = sorted({step for curve in lines.values() for step in curve}, key=lambda s: (s is not None, s or 0))
        header = ["run", "dataset", *("-" if step is None else str(step) for step in steps)]
        rows = [[run, dataset, *(percent(curve.get(step)) for step in steps)]
                for (run, dataset), curve in sorted(lines.items())]
        tables.append(f"{label} in % by training step ({task})\n" + aligned([header, *rows], text_columns=(0, 1)))
    return "\n\n".join(tables)


def plot_curves(rows: Iterable[dict[str, Any]], path: str | Path) -> Path | None:
    """Plot every headline metric against step into the PNG ``path``; None (nothing written) without steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = {key: {line: {s: v for s, v in curve.items() if s is not None} for line, curve in lines.items()}
              for key, lines in curves(rows).items()}
    panels = {key: {line: c for line, c in lines.items() if c} for key, lines in panels.items()}
    panels = {key: lines for key, lines in panels.items() if lines}
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, ((task, label), lines) in zip(axes[0], sorted(panels.items())):
        for (run, dataset), curve in sorted(lines.items()):
            steps = sorted(curve)
            axis.plot(steps, [100 * curve[s] for s in steps], marker="o", label=f"{run} / {dataset}")
        axis.set(title=f"{label} ({task.replace('zeroshot_', 'zero-shot ')})", xlabel="training step",
                 ylabel=f"{label} (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path
