"""The pooling ablation: one config, every arm x seed, the same budget, one table.

An arm is a pooling (``ggem``) or a named variant of one (``ggem-signed``: ggem with
``model.pooling_kwargs.negatives=signed``). Each run is an ordinary ``mmggem train`` in its own
process, in ``OUT/<arm>/seed_<s>/``, so a run can be inspected, resumed or re-plotted like any
other, and a finished run is reused when the ablation is started again (a run cut short resumes
from its last checkpoint). Runs go ``parallel`` at a time on one machine; under ``accelerate
launch`` each process takes its share (run i goes to process i mod N, one GPU each) and the main
process writes the summary (:mod:`mmggem.experiments.summary`) once every run has finished.

A run found in its folder is reused (or resumed) only if its ``config.yaml`` trained what the plan
would train (:func:`reuse_conflicts`), so one table never mixes budgets or models silently.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..checkpoint.runs import RUN_CONFIG
from ..checkpoint.store import list_checkpoints
from ..config.run import RunConfig, load_config, to_dict
from ..errors import UsageError
from ..model.pooling import POOLER_NAMES
from ..train.dry_run import (DryRun, Launch, conclude, describe_data, describe_model, describe_trackers,
                              describe_training)

_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
_ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
OPERATIONAL_KEYS = ("output_dir", "log", "train.resume", "train.threads", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.stop_at_step", "train.time_limit", "train.max_bad_steps",
                    "train.tf32", "data.workers", "data.accept_changed_shards", "data.stall_warn_s",
                    "model.cache_dir", "model.compile", "model.grad_checkpointing", "eval.every", "eval.batch_size",
                    "eval.workers")
"""Config keys (or whole sections) that say how or where a run went, not what it trained: a finished
run is reused whatever they were."""
LAUNCHER_DEFAULT_KEYS = ("train.precision",)
"""Keys whose unset value means the launcher's choice, which the run's config.yaml records as the one in
effect: compared only when the plan sets them."""


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
    if not arms:
        raise UsageError(f"--poolings {poolings!r} names no pooling and no --variant is given: name at least one "
                         f"arm, e.g. --poolings gem,ggem (poolings: {', '.join(POOLER_NAMES)})")
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
    """A single-process environment for a child run on this process's GPU, even under a launcher.

    The launcher's rank variables are dropped (the child is a run of its own). Where
    CUDA_VISIBLE_DEVICES is already set (SLURM's ``--gpus-per-node``, accelerate's ``--gpu_ids``), every
    process of the launch got the same list and the child would take its first entry: all runs would
    land on one GPU. So the child gets the ``device_index``-th entry, modulo the list's length as
    accelerate picks the process's own device; unset, it gets ``device_index`` itself.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    if device_index is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = [d.strip() for d in (visible or "").split(",") if d.strip()]
        if visible is None:
            env["CUDA_VISIBLE_DEVICES"] = str(device_index)
        elif devices:
            env["CUDA_VISIBLE_DEVICES"] = devices[device_index % len(devices)]
    return env


def train_overrides(run: AblationRun, overrides: Sequence[str], tags: Sequence[str] = ()) -> list[str]:
    """The overrides ``mmggem train`` gets for ``run``: its seed and folder, then ``overrides``, the arm's own
    and last the run's name, group and tags (:meth:`AblationRun.identity`, ``tags`` first)."""
    return [f"seed={run.seed}", f"output_dir={run.output_dir}", "train.resume=latest", "log.progress=false",
            *overrides, *run.arm.run_overrides, *run.identity(list(tags))]


def train_run(config: Path, run: AblationRun, overrides: list[str], device_index: int | None,
              tags: Sequence[str] = ()) -> int:
    """Train one run in a child process (resuming it if it was cut short); returns its exit code."""
    if run.finished:
        return 0
    run.output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmggem", "train", str(config), *train_overrides(run, overrides, tags)]
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


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as ``section.key`` -> value; a dict-valued option (``model.pooling_kwargs``) stays one value."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update((f"{key}.{inner}", inner_value) for inner, inner_value in value.items())
        else:
            flat[key] = value
    return flat


def _trains_the_same(key: str) -> bool:
    """Whether ``key`` says what a run trains (and so must match for the run to be reused)."""
    return not any(key == op or key.startswith(f"{op}.") for op in OPERATIONAL_KEYS)


Differences = dict[str, tuple[Any, Any]]
"""Config keys on which a run found in its folder differs from the plan, each with (its value, the plan's)."""


