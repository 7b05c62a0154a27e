"""The ablation's tables: per arm, the mean and spread over seeds of its final metrics, and its
difference to each baseline arm paired by seed, as ``ablation.md``, ``ablation.csv`` and ``ablation.png``.

The metrics are the last logged ``eval/<set>/<metric>`` of every run, for every evaluation set of the
config, restricted to the names in ``metrics`` (by default zero-shot ``acc1`` and retrieval Recall@1 in
both directions); ``head_dependence`` in ``metrics`` adds the head-wise dependence of each run's pooled
features on every evaluation set (:mod:`mmggem.experiments.probes`). Paired differences and their 95% intervals are :mod:`mmggem.experiments.paired`'s. Arms whose
pooler learns exponents (gem, ggem and their variants) also get their p per group: the last value in the
Markdown, the whole course of training in ``ablation_p.png``.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..fileio import write_bytes_atomic, write_text_atomic
from ..train.records import PTrajectory, p_trajectory, read_records
from ..train.tracking import RESULTS_FILE
from .ablation import AblationRun
from .paired import POWER, PairedDifference, format_detectable, format_difference, paired_difference, plain_notes
from .probes import HEAD_DEPENDENCE, run_head_dependence

SUMMARY_METRICS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")


def final_metrics(run: AblationRun, probes: Sequence[str] = ()) -> dict[str, float]:
    """The last logged value of every ``eval/<set>/<metric>`` of a run, and those of the ``probes``
    measured on its final model (:mod:`mmggem.experiments.probes`; only ``head_dependence`` exists)."""
    if not (run.output_dir / RESULTS_FILE).is_file():
        raise FileNotFoundError(f"{run.output_dir / RESULTS_FILE} is missing: run {run.name} seed {run.seed} "
                                "never logged")
    metrics: dict[str, float] = {}
    for record in read_records(run.output_dir):
        metrics.update({k: v for k, v in record.items() if k.startswith("eval/")})
    if HEAD_DEPENDENCE in probes:
        metrics.update(run_head_dependence(run.output_dir))
    return metrics


def summary_columns(metrics: list[dict[str, float]], names: Sequence[str] = SUMMARY_METRICS) -> list[str]:
    """The ``eval/<set>/<metric>`` columns to tabulate: set by set, each set's metrics in the order asked
    for (so R@1, R@5, R@10 read left to right)."""
    order = list(names)

    def place(key: str) -> tuple[str, int]:
        evalset, metric = key.removeprefix("eval/").rsplit("/", 1)
        return evalset, order.index(metric)

    keys = sorted({key for m in metrics for key in m if key.rsplit("/", 1)[-1] in names}, key=place)
    if not keys:
        raise UserError(f"no run logged any of the metrics {', '.join(names)}: set eval.datasets in the config, "
                        "or name metrics the evaluation reports")
    return keys


Differences = dict[str, dict[str, PairedDifference | None]]  # arm -> column -> difference to one baseline


Cell = tuple[float, float, int]
"""(mean, sample standard deviation, n) of one arm's values over its seeds: the mean is nan for n = 0 (the arm
logged no value) and the standard deviation for n < 2 (one value has no spread)."""


@dataclass
class Summary:
    columns: list[str]
    rows: dict[str, dict[str, Cell]]  # arm -> column -> its cell
    differences: dict[str, Differences]  # baseline arm -> its comparisons (empty without baselines)
    exponents: dict[tuple[str, int], PTrajectory]  # (arm, seed) -> p over training, for learned exponents
    not_a_number: list[tuple[str, int, str]]  # (arm, seed, column) of the NaN values left out of rows and differences


def cell(values: Sequence[float]) -> Cell:
    """The mean, sample standard deviation and count of ``values`` (nan where they do not exist)."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def summarise(runs: list[AblationRun], baselines: Sequence[str] = (),
              metrics: Sequence[str] = SUMMARY_METRICS) -> Summary:
    """Every arm's cell per column and its paired differences to each baseline, over the runs' values that
    are numbers: a NaN value (a diverged run, a constant probe) is left out and listed in ``not_a_number``."""
    unrun = [base for base in baselines if base not in {run.name for run in runs}]
    if unrun:
        raise UserError(f"baseline {', '.join(unrun)} has no finished run to compare with")
    per_run = {run: final_metrics(run, metrics) for run in runs}
    columns = summary_columns(list(per_run.values()), metrics)
    not_a_number = [(run.name, run.seed, c) for run, m in per_run.items() for c in columns
                    if c in m and math.isnan(m[c])]
    rows: dict[str, dict[str, Cell]] = {}
    by_seed: dict[str, dict[str, dict[int, float]]] = {}  # arm -> column -> seed -> value
    for arm in dict.fromkeys(run.name for run in runs):
        rows[arm], by_seed[arm] = {}, {}
        for column in columns:
            by_seed[arm][column] = {r.seed: m[column] for r, m in per_run.items()
                                    if r.name == arm and column in m and not math.isnan(m[column])}
            rows[arm][column] = cell(list(by_seed[arm][column].values()))
    differences = {base: {arm: {c: paired_difference(by_seed[arm][c], by_seed[base][c]) for c in columns}
                          for arm in rows if arm != base}
                   for base in baselines}
    return Summary(columns, rows, differences, learned_exponents(runs), not_a_number)


