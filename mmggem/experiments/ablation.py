"""The pooling ablation: one config, every arm x seed, the same budget, one table.

An arm is a pooling (``ggem``) or a named variant of one (``ggem-signed``: ggem with
``model.pooling_kwargs.negatives=signed``). Each run is an ordinary ``mmggem train`` in its own
process, in ``OUT/<arm>/seed_<s>/``, so a run can be inspected, resumed or re-plotted like any
other, and a finished run is reused when the ablation is started again (a run cut short resumes
from its last checkpoint). Runs go ``parallel`` at a time on one machine; under ``accelerate
launch`` each process takes its share (run i goes to process i mod N, one GPU each) and the main
process writes the summary (:mod:`mmggem.experiments.summary`) once every run has finished.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..checkpoint.store import list_checkpoints
from ..config.run import RunConfig
from ..errors import UsageError
from ..model.pooling import POOLER_NAMES
from ..train.dry_run import (DryRun, Launch, conclude, describe_data, describe_model, describe_trackers,
                              describe_training)

_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Arm:
    """One column of the comparison: a pooling, and the overrides that make a variant of it."""

    name: str
    pooling: str
    overrides: tuple[str, ...] = ()

    @property
    def run_overrides(self) -> list[str]:
        return [f"model.pooling={self.pooling}", *self.overrides]


def parse_arms(poolings: str, variants: Sequence[str] = ()) -> list[Arm]:
    """``--poolings cls,avg`` and each ``--variant "NAME=POOLING KEY=VALUE ..."`` as arms, in that order.

    A variant's name becomes its run folder and its label in the tables, so it must be a plain word
    that no other arm uses.
    """
    arms = [Arm(p.strip(), p.strip()) for p in poolings.split(",") if p.strip()]
    unknown = [arm.pooling for arm in arms if arm.pooling not in POOLER_NAMES]
    if unknown:
        raise UsageError(f"poolings must be among {', '.join(POOLER_NAMES)}, got {', '.join(unknown)}")
    for text in variants:
        name, _, rest = text.partition("=")
        words = shlex.split(rest)
        if not _ARM_NAME.fullmatch(name) or not words or words[0] not in POOLER_NAMES:
            raise UsageError(f"--variant {text!r}: expected NAME=POOLING KEY=VALUE ..., with POOLING among "
                             f"{', '.join(POOLER_NAMES)}, e.g. \"ggem-signed=ggem model.pooling_kwargs.negatives=signed\"")
        if any("=" not in word for word in words[1:]):
            raise UsageError(f"--variant {text!r}: every word after the pooling must be a key=value override")
        arms.append(Arm(name, words[0], tuple(words[1:])))
    names = [arm.name for arm in arms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"arm names must differ: {', '.join(repeated)} given twice")
    return arms


@dataclass(frozen=True)
class AblationRun:
    arm: Arm
    seed: int
    output_dir: Path

    @property
    def name(self) -> str:
        return self.arm.name

    @property
    def finished(self) -> bool:
        return (self.output_dir / "final" / "open_clip_config.json").is_file()

    def identity(self, tags: list[str]) -> list[str]:
        """Overrides that tell the run apart on a dashboard: named ``<arm>-s<seed>``, grouped under the
        ablation (its output folder's name), tagged with ``tags`` and its arm."""
        ablation = self.output_dir.parent.parent.resolve().name
        return [f"log.run_name={self.name}-s{self.seed}", f"log.group={ablation}",
                f"log.tags={json.dumps([*tags, self.name])}"]


def plan_runs(out: Path, arms: list[Arm], seeds: int) -> list[AblationRun]:
    """Every arm x seed, seed by seed: an ablation stopped part-way has whole pairs to compare."""
    return [AblationRun(arm, s, out / arm.name / f"seed_{s}") for s in range(seeds) for arm in arms]


def _run_environment(device_index: int | None) -> dict[str, str]:
    """A single-process environment for a child run, even when the ablation itself runs under a launcher."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if device_index is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(device_index)
    return env


def train_run(config: Path, run: AblationRun, overrides: list[str], device_index: int | None,
              tags: Sequence[str] = ()) -> int:
    """Train one run in a child process (resuming it if it was cut short); returns its exit code.

    The arm's overrides come after ``overrides``, and the run's name, group and tags
    (:meth:`AblationRun.identity`, ``tags`` first) last.
    """
    if run.finished:
        return 0
    run.output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmggem", "train", str(config), f"seed={run.seed}",
               f"output_dir={run.output_dir}", "train.resume=latest", "log.progress=false",
               *overrides, *run.arm.run_overrides, *run.identity(list(tags))]
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
        print(f"{run.name} seed {run.seed}: {'done' if code == 0 else f'failed (exit {code})'} "
              f"-> {run.output_dir}", flush=True)
    return [run for run, code in zip(mine, codes) if code != 0]


def run_state(run: AblationRun) -> str:
    """``finished``, ``resumable from step_N`` or ``new``: what ``mmggem ablate`` would do with the run."""
    if run.finished:
        return "finished (reused)"
    kept = list_checkpoints(run.output_dir)
    return f"resumable from {kept[-1].name}" if kept else "new"


def describe_ablation(cfg: RunConfig, runs: Sequence[AblationRun], launch: Launch) -> DryRun:
    """The dry-run report of ``mmggem ablate``: each run's budget and data, then every planned run."""
    problems: list[str] = []
    single = Launch(processes=1, rank=0, device=launch.device, fsdp=False)  # each run is its own process
    each_run = [*describe_training(cfg, single, problems), *describe_model(cfg, problems),
                *describe_trackers(cfg, problems), *describe_data(cfg, problems)]
    lines = ["dry run: nothing is trained or written",
             "each run (the config and the shared overrides; an arm's own overrides come on top):",
             *(f"  {line}" for line in each_run)]
    arms = len({run.name for run in runs})
    lines.append(f"planned runs: {len(runs)} ({arms} arm(s) x {len(runs) // max(arms, 1)} seed(s))"
                 + (f", run i on process i mod {launch.processes}" if launch.processes > 1 else ""))
    states = [run_state(run) for run in runs]
    name_width, state_width = max(len(run.name) for run in runs), max(len(state) for state in states)
    lines.extend(f"  {run.name:<{name_width}}  seed {run.seed}  {state:<{state_width}}  {run.output_dir}"
                 for run, state in zip(runs, states))
    lines.append(f"then the tables: {runs[0].output_dir.parent.parent / 'ablation.md'}, .csv and .png")
    return conclude(lines, problems)