def reuse_conflicts(run: AblationRun, planned: RunConfig) -> Differences:
    """How the run in ``run``'s folder differs from ``planned``.

    Only a run the ablation would reuse or resume (finished, or holding a checkpoint) is compared, through
    the ``config.yaml`` its last start wrote, on the keys that say what it trains: operational keys
    (:data:`OPERATIONAL_KEYS`) and keys on one side only (a config written by an older mmggem lacks
    newer keys) are left out.
    """
    saved_file = run.output_dir / RUN_CONFIG
    if not saved_file.is_file() or not (run.finished or list_checkpoints(run.output_dir)):
        return {}
    saved, plan = _flat(yaml.safe_load(saved_file.read_text()) or {}), _flat(to_dict(planned))
    return {key: (saved[key], plan[key]) for key in plan
            if key in saved and _trains_the_same(key) and saved[key] != plan[key]
            and not (key in LAUNCHER_DEFAULT_KEYS and plan[key] is None)}


def find_conflicts(config: Path, runs: Sequence[AblationRun], overrides: Sequence[str],
                   tags: Sequence[str] = ()) -> dict[AblationRun, Differences]:
    """Every run of ``runs`` already in its folder with another config than planned, and how it differs."""
    found = {run: reuse_conflicts(run, load_config(config, train_overrides(run, overrides, tags))) for run in runs}
    return {run: differences for run, differences in found.items() if differences}


def conflicts_message(conflicts: Mapping[AblationRun, Differences]) -> str:
    """One error for every run that would be reused though it trained something else than planned."""
    runs = "; ".join(f"{run.output_dir} (" + ", ".join(f"{key}: {there!r} there, {planned!r} planned"
                                                       for key, (there, planned) in differences.items()) + ")"
                     for run, differences in conflicts.items())
    return (f"{len(conflicts)} run(s) already there were trained with another config than planned, so reusing "
            f"them would mix budgets or models in one table: {runs}. Give this config another --output-dir, "
            "or move those run folders away to train them again")


def mark_done(folder: Path, rank: int) -> None:
    """Say that process ``rank`` has trained its share (a file, so no collective is held meanwhile)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank_{rank}.done").touch()


def clear_marks(folder: Path) -> None:
    """Remove the marks' folder: before a launch's processes start their shares (a previous launch's
    marks would say done too early) and once the main process has seen them all."""
    if folder.is_dir():
        shutil.rmtree(folder)


def wait_for_ranks(folder: Path, world_size: int, poll_s: float = 10.0) -> None:
    """Block until every process of ``world_size`` has marked its share done (:func:`mark_done`).

    An ablation's processes finish hours apart (one has fewer runs, or reuses them), longer than
    torch's collective timeout, so the main process polls files instead of waiting at a barrier.
    It says once which processes it waits for.
    """
    pending = [rank for rank in range(world_size) if not (folder / f"rank_{rank}.done").is_file()]
    if pending:
        print(f"waiting for process(es) {', '.join(map(str, pending))} to finish their runs "
              f"(each writes {folder}/rank_<i>.done)", flush=True)
    while pending:
        time.sleep(poll_s)
        pending = [rank for rank in pending if not (folder / f"rank_{rank}.done").is_file()]


def run_state(run: AblationRun, differences: Differences | None = None) -> str:
    """``finished``, ``resumable from step_N`` or ``new``: what ``mmggem ablate`` would do with the run;
    one that differs from the plan (:func:`reuse_conflicts`) is refused instead."""
    kept = list_checkpoints(run.output_dir)
    if differences:
        found = "finished" if run.finished else f"cut short at {kept[-1].name}"
        return f"{found}, refused: differs on {', '.join(differences)}"
    if run.finished:
        return "finished (reused)"
    return f"resumable from {kept[-1].name}" if kept else "new"


def describe_ablation(cfg: RunConfig, runs: Sequence[AblationRun], conflicts: Mapping[AblationRun, Differences],
                      launch: Launch) -> DryRun:
    """The dry-run report of ``mmggem ablate``: each run's budget and data, then every planned run and what
    would be done with it; ``conflicts`` (:func:`find_conflicts`) are listed as a problem."""
    problems: list[str] = [conflicts_message(conflicts)] if conflicts else []
    single = Launch(processes=1, rank=0, device=launch.device, fsdp=False)  # each run is its own process
    each_run = [*describe_training(cfg, single, problems), *describe_model(cfg, problems),
                *describe_trackers(cfg, problems), *describe_data(cfg, problems)]
    lines = ["dry run: nothing is trained or written",
             "each run (the config and the shared overrides; an arm's own overrides come on top):",
             *(f"  {line}" for line in each_run)]
    arms = len({run.name for run in runs})
    lines.append(f"planned runs: {len(runs)} ({arms} arm(s) x {len(runs) // max(arms, 1)} seed(s))"
                 + (f", run i on process i mod {launch.processes}" if launch.processes > 1 else ""))
    states = [run_state(run, conflicts.get(run)) for run in runs]
    name_width, state_width = max(len(run.name) for run in runs), max(len(state) for state in states)
    lines.extend(f"  {run.name:<{name_width}}  seed {run.seed}  {state:<{state_width}}  {run.output_dir}"
                 for run, state in zip(runs, states))
    lines.append(f"then the tables: {runs[0].output_dir.parent.parent / 'ablation.md'}, .csv and .png")
    return conclude(lines, problems)