def learned_exponents(runs: list[AblationRun]) -> dict[tuple[str, int], PTrajectory]:
    """The logged exponents of every run whose pooler learns them (the others are left out), arm by arm."""
    arms = list(dict.fromkeys(run.name for run in runs))
    exponents = {}
    for run in sorted(runs, key=lambda run: (arms.index(run.name), run.seed)):
        try:
            exponents[run.name, run.seed] = p_trajectory(read_records(run.output_dir))
        except ValueError:  # no exponent logged: cls, avg, max or attn
            continue
    return exponents


def _label(column: str) -> str:
    return column.removeprefix("eval/")


def interim_note(summarised: int, missing: Sequence[AblationRun]) -> str:
    """The line that marks tables of a part-finished ablation as such ('' when every planned run finished)."""
    if not missing:
        return ""
    named = ", ".join(f"{run.name} seed {run.seed}" for run in missing)
    return (f"Interim: {summarised} of {summarised + len(missing)} planned runs finished; not yet {named}. "
            "Every value below covers the finished runs only.")


def format_cell(value: Cell) -> str:
    """``50.00 ± 1.23 (n=3)`` in %, ``50.00 ± - (n=1)`` for one seed, ``-`` for none."""
    mean, std, n = value
    if n == 0:
        return "-"
    return f"{100 * mean:.2f} ± {'-' if n < 2 else f'{100 * std:.2f}'} (n={n})"


def nan_note(not_a_number: Sequence[tuple[str, int, str]]) -> str:
    """The line that names the NaN values left out of the tables ('' when there are none)."""
    if not not_a_number:
        return ""
    named = ", ".join(f"{arm} seed {seed} {_label(column)}" for arm, seed, column in not_a_number)
    return f"NaN, left out of every mean, spread and difference below: {named}."


def write_markdown(summary: Summary, path: Path, interim: str = "") -> None:
    header = "| pooling | " + " | ".join(_label(c) for c in summary.columns) + " |"
    rule = "|" + " --- |" * (len(summary.columns) + 1)
    lines = [line for note in (interim, nan_note(summary.not_a_number)) if note for line in (f"**{note}**", "")]
    lines += [header, rule]
    for arm, cells in summary.rows.items():
        lines.append(f"| {arm} | " + " | ".join(format_cell(cells[c]) for c in summary.columns) + " |")
    lines += ["", "Values in %, mean ± sample standard deviation over seeds (- where a seed or none gives none)."]
    if any(c.endswith("/" + HEAD_DEPENDENCE) for c in summary.columns):
        lines += ["", f"{HEAD_DEPENDENCE}: the mean absolute correlation, over the set's images, between pooled "
                  "channels of different attention heads, x 100 (lower: the heads' channels are less dependent)."]
    for baseline, differences in summary.differences.items():
        lines += ["", f"Difference to {baseline}, paired by seed, in percentage points: "
                  "mean [95% t interval] (seeds).", "", header, rule]
        for arm, cells in differences.items():
            lines.append(f"| {arm} | " + " | ".join(format_difference(cells[c]) for c in summary.columns) + " |")
        notes = [note for arm, cells in differences.items()
                 for note in plain_notes(arm, baseline, {_label(c): cells[c] for c in summary.columns})]
        lines += [""] + [f"- {note}" for note in notes]
        lines += ["", f"Smallest difference to {baseline} these seeds could detect ({100 * POWER:.0f}% power, "
                  "95% two-sided paired t test, from the spread of the paired differences), in percentage points.",
                  "", header, rule]
        for arm, cells in differences.items():
            lines.append(f"| {arm} | " + " | ".join(format_detectable(cells[c]) for c in summary.columns) + " |")
    if summary.exponents:
        groups = max(trajectory.groups for trajectory in summary.exponents.values())
        lines += ["", "Learned exponents p at the last logged step, per group.", "",
                  "| arm | seed | " + " | ".join(f"group {g}" for g in range(groups)) + " |",
                  "|" + " --- |" * (groups + 2)]
        for (arm, seed), trajectory in summary.exponents.items():
            cells = [f"{p:.3f}" for p in trajectory.p[-1]] + [""] * (groups - trajectory.groups)  # gem has one
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_csv(summary: Summary, path: Path) -> None:
    """One row per arm, metric and baseline (one row with empty paired fields without baselines); a baseline's
    own row has an empty ``baseline``. What does not exist is written as in the paired fields: empty where
    there is no value (no seed, no common seed), ``nan`` for the spread or interval of a single seed."""
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(["pooling", "metric", "mean", "std", "seeds",
                     "baseline", "diff_mean", "diff_low", "diff_high", "paired_seeds", "diff_detectable"])
    for arm, cells in summary.rows.items():
        for column in summary.columns:
            mean, std, n = cells[column]
            own = [f"{mean:.6f}", f"{std:.6f}"] if n else ["", ""]
            for baseline in summary.differences or [None]:
                diff = summary.differences[baseline].get(arm, {}).get(column) if baseline else None
                paired = ([f"{diff.mean:.6f}", f"{diff.low:.6f}", f"{diff.high:.6f}", diff.seeds,
                           f"{diff.detectable:.6f}"] if diff is not None else ["", "", "", "", ""])
                named = baseline if baseline not in (None, arm) else ""  # empty: the arm's own row
                writer.writerow([arm, _label(column), *own, n, named, *paired])
    write_text_atomic(path, handle.getvalue())


