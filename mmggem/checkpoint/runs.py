"""Every model a training run holds, as a model: ``final/`` and every kept ``checkpoints/step_N``.

A run folder (``OUTPUT_DIR``) holds ``config.yaml`` (the resolved run config), ``final/`` (a
model folder written by :func:`mmggem.save_model` when training ends) and ``checkpoints/step_N``
(accelerate's training state). A checkpoint's weights are accelerate's ``model.safetensors``, or
under FSDP a ``pytorch_model_fsdp_0/`` folder of torch.distributed.checkpoint shards, which
torch's ``dcp_to_torch_save`` reads in one process whatever the number of processes that wrote it.
The run's config says how to build the model they load into (:mod:`mmggem.config.model`),
and the checkpoint is checked against its manifest (:mod:`mmggem.checkpoint.manifest`) before it is read, so
a damaged weights file is one error naming it rather than a model that silently differs.

:func:`locate` says what a path is; :func:`load_source` gives the model. Evaluation
(``mmggem eval --checkpoint``) and ``mmggem export`` both go through here, so a checkpoint
evaluated directly and its export are the same model.
"""
from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from ..config.model import model_from_config
from ..config.run import ModelConfig, load_config
from ..errors import MissingPathError, UserError
from ..model.clip import get_tokenizer, image_transform, load
from ..model.hub import CONFIG_FILE
from .manifest import CheckpointDamaged, verify_manifest
from .restore import one_line, read_json
from .store import STATE_FILE, list_checkpoints, unverified_message

RUN_CONFIG = "config.yaml"
"""The resolved run config the trainer writes into ``OUTPUT_DIR``."""
FINAL = "final"
MODEL_WEIGHTS = "model.safetensors"
"""accelerate's name for the first prepared model's weights in a saved state."""
FSDP_WEIGHTS = "pytorch_model_fsdp_0"
"""accelerate's folder for the first model's sharded (torch.distributed.checkpoint) weights."""
COMPILED_PREFIX = "_orig_mod."
"""The key prefix of a ``torch.compile``-wrapped module's state dict."""
ABLATION_RUN_FOLDER = re.compile(r"seed_\d+")
"""The folder name of one seed's run in an ablation (``OUT/<arm>/seed_<s>``)."""


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: a model folder or a checkpoint, the run it belongs to and its training step."""

    path: Path
    run_dir: Path | None = None
    step: int | None = None
    is_checkpoint: bool = False

    @property
    def run(self) -> str | None:
        """The run's name: its folder's name, or ``<arm>/seed_<s>`` for a run of an ablation.

        An ablation writes ``OUT/<arm>/seed_<s>/`` (:mod:`mmggem.experiments.ablation`), so every arm has a
        ``seed_0``: the folder above it names the arm, and the two together are unique in it.
        """
        if self.run_dir is None:
            return None
        if ABLATION_RUN_FOLDER.fullmatch(self.run_dir.name):
            return f"{self.run_dir.parent.name}/{self.run_dir.name}"
        return self.run_dir.name

    @property
    def label(self) -> str:
        """The name results of this model are filed under: the run (and the checkpoint), else the folder."""
        if self.is_checkpoint:
            return f"{self.run}_{self.path.name}"
        return self.run or self.path.name


def locate(path: str | Path, suggest_all_checkpoints: bool = True) -> ModelSource:
    """What ``path`` is: a run folder (its ``final/``), a model folder, or a run's checkpoint.

    Raises MissingPathError when it is none of them, and UserError for a run without ``final/``
    (naming its checkpoints, and ``--all-checkpoints`` where the caller has that option) or a
    checkpoint outside its run.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise MissingPathError(f"model not found: {path}")
    if (path / STATE_FILE).is_file():
        run_dir = path.parent.parent
        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"{path} is a training checkpoint, but its run's {run_dir / RUN_CONFIG} is missing: "
                            "the run config says how to build the model")
        step = read_json(path / STATE_FILE).get("step")
        if not isinstance(step, int):
            raise CheckpointDamaged(f"{path / STATE_FILE}: 'step' is {step!r}, not the step number the trainer writes")
        return ModelSource(path, run_dir, step, is_checkpoint=True)
    if (path / CONFIG_FILE).is_file():
        in_run = path.name == FINAL and (path.parent / RUN_CONFIG).is_file()
        return ModelSource(path, path.parent, _final_step(path.parent)) if in_run else ModelSource(path)
    if (path / RUN_CONFIG).is_file():
        if (path / FINAL / CONFIG_FILE).is_file():
            return locate(path / FINAL)
        kept = [p.name for p in list_checkpoints(path)]
        raise UserError(f"run {path} has no {FINAL}/ model (training has not finished); its checkpoints: "
                        f"{', '.join(kept) or 'none'}: pass one of them"
                        + (", or --all-checkpoints" if suggest_all_checkpoints else ""))
    raise MissingPathError(f"{path} is not an mmggem model folder ({CONFIG_FILE}), run folder ({RUN_CONFIG}) or "
                           f"checkpoint ({STATE_FILE})")


