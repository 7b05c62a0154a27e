"""What ``mmggem train CONFIG --dry-run`` and ``mmggem ablate CONFIG --dry-run`` print: the run a
config describes, without building a model, reading data or writing anything.

The config is read by the caller with the same :func:`mmggem.config.run.load_config` a real run uses,
so every error a run would raise at config time is raised by a dry run too. What depends on the
machine or on files is reported, not refused: the processes and precision come from the launcher's
environment (``WORLD_SIZE``, set by ``accelerate launch``, torchrun and ``launch/slurm.sh``;
``ACCELERATE_MIXED_PRECISION``), and shards, evaluation sets and checkpoints are looked up and
said to be there or not, since commands are often checked before the data is in place (and the
documentation uses placeholder paths). The model name and pretrained weights are checked as the model
factory would check them, but nothing is built or fetched: an open_clip tag or ``hf-hub:`` name is
said to be fetched at start. What a real run would stop on is listed at the end, and then the dry run
exits with a usage error's status (2), so it can gate a job; 0 when a real run would start.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import braceexpand
import open_clip
import torch
import yaml
from open_clip.pretrained import get_pretrained_cfg

from ..checkpoint.store import STATE_FILE, checkpoint_dir, list_checkpoints
from ..config.run import ModelConfig, RunConfig, to_dict
from ..data.shards import count_samples, parse_spec
from ..errors import UsageError, UserError
from ..model.clip import check_buildable, model_config
from ..model.hub import is_hub_name, repo_id
from ..model.pretrained import resolve_pretrained
from .precision import effective_precision, precision_line
from .tracking import TENSORBOARD_DIR, require_tensorboard

_TRUE = ("1", "true", "yes", "y", "t", "on")  # accelerate's spelling of a set flag (accelerate.utils.str_to_bool)


@dataclass(frozen=True)
class Launch:
    """The processes a run would have, as the launcher's environment says."""

    processes: int
    rank: int
    device: str
    fsdp: bool

    @property
    def prints(self) -> bool:
        """Only the main process prints a dry run, as only it prints a real run's log."""
        return self.rank == 0


def launch_from_environment(environ: Mapping[str, str] = os.environ) -> Launch:
    """The launch the environment describes; no process group is started and no device is touched
    beyond asking torch whether CUDA is there."""
    cpu = environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    return Launch(processes=_count(environ, "WORLD_SIZE", 1), rank=_count(environ, "RANK", 0),
                  device="cpu" if cpu or not torch.cuda.is_available() else "cuda",
                  fsdp=environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE)


@dataclass(frozen=True)
class DryRun:
    """A dry run's report, and the problems it lists that a real run would stop on."""

    text: str
    problems: tuple[str, ...]

    @property
    def exit_code(self) -> int:
        """0 when a real run would start; a usage error's status when it would stop on a problem listed."""
        return UsageError.exit_code if self.problems else 0