def write_plot(summary: Summary, path: Path, interim: str = "") -> None:
    """Means with their seed spread on the first row; below, one row of paired differences per baseline;
    an interim ablation's figure carries its note as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 + len(summary.differences)
    fig, axes = plt.subplots(rows, len(summary.columns), figsize=(4 * len(summary.columns), 3.5 * rows),
                             squeeze=False)
    arms = list(summary.rows)
    for ax, column in zip(axes[0], summary.columns):
        means = [100 * summary.rows[a][column][0] for a in arms]
        stds = [100 * summary.rows[a][column][1] if summary.rows[a][column][2] > 1 else 0 for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=4, color=["C3" if a.startswith("ggem") else "C0" for a in arms])
        ax.set_title(_label(column), fontsize=9)
        ax.set_ylabel("%, mean ± sd over seeds")
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    for row, (baseline, differences) in enumerate(summary.differences.items(), start=1):
        for ax, column in zip(axes[row], summary.columns):
            _plot_differences(ax, differences, baseline, column)
    if interim:
        fig.suptitle(interim.split(";")[0], fontsize=10, color="C3")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to ``path`` as PNG through a temporary file renamed into place (a reader,
    such as ``--report`` while the ablation writes, never sees a half-written figure), and close it."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())


def _plot_differences(ax: Any, differences: Differences, baseline: str, column: str) -> None:
    """Paired differences to ``baseline`` with their 95% intervals (no whisker for one seed)."""
    cells = {a: by_column[column] for a, by_column in differences.items() if by_column[column] is not None}
    means = [100 * d.mean for d in cells.values()]
    errors = [[100 * (d.mean - d.low) if d.seeds > 1 else 0 for d in cells.values()],
              [100 * (d.high - d.mean) if d.seeds > 1 else 0 for d in cells.values()]]
    ax.errorbar(list(cells), means, yerr=errors, fmt="o", capsize=4)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title(f"{_label(column)} - {baseline}", fontsize=9)
    ax.set_ylabel("points, 95% interval")
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)


def write_exponent_plot(summary: Summary, path: Path) -> None:
    """One panel per arm with learned exponents: p of each group (colour) over steps, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(arm for arm, _ in summary.exponents))
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.5), squeeze=False, sharey=True)
    styles = ("-", "--", ":", "-.")
    for ax, arm in zip(axes[0], arms):
        runs = {seed: trajectory for (name, seed), trajectory in summary.exponents.items() if name == arm}
        for seed, trajectory in runs.items():
            for group in range(trajectory.groups):
                label = f"group {group}" if seed == min(runs) else None
                ax.plot(trajectory.steps, trajectory.p[:, group], styles[seed % len(styles)], color=f"C{group}",
                        label=label)
        ax.set_title(f"{arm}: p per group (line style: seed)", fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("p")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def write_summary(runs: list[AblationRun], out: Path, baselines: Sequence[str] = (),
                  metrics: Sequence[str] = SUMMARY_METRICS, missing: Sequence[AblationRun] = ()) -> Summary:
    """Write OUT/ablation.md, OUT/ablation.csv and OUT/ablation.png (and OUT/ablation_p.png when an arm
    learns exponents) from the finished ``runs``; return the summary.

    With ``baselines`` (names of the runs' arms), each also reports the paired differences to every one.
    ``missing`` are planned runs not finished yet: the Markdown and the figure then say the tables are
    interim and name them (the CSV's ``seeds`` and ``paired_seeds`` count what each row covers).
    """
    summary = summarise(runs, baselines, metrics)
    interim = interim_note(len(runs), missing)
    write_markdown(summary, out / "ablation.md", interim)
    write_csv(summary, out / "ablation.csv")
    write_plot(summary, out / "ablation.png", interim)
    if summary.exponents:
        write_exponent_plot(summary, out / "ablation_p.png")
    return summary