MODEL_DEFINING = ("name", "pooling", "pooling_kwargs", "text_tower", "final_ln_after_pool")
"""The ``model.*`` keys that decide the function a run's weights compute."""


def check_resumes_same_model(checkpoint: Path | None, model: ModelConfig) -> None:
    """Refuse to resume ``checkpoint`` (None: a new run) into a model its run did not train.

    Weights load into any architecture whose parameters have the same shapes: cls and avg pooling, the
    LayerNorm before or after the pool, another text tower of the same size. A run resumed with
    another ``model.pooling`` (say, a command reusing an output_dir that resumes from ``latest``) would
    go on training something else under the old run's name, so the :data:`MODEL_DEFINING` keys must
    equal those of the run config beside the checkpoint; a checkpoint without one is not checked.
    ``model.pretrained`` is not compared: it only gives the starting weights, and its file may move.
    """
    saved_path = checkpoint.parent.parent / RUN_CONFIG if checkpoint is not None else None
    if saved_path is None or not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{saved_path}: not valid YAML ({one_line(error)})") from None
    was, now = saved.get("model") or {}, asdict(model)
    changed = [f"model.{key} {was[key]!r} -> {now[key]!r}" for key in MODEL_DEFINING if was.get(key, now[key]) != now[key]]
    if changed:
        raise UserError(f"{checkpoint} was trained as another model ({'; '.join(changed)}; its run config: "
                        f"{saved_path}): resume it with its run's model settings, or give the new run its "
                        "own output_dir")


def run_checkpoints(run_dir: str | Path) -> list[ModelSource]:
    """Every kept checkpoint of the run ``run_dir``, oldest first (UserError when it has none)."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run folder: {run_dir / RUN_CONFIG} is missing")
    found = [locate(path) for path in list_checkpoints(run_dir)]
    if not found:
        raise UserError(f"run {run_dir} has no checkpoints in {run_dir / 'checkpoints'}")
    return found


def _final_step(run_dir: Path) -> int:
    """``final/`` is written when training reaches ``train.steps``."""
    return load_config(run_dir / RUN_CONFIG).train.steps


def load_source(source: ModelSource) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """``(model, preprocess, tokenizer)`` of ``source``, the model in eval mode, as :func:`mmggem.load` gives."""
    if not source.is_checkpoint:
        return load(source.path)
    if not verify_manifest(source.path):  # damage is one line naming the file, not weights silently wrong
        print(f"WARNING: {unverified_message(source.path)}", file=sys.stderr, flush=True)  # as resume warns
    model = model_from_config(load_config(source.run_dir / RUN_CONFIG), load_pretrained=False)
    weights = checkpoint_weights(source.path)
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    try:  # FSDP trains 0-dim parameters as shape [1] (mmggem.train.fsdp.vectorize_scalar_parameters)
        model.load_state_dict({name: value.reshape(shapes[name]) if name in shapes else value
                               for name, value in weights.items()})
    except RuntimeError as error:
        raise UserError(f"weights of checkpoint {source.path} do not fit the model of "
                        f"{source.run_dir / RUN_CONFIG}: {error}") from error
    model.eval()
    return model, image_transform(model, is_train=False), get_tokenizer(model)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights in accelerate's saved state ``path``: plain, or gathered from FSDP shards."""
    from safetensors.torch import load_file
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    if (path / MODEL_WEIGHTS).is_file():
        weights = load_file(str(path / MODEL_WEIGHTS))
    elif (path / FSDP_WEIGHTS).is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            merged = Path(scratch) / "model.pt"
            dcp_to_torch_save(str(path / FSDP_WEIGHTS), str(merged))
            weights = torch.load(merged, weights_only=True)["model"]  # accelerate saves {"model": state_dict}
    else:
        raise UserError(f"checkpoint {path} holds no model weights ({MODEL_WEIGHTS} or {FSDP_WEIGHTS}/)")
    consume_prefix_in_state_dict_if_present(weights, COMPILED_PREFIX)
    return weights
