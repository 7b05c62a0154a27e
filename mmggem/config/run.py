"""Typed run configuration: a YAML file plus dotted ``key=value`` overrides.

A file may start from another with ``base: other.yaml`` (a path relative to
it) and set only what differs. Every key is declared in the dataclasses below, with its type and default. An
unknown key, a value of the wrong type or an invalid value fails at start with
a :class:`ConfigError` that names the key and what is allowed, so a typo never
silently trains the wrong model for days.

Values are read as YAML, but the key's declared type decides what an unquoted
word means: YAML 1.1 reads ``off``, ``no``, ``on``, ``yes``, ``y``, dates and
numbers as booleans, dates and numbers, so a string option (``log.wandb=off``,
``train.precision=no``, ``log.run_name=2024-01-01``) keeps the text as typed,
and an optional number also takes ``none`` for None besides YAML's ``null`` and
``~``. On the command line a string option is not read as YAML at all: its text
is taken as typed, so a brace pattern (``data.train={00000..00006}.tar``), a
``#`` or a ``: `` stay in it; a value of any other type that YAML cannot read is
a :class:`ConfigError` naming the key and the syntax expected.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from ..errors import ConfigError, UserError
from ..fileio import write_text_atomic
from ..mappings import deep_merge
from ..model.pooling import POOLER_NAMES, check_pooler_options
from ..model.transforms import validate_augment
from .values import Plain, coerce, how_written, is_text, load_yaml


@dataclass
class ModelConfig:
    """``model.*``: the architecture (an open_clip or mmggem model config name), its pooler, pretrained
    weights, text tower and what is frozen."""

    name: str = "ViT-Ti-4-28"
    pooling: str = "ggem"
    pooling_kwargs: dict = field(default_factory=dict)
    pretrained: str = ""
    cache_dir: str = ""
    text_tower: str = ""
    final_ln_after_pool: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_pooler: bool = False
    patch_dropout: float = 0.0
    trim_text: bool = True


@dataclass
class DataConfig:
    """``data.*``: the training shards (a webdataset spec), how they are read, shuffled and augmented."""

    train: str = ""
    num_samples: int | None = None
    resampled: bool = True
    shuffle_buffer: int = 1000
    workers: int = 2
    accept_changed_shards: bool = False
    augment: dict = field(default_factory=dict)
    stall_warn_s: float = 300.0  # warn, naming the shards, after this long without a batch; 0: never


@dataclass
class TrainConfig:
    """``train.*``: steps, batch per process, optimizer and schedule, precision, loss, checkpoints and resume."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-6
    pool_p_lr_mult: float = 10.0
    grad_clip: float | None = 1.0
    precision: Literal["no", "bf16", "fp16"] | None = None  # None: the launcher's (mmggem.train.precision)
    accum_steps: int = 1
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = ""
    stop_at_step: int | None = None
    time_limit: str = ""
    max_bad_steps: int = 5
    threads: int | None = None
    tf32: bool = True


@dataclass
class EvalConfig:
    """``eval.*``: the CLIP_benchmark-layout sets evaluated during training (``every`` steps) and at the end."""

    datasets: list = field(default_factory=list)
    every: int = 0
    batch_size: int = 256
    workers: int = 1


@dataclass
class LogConfig:
    """``log.*``: the console, ``results.jsonl`` and the trackers (wandb, TensorBoard) and how runs are named."""

    every: int = 10
    wandb: Literal["off", "offline", "online"] = "off"
    tensorboard: bool = False
    project: str = "mmggem"
    entity: str = ""
    group: str = ""
    tags: list = field(default_factory=list)
    notes: str = ""
    run_name: str = ""
    progress: bool = True


@dataclass
class RunConfig:
    """One run: where it writes, its seed, and the sections above. Every key, its type, default and meaning
    is tabulated in docs/configuration.md (a test keeps that table and these classes in step)."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``3h50m``, ``90m`` or ``45s``."""
    match = _DURATION.match(text.strip())
    if not text.strip() or not match:
        raise ConfigError(f"train.time_limit: {text!r} is not a duration like '3h50m', '90m' or '45s'")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        shown = values.text if isinstance(values, Plain) else values
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shown!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed under '{prefix.rstrip('.') or 'top level'}': "
                          + ", ".join(sorted(hints)))
    kwargs = {}
    for name, annotation in hints.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, values[name], f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(prefix + name, values[name], annotation)
    return cls(**kwargs)


