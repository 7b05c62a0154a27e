"""The pooling ablation: one config, every pooling x seed, the same budget, one table.

Each run is an ordinary ``mmggem train`` in its own process, in
``OUT/<pooling>/seed_<s>/``, so a run can be inspected, resumed or re-plotted
like any other, and a finished run is reused when the ablation is started again.
Runs go ``parallel`` at a time on one machine; under ``accelerate launch`` each
process takes its share (run i goes to process i mod N, one GPU each) and the
main process writes the summary once every run has finished.

The summary reports, per pooling, the mean and standard deviation over seeds of
the final evaluation metrics: zero-shot ``acc1`` and retrieval Recall@1 in both
directions, for every evaluation set of the config, as Markdown, CSV and a PNG.
With a baseline pooling it also reports each pooling's difference to the
baseline paired by seed, with a 95% interval (:mod:`mmggem.paired`).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .paired import PairedDifference, format_difference, paired_difference, plain_note

SUMMARY_METRICS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class AblationRun:
    pooling: str
    seed: int
    output_dir: Path

    @property
    def finished(self) -> bool:
        return (self.output_dir / "final" / "open_clip_config.json").is_file()

    def identity(self, tags: list[str]) -> list[str]:
        """Overrides that tell the run apart on a dashboard: named ``<pooling>-s<seed>``, grouped under the
        ablation (its output folder's name), tagged with ``tags`` and its pooling."""
        ablation = self.output_dir.parent.parent.resolve().name
        return [f"log.run_name={self.pooling}-s{self.seed}", f"log.group={ablation}",
                f"log.tags={json.dumps([*tags, self.pooling])}"]


def plan_runs(out: Path, poolings: list[str], seeds: int) -> list[AblationRun]:
    return [AblationRun(p, s, out / p / f"seed_{s}") for p in poolings for s in range(seeds)]


def _run_environment(device_index: int | None) -> dict[str, str]:
    """A single-process environment for a child run, even when the ablation itself runs under a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if device_index is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(device_index)
    return env


def train_run(config: Path, run: AblationRun, overrides: list[str], device_index: int | None,
              tags: Sequence[str] = ()) -> int:
    """Train one run in a child process (resuming it if it was cut short); returns its exit code.

    The run's name, group and tags (:meth:`AblationRun.identity`, ``tags`` first) come after ``overrides``.
    """
    if run.finished:
        return 0
    run.output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmggem", "train", str(config), f"model.pooling={run.pooling}",
               f"seed={run.seed}", f"output_dir={run.output_dir}", "train.resume=latest", "log.progress=false",
               *overrides, *run.identity(list(tags))]
    with open(run.output_dir / "train.log", "a") as log_file:
        return subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_run_environment(device_index),
                              check=False).returncode


def run_all(config: Path, runs: list[AblationRun], overrides: list[str], parallel: int,
            rank: int = 0, world_size: int = 1, device_index: int | None = None,
            tags: Sequence[str] = ()) -> list[AblationRun]:
    """Train this process's share of ``runs``, ``parallel`` at a time; return the runs that failed."""
    mine = runs[rank::world_size]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        codes = list(pool.map(lambda run: train_run(config, run, overrides, device_index, tags), mine))
    for run, code in zip(mine, codes):
        print(f"{run.pooling} seed {run.seed}: {'done' if code == 0 else f'failed (exit {code})'} "
              f"-> {run.output_dir}", flush=True)
    return [run for run, code in zip(mine, codes) if code != 0]


def final_metrics(run: AblationRun) -> dict[str, float]:
    """The last logged value of every ``eval/<set>/<metric>`` of a run."""
    results = run.output_dir / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"{results} is missing: run {run.pooling} seed {run.seed} never logged")
    metrics: dict[str, float] = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        metrics.update({k: v for k, v in record.items() if k.startswith("eval/")})
    return metrics


def summary_columns(metrics: list[dict[str, float]]) -> list[str]:
    keys = sorted({key for m in metrics for key in m if key.rsplit("/", 1)[-1] in SUMMARY_METRICS})
    if not keys:
        raise UserError("no run logged zero-shot or retrieval metrics: set eval.datasets in the config")
    return keys


@dataclass
class Summary:
    columns: list[str]
    rows: dict[str, dict[str, tuple[float, float, int]]]  # pooling -> column -> (mean, std, n)
    baseline: str | None = None
    differences: dict[str, dict[str, PairedDifference | None]] | None = None  # pooling -> column -> vs baseline


