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

from .errors import UserError

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


def plan_runs(out: Path, poolings: list[str], seeds: int) -> list[AblationRun]:
    return [AblationRun(p, s, out / p / f"seed_{s}") for p in poolings for s in range(seeds)]


def _run_environment(device_index: int | None) -> dict[str, str]:
    """A single-process environment for a child run, even when the ablation itself runs under a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if device_index is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(device_index)
    return env


def train_run(config: Path, run: AblationRun, overrides: list[str], device_index: int | None) -> int:
    """Train one run in a child process (resuming it if it was cut short); returns its exit code."""
    if run.finished:
        return 0
    run.output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmggem", "train", str(config), f"model.pooling={run.pooling}",
               f"seed={run.seed}", f"output_dir={run.output_dir}", "train.resume=latest", "log.progress=false",
               *overrides]
    with open(run.output_dir / "train.log", "a") as log_file:
        return subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=_run_environment(device_index),
                              check=False).returncode


def run_all(config: Path, runs: list[AblationRun], overrides: list[str], parallel: int,
            rank: int = 0, world_size: int = 1, device_index: int | None = None) -> list[AblationRun]:
    """Train this process's share of ``runs``, ``parallel`` at a time; return the runs that failed."""
    mine = runs[rank::world_size]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        codes = list(pool.map(lambda run: train_run(config, run, overrides, device_index), mine))
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


def summarise(runs: list[AblationRun]) -> Summary:
    per_run = {run: final_metrics(run) for run in runs}
    columns = summary_columns(list(per_run.values()))
    rows: dict[str, dict[str, tuple[float, float, int]]] = {}
    for pooling in dict.fromkeys(run.pooling for run in runs):
        rows[pooling] = {}
        for column in columns:
            values = [m[column] for r, m in per_run.items() if r.pooling == pooling and column in m]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            rows[pooling][column] = (statistics.fmean(values), spread, len(values))
    return Summary(columns, rows)


def _label(column: str) -> str:
    return column.removeprefix("eval/")


def write_markdown(summary: Summary, path: Path) -> None:
    header = "| pooling | " + " | ".join(_label(c) for c in summary.columns) + " |"
    lines = [header, "|" + " --- |" * (len(summary.columns) + 1)]
    for pooling, cells in summary.rows.items():
        values = [f"{100 * m:.2f} ± {100 * s:.2f} (n={n})" for m, s, n in (cells[c] for c in summary.columns)]
        lines.append(f"| {pooling} | " + " | ".join(values) + " |")
    path.write_text("\n".join(lines) + "\n\nValues in %, mean ± sample standard deviation over seeds.\n")


def write_csv(summary: Summary, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pooling", "metric", "mean", "std", "seeds"])
        for pooling, cells in summary.rows.items():
            for column in summary.columns:
                mean, std, n = cells[column]
                writer.writerow([pooling, _label(column), f"{mean:.6f}", f"{std:.6f}", n])


def write_plot(summary: Summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary.columns), figsize=(4 * len(summary.columns), 3.5), squeeze=False)
    poolings = list(summary.rows)
    for ax, column in zip(axes[0], summary.columns):
        means = [100 * summary.rows[p][column][0] for p in poolings]
        stds = [100 * summary.rows[p][column][1] for p in poolings]
        ax.bar(poolings, means, yerr=stds, capsize=4, color=["C3" if p == "ggem" else "C0" for p in poolings])
        ax.set_title(_label(column), fontsize=9)
        ax.set_ylabel("%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(runs: list[AblationRun], out: Path) -> Summary:
    """Write OUT/ablation.md, OUT/ablation.csv and OUT/ablation.png; return the summary."""
    summary = summarise(runs)
    write_markdown(summary, out / "ablation.md")
    write_csv(summary, out / "ablation.csv")
    write_plot(summary, out / "ablation.png")
    return summary