def report(describe: Callable[[Launch], DryRun], environ: Mapping[str, str] = os.environ) -> int:
    """Print ``describe(launch)`` for the launch ``environ`` describes, on its main process only, and return
    its exit code on every process, so that a launcher's exit status says whether the run would start."""
    launch = launch_from_environment(environ)
    dry_run = describe(launch)
    if launch.prints:
        print(dry_run.text)
    return dry_run.exit_code


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    """The whole number in environment variable ``name``, ``default`` when unset; a UsageError otherwise."""
    text = environ.get(name, "")
    if not text:
        return default
    if not text.isdigit():
        raise UsageError(f"environment variable {name}={text!r} is not a whole number")
    return int(text)


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, every key with its value (what a run writes to config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_training(cfg: RunConfig, launch: Launch, problems: list[str]) -> list[str]:
    """Processes, precision, steps and batch sizes; appends what a real run would refuse to ``problems``."""
    precision = effective_precision(cfg.train.precision)
    if precision == "fp16" and (launch.device != "cuda" or launch.fsdp):
        problems.append(f"precision fp16 is refused {'under FSDP' if launch.fsdp else 'on the CPU'}; use bf16 or no")
    steps = f"steps: {cfg.train.steps}"
    if cfg.train.stop_at_step:
        steps += f", stopping at step {cfg.train.stop_at_step} (train.stop_at_step)"
    if cfg.train.time_limit:
        steps += f", or after {cfg.train.time_limit} (train.time_limit)"
    global_batch = cfg.train.batch_size * launch.processes
    micro = f", in {cfg.train.accum_steps} micro-batches" if cfg.train.accum_steps > 1 else ""
    return [f"processes: {launch.processes} ({launch.device}{', FSDP' if launch.fsdp else ''}; "
            "WORLD_SIZE of the launcher, 1 without one)",
            precision_line(precision, cfg.train.precision),
            steps,
            f"batch: {cfg.train.batch_size} per process, {global_batch} global{micro}",
            f"samples: {cfg.train.steps * global_batch:,} (steps x global batch)"]


def describe_model(cfg: RunConfig, problems: list[str]) -> list[str]:
    """The architecture and its starting weights, checked as the model factory checks them but without
    building the model or fetching weights."""
    model = cfg.model
    weights, brings_config = _describe_pretrained(model, problems)
    if not brings_config:  # a saved folder's own config replaces model.name's, as in the factory
        try:
            check_buildable(model.name, model_config(model.name))
        except UserError as error:
            problems.append(f"model.name: {error}")
    return [f"model: {model.name}", f"pretrained: {weights}"]


def describe_trackers(cfg: RunConfig, problems: list[str]) -> list[str]:
    """That TensorBoard would log, when ``log.tensorboard`` is set; a tensorboard package that does not
    import is a problem, as :func:`mmggem.train.tracking.trackers` stops a run on it at start."""
    if not cfg.log.tensorboard:
        return []
    try:
        require_tensorboard()
    except UserError as error:
        problems.append(str(error))
    return [f"tensorboard: on, into the run folder's {TENSORBOARD_DIR}/"]


def _describe_pretrained(model: ModelConfig, problems: list[str]) -> tuple[str, bool]:
    """What ``model.pretrained`` names, and whether it brings its own model config (a saved folder does,
    which replaces ``model.name``'s); a source a real run could not load is appended to ``problems``."""
    text = model.pretrained
    if not text:
        return "none (random initialisation)", False
    fetched = "fetched at start (or read from the cache)"
    if Path(text).exists():
        try:
            brings_config = resolve_pretrained(model.name, text, fetch_weights=False).model_cfg is not None
        except UserError as error:
            problems.append(f"model.pretrained: {error}")
            return f"{text} (found, not usable)", False
        return f"{text} (found{', with its model config' if brings_config else ''})", brings_config
    if is_hub_name(text):
        try:
            repo_id(text)
        except UserError as error:
            problems.append(f"model.pretrained: {error}")
        return f"{text}, {fetched}", False
    if get_pretrained_cfg(model.name, text):
        return f"{text}, an open_clip tag of {model.name}, {fetched}", False
    tags = open_clip.list_pretrained_tags_by_model(model.name)
    problems.append(f"model.pretrained: {text} is not a file or folder, an open_clip tag of {model.name!r} "
                    f"(its tags: {', '.join(tags) or 'none'}) or an hf-hub:ORG/NAME model")
    return f"{text} (not found)", False


def describe_data(cfg: RunConfig, problems: list[str]) -> list[str]:
    """The training shards of ``data.train``, source by source (how many, whether there), and the evaluation sets."""
    lines = [f"training shards: {cfg.data.train}"]
    urls: list[str] = []
    usable = True
    for source in (part.strip() for part in cfg.data.train.split("::")):
        try:
            [parsed] = parse_spec(source)
        except UserError as error:  # missing shards, a bad weight: what the loader would stop on
            named = len(list(braceexpand.braceexpand(source)))
            lines.append(f"  {source}: {named} shard(s) named, not usable now: {error}")
            problems.append(str(error))
            usable = False
            continue
        urls.extend(parsed.urls)
        weight = "" if parsed.weight == 1 else f", weight {parsed.weight:g}"
        lines.append(f"  {source}: {len(parsed.urls)} shard(s){weight}")
    lines.append(f"samples per epoch: {_epoch_size(cfg, urls if usable else None, problems)}")
    return lines + _eval_lines(cfg, problems)


def _eval_lines(cfg: RunConfig, problems: list[str]) -> list[str]:
    """The evaluation sets of ``eval.datasets``, when they run and whether each folder is there."""
    when = (f", every {cfg.eval.every} steps and at the end" if cfg.eval.every
            else ", at the end" if cfg.eval.datasets else " (eval.datasets is empty)")
    lines = [f"evaluation sets: {len(cfg.eval.datasets)}{when}"]
    for dataset in cfg.eval.datasets:
        found = Path(str(dataset)).is_dir()
        lines.append(f"  {dataset}: {'found' if found else 'not found'}")
        if not found:
            problems.append(f"evaluation set {dataset} not found")
    return lines


def _epoch_size(cfg: RunConfig, urls: list[str] | None, problems: list[str]) -> str:
    """``data.num_samples``, else the count the loader would take from beside the shards ``urls`` (None:
    not all there); a count the loader could not take is a problem, since the run would stop on it."""
    if cfg.data.num_samples is not None:
        return f"{cfg.data.num_samples:,} (data.num_samples)"
    if urls is None:
        return "unknown until the shards are there"
    try:
        return f"{count_samples(urls):,} (counted from the sizes.json or img2dataset stats beside the shards)"
    except UserError as error:
        problems.append(str(error))
        return f"unknown: {error}"


def describe_output(cfg: RunConfig, problems: list[str]) -> list[str]:
    """Where the run would write, and whether it would resume (as ``train.resume`` picks; not verified here)."""
    output_dir = Path(cfg.output_dir)
    kept = list_checkpoints(output_dir)
    lines = [f"output_dir: {output_dir} ({'exists' if output_dir.is_dir() else 'new'}"
             f"{f', {len(kept)} checkpoint(s)' if kept else ''}; a dry run writes nothing)"]
    resume = cfg.train.resume
    if not resume:
        lines.append("resume: no (train.resume is empty): starts at step 0")
        if kept:
            problems.append(f"{checkpoint_dir(output_dir)} already holds checkpoints: set train.resume=latest "
                            "or choose another output_dir")
    elif resume == "latest":
        lines.append(f"resume: from {kept[-1]} (verified at start)" if kept
                     else "resume: latest, but there is no checkpoint yet: starts at step 0")
    else:
        lines.append(f"resume: from {resume}")
        if not (Path(resume) / STATE_FILE).is_file():
            problems.append(f"train.resume={resume!r}: not a complete checkpoint ({Path(resume) / STATE_FILE} "
                            "is missing)")
    return lines


def describe_run(cfg: RunConfig, launch: Launch) -> DryRun:
    """The full dry-run report of ``mmggem train``: the resolved config, then what would run."""
    problems: list[str] = []
    lines = [*describe_training(cfg, launch, problems), *describe_model(cfg, problems),
             *describe_trackers(cfg, problems), *describe_data(cfg, problems), *describe_output(cfg, problems)]
    return conclude([config_yaml(cfg).rstrip(), "", "dry run: nothing is built, trained or written", *lines],
                    problems)


def conclude(lines: Sequence[str], problems: Sequence[str]) -> DryRun:
    """``lines`` closed by what a real run would do: start, or stop on each of ``problems``."""
    if not problems:
        return DryRun("\n".join([*lines, "a real run would start"]), ())
    closing = [f"a real run would stop on {len(problems)} problem(s) as things stand "
               f"(so this dry run exits {UsageError.exit_code}):", *(f"  - {problem}" for problem in problems)]
    return DryRun("\n".join([*lines, *closing]), tuple(problems))