def summarise(runs: list[AblationRun], baseline: str | None = None) -> Summary:
    per_run = {run: final_metrics(run) for run in runs}
    columns = summary_columns(list(per_run.values()))
    rows: dict[str, dict[str, tuple[float, float, int]]] = {}
    by_seed: dict[str, dict[str, dict[int, float]]] = {}  # pooling -> column -> seed -> value
    for pooling in dict.fromkeys(run.pooling for run in runs):
        rows[pooling], by_seed[pooling] = {}, {}
        for column in columns:
            by_seed[pooling][column] = {r.seed: m[column] for r, m in per_run.items()
                                        if r.pooling == pooling and column in m}
            values = list(by_seed[pooling][column].values())
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            rows[pooling][column] = (statistics.fmean(values), spread, len(values))
    differences = None
    if baseline is not None:
        differences = {pooling: {c: paired_difference(by_seed[pooling][c], by_seed[baseline][c]) for c in columns}
                       for pooling in rows if pooling != baseline}
    return Summary(columns, rows, baseline, differences)


def _label(column: str) -> str:
    return column.removeprefix("eval/")


def write_markdown(summary: Summary, path: Path) -> None:
    header = "| pooling | " + " | ".join(_label(c) for c in summary.columns) + " |"
    lines = [header, "|" + " --- |" * (len(summary.columns) + 1)]
    for pooling, cells in summary.rows.items():
        values = [f"{100 * m:.2f} ± {100 * s:.2f} (n={n})" for m, s, n in (cells[c] for c in summary.columns)]
        lines.append(f"| {pooling} | " + " | ".join(values) + " |")
    lines += ["", "Values in %, mean ± sample standard deviation over seeds."]
    if summary.differences is not None:
        lines += ["", f"Difference to {summary.baseline}, paired by seed, in percentage points: "
                  "mean [95% t interval] (seeds).", "", header, lines[1]]
        for pooling, cells in summary.differences.items():
            lines.append(f"| {pooling} | " + " | ".join(format_difference(cells[c]) for c in summary.columns) + " |")
        notes = [plain_note(p, summary.baseline, _label(c), cells[c])
                 for p, cells in summary.differences.items() for c in summary.columns]
        lines += [""] + [f"- {note}" for note in notes if note]
    path.write_text("\n".join(lines) + "\n")


def write_csv(summary: Summary, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pooling", "metric", "mean", "std", "seeds",
                         "baseline", "diff_mean", "diff_low", "diff_high", "paired_seeds"])
        for pooling, cells in summary.rows.items():
            for column in summary.columns:
                mean, std, n = cells[column]
                diff = (summary.differences or {}).get(pooling, {}).get(column)
                paired = ([summary.baseline, f"{diff.mean:.6f}", f"{diff.low:.6f}", f"{diff.high:.6f}", diff.seeds]
                          if diff is not None else ["", "", "", "", ""])
                writer.writerow([pooling, _label(column), f"{mean:.6f}", f"{std:.6f}", n, *paired])


def write_plot(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 if summary.differences is None else 2
    fig, axes = plt.subplots(rows, len(summary.columns), figsize=(4 * len(summary.columns), 3.5 * rows),
                             squeeze=False)
    poolings = list(summary.rows)
    for ax, column in zip(axes[0], summary.columns):
        means = [100 * summary.rows[p][column][0] for p in poolings]
        stds = [100 * summary.rows[p][column][1] for p in poolings]
        ax.bar(poolings, means, yerr=stds, capsize=4, color=["C3" if p == "ggem" else "C0" for p in poolings])
        ax.set_title(_label(column), fontsize=9)
        ax.set_ylabel("%")
    if summary.differences is not None:
        for ax, column in zip(axes[1], summary.columns):
            _plot_differences(ax, summary, column)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_differences(ax: Any, summary: Summary, column: str) -> None:
    """Paired differences to the baseline with their 95% intervals (no whisker for one seed)."""
    cells = {p: by_column[column] for p, by_column in summary.differences.items() if by_column[column] is not None}
    names = list(cells)
    means = [100 * d.mean for d in cells.values()]
    errors = [[100 * (d.mean - d.low) if d.seeds > 1 else 0 for d in cells.values()],
              [100 * (d.high - d.mean) if d.seeds > 1 else 0 for d in cells.values()]]
    ax.errorbar(names, means, yerr=errors, fmt="o", capsize=4)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title(f"{_label(column)} - {summary.baseline}", fontsize=9)
    ax.set_ylabel("points, 95% interval")


def write_summary(runs: list[AblationRun], out: Path, baseline: str | None = None) -> Summary:
    """Write OUT/ablation.md, OUT/ablation.csv and OUT/ablation.png; return the summary.

    With ``baseline`` (one of the runs' poolings), each also reports the paired differences to it.
    """
    summary = summarise(runs, baseline)
    write_markdown(summary, out / "ablation.md")
    write_csv(summary, out / "ablation.csv")
    write_plot(summary, out / "ablation.png")
    return summary
