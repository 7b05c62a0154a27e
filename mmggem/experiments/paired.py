"""Differences to a baseline paired by seed, with a t interval, for the pooling ablation.

Runs with the same seed share every initial weight but the pooler's, and the data
order (:func:`mmggem.model.clip.build_model`), so the difference of two poolings at one
seed removes the part of the seed noise they share. Over the n seeds both poolings
finished, the mean difference d and its 95% interval

    d +- t(0.975, n - 1) * s / sqrt(n)

(s the sample standard deviation of the differences) say how far apart the two
poolings are and how sure a reader can be of the sign. One seed gives no interval.

"No difference" needs a size too: the smallest true difference these n seeds would detect
with probability ``POWER`` at the same level (a two-sided paired t test), taking the measured
spread of the differences as the true one,

    (t(0.975, n - 1) + t(POWER, n - 1)) * s / sqrt(n).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

LEVEL = 0.95
POWER = 0.8


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``value - baseline`` over ``seeds`` seeds, its interval ``[low, high]`` and the smallest
    difference the seeds could detect, ``detectable`` (both nan for one seed)."""

    mean: float
    low: float
    high: float
    seeds: int
    detectable: float = math.nan

    @property
    def includes_zero(self) -> bool:
        """True when the interval cannot rule out "no difference" (always true without an interval)."""
        return not (self.low > 0 or self.high < 0)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> PairedDifference | None:
    """Compare ``values`` with ``baseline``, both keyed by seed, over the seeds both have; None if none."""
    from scipy.stats import t

    seeds = sorted(values.keys() & baseline.keys())
    diffs = [values[s] - baseline[s] for s in seeds]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, math.nan, math.nan, 1)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs))
    critical, power = float(t.ppf(0.5 + LEVEL / 2, len(diffs) - 1)), float(t.ppf(POWER, len(diffs) - 1))
    return PairedDifference(mean, mean - critical * error, mean + critical * error, len(diffs),
                            (critical + power) * error)


def format_difference(diff: PairedDifference | None) -> str:
    """``+1.23 [-0.40, +2.86] (n=3)`` in percentage points, for a table cell."""
    if diff is None:
        return "no common seed"
    if diff.seeds < 2:
        return f"{100 * diff.mean:+.2f} (n=1, no interval)"
    return f"{100 * diff.mean:+.2f} [{100 * diff.low:+.2f}, {100 * diff.high:+.2f}] (n={diff.seeds})"


def format_detectable(diff: PairedDifference | None) -> str:
    """``1.23`` percentage points, or a dash where one seed (or none) gives no spread."""
    return "-" if diff is None or diff.seeds < 2 else f"{100 * diff.detectable:.2f}"


def plain_notes(pooling: str, baseline: str, differences: dict[str, PairedDifference | None]) -> list[str]:
    """Sentences for the metrics (``differences``: metric -> difference) whose interval includes 0 or that
    have none: one for those with a single paired seed, one per seed count for the others; none when every
    interval resolves its difference."""
    single = [metric for metric, diff in differences.items() if diff is not None and diff.seeds < 2]
    notes = [f"{pooling} vs {baseline}, {', '.join(single)}: one paired seed gives no interval; "
             "run more seeds before reading anything into the difference."] if single else []
    unresolved: dict[int, list[str]] = {}
    for metric, diff in differences.items():
        if diff is not None and diff.seeds >= 2 and diff.includes_zero:
            unresolved.setdefault(diff.seeds, []).append(metric)
    for seeds, metrics in unresolved.items():
        interval = "interval includes" if len(metrics) == 1 else "intervals include"
        notes.append(f"{pooling} vs {baseline}, {', '.join(metrics)}: the 95% {interval} 0, so these {seeds} seeds "
                     f"cannot tell {pooling} from {baseline} on {'this metric' if len(metrics) == 1 else 'these metrics'} "
                     "(the difference may be seed noise).")
    return notes
