"""A run's ``results.jsonl`` read back: its records, and GGeM's exponents over training.

:mod:`mmggem.train.tracking` writes one JSON record per logged step; the trainer's exponent plot,
the ablation's summary and the notebooks (:mod:`mmggem.experiments.analysis`) read it here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MissingPathError
from .tracking import RESULTS_FILE, record_lines

P_PREFIX = "train/pool_p/group_"
"""The key prefix of group g's exponent p in a record (``train/pool_p/group_<g>``)."""


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/results.jsonl``, one dict per line, in file order."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise MissingPathError(f"{path} is missing: is {run_dir} a training output folder?")
    return [record for _, record in record_lines(path)]


@dataclass(frozen=True)
class PTrajectory:
    """GGeM's exponents over training: ``p[t, g]`` is group g's exponent at ``steps[t]``."""

    steps: np.ndarray  # [T] int
    p: np.ndarray  # [T, G] float

    @property
    def groups(self) -> int:
        return self.p.shape[1]


def p_trajectory(records: Sequence[dict]) -> PTrajectory:
    """The ``train/pool_p/group_<g>`` values of every record that has them, in record order.

    Raises ValueError when no record has them (a run whose pooler has no exponent,
    e.g. ``avg``) or when records disagree on the number of groups.
    """
    steps, rows = [], []
    for record in records:
        keys = sorted((key for key in record if key.startswith(P_PREFIX)), key=lambda key: int(key[len(P_PREFIX):]))
        if not keys:
            continue
        expected = [f"{P_PREFIX}{g}" for g in range(len(keys))]
        if keys != expected or (rows and len(keys) != len(rows[0])):
            raise ValueError(f"step {record.get('step')}: pooling exponents {keys} are not groups 0..G-1 "
                             f"of the {len(rows[0]) if rows else len(keys)} groups logged")
        steps.append(int(record["step"]))
        rows.append([float(record[key]) for key in keys])
    if not rows:
        raise ValueError(f"no record has {P_PREFIX}<g> values: the run's pooler has no learnable exponent "
                         "(only gem and ggem have one)")
    return PTrajectory(np.asarray(steps), np.asarray(rows))