def _validate(cfg: RunConfig) -> None:
    positive = {"train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
                "train.accum_steps": cfg.train.accum_steps, "train.checkpoint_every": cfg.train.checkpoint_every,
                "train.keep_checkpoints": cfg.train.keep_checkpoints, "train.max_bad_steps": cfg.train.max_bad_steps,
                "log.every": cfg.log.every, "eval.batch_size": cfg.eval.batch_size}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {cfg.train.lr}")
    if cfg.model.pooling not in POOLER_NAMES:
        raise ConfigError(f"model.pooling: {cfg.model.pooling!r} is not one of {', '.join(POOLER_NAMES)}")
    try:
        check_pooler_options(cfg.model.pooling, cfg.model.pooling_kwargs)
    except UserError as error:
        raise ConfigError(f"model.pooling_kwargs: {error}") from error
    if not cfg.data.train:
        raise ConfigError("data.train: a shard pattern is required, e.g. /data/cc3m/{00000..00331}.tar")
    if cfg.train.stop_at_step is not None and not 1 <= cfg.train.stop_at_step <= cfg.train.steps:
        raise ConfigError(f"train.stop_at_step: must be between 1 and train.steps={cfg.train.steps}, "
                          f"got {cfg.train.stop_at_step}")
    if cfg.train.accum_steps > 1 and cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(f"train.accum_steps: {cfg.train.accum_steps} must divide train.batch_size "
                          f"{cfg.train.batch_size}")
    if cfg.train.time_limit:
        parse_duration(cfg.train.time_limit)
    if len(cfg.train.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {cfg.train.betas!r}")
    # checked here, naming the key, rather than by AdamW, the schedule or the loaders in the middle of a run
    not_negative = {"train.weight_decay": cfg.train.weight_decay, "train.adam_eps": cfg.train.adam_eps,
                    "train.warmup_steps": cfg.train.warmup_steps, "data.workers": cfg.data.workers,
                    "data.shuffle_buffer": cfg.data.shuffle_buffer, "eval.workers": cfg.eval.workers,
                    "data.stall_warn_s": cfg.data.stall_warn_s}
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be between 0 and 1, got {cfg.train.min_lr_ratio}")
    if cfg.eval.every and not cfg.eval.datasets:
        raise ConfigError("eval.every is set but eval.datasets is empty")
    if not all(isinstance(tag, str) and tag for tag in cfg.log.tags):
        raise ConfigError(f"log.tags: expected a list of non-empty words, got {cfg.log.tags!r}")
    _validate_model_locks(cfg.model)
    validate_augment(cfg.data.augment)


def _validate_model_locks(model: ModelConfig) -> None:
    """Lock counts, ``lock_pooler`` and ``patch_dropout`` make sense, so no option is silently ignored."""
    for key in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
        if getattr(model, key) < 0:
            raise ConfigError(f"model.{key}: must be >= 0, got {getattr(model, key)}")
    if model.lock_image_unlocked_groups and not model.lock_image:
        raise ConfigError("model.lock_image_unlocked_groups is set but model.lock_image is false")
    if model.lock_text_unlocked_layers and not model.lock_text:
        raise ConfigError("model.lock_text_unlocked_layers is set but model.lock_text is false")
    if model.lock_pooler and not (model.lock_image or model.lock_text):
        raise ConfigError("model.lock_pooler locks the pooler and projections of a locked tower; "
                          "set model.lock_image or model.lock_text too")
    if not 0 <= model.patch_dropout < 1:
        raise ConfigError(f"model.patch_dropout: must be in [0, 1), got {model.patch_dropout}")


def apply_override(values: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict; the value is read as :func:`_override_value` says."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. train.lr=1e-3)")
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = _override_value(key, raw)


def _override_value(key: str, raw: str) -> Any:
    """The value of the override ``key=raw``: the text as typed for a string option (shells hand over
    brace patterns, ``#`` and ``: `` that YAML would read as a mapping or a comment), unless the whole
    of it is one quoted YAML string (``'a: b'``, ``''``); YAML otherwise."""
    annotation = _declared_type(key.split("."))
    if not raw or (is_text(annotation) and not _quoted(raw)):
        return raw
    try:
        return load_yaml(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{key}: {raw!r} is not valid YAML ({problem}); {how_written(key, annotation)}") from None


def _quoted(raw: str) -> bool:
    """Whether ``raw`` is one YAML string in matching quotes, as a YAML file would write it."""
    return len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" and isinstance(_yaml_or_none(raw), str)


def _yaml_or_none(raw: str) -> Any:
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return None


def _declared_type(parts: list[str]) -> Any:
    """The declared type of the dotted key ``parts``, or None where none is declared: a key inside a
    ``dict`` option (``model.pooling_kwargs.groups``), or an unknown key (:func:`_build` names it)."""
    annotation: Any = RunConfig
    for part in parts:
        if not dataclasses.is_dataclass(annotation):
            return None
        annotation = get_type_hints(annotation).get(part)
    return annotation


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain nested dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; a ``base: other.yaml`` key (relative to the file) is read first and overridden."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        values = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    return deep_merge(_read_yaml(path.parent / base, (*seen, path.resolve())), values)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, and return the validated :class:`RunConfig`."""
    values = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(values, override)
    cfg = _build(RunConfig, values, "")
    _validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a kill mid-write leaves the previous file)."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
