"""Zero-shot classification and retrieval with the numbers CLIP_benchmark gives.

The library entry point, for notebooks and for the trainer::

    from mmggem.evaluate import evaluate_dataset
    result = evaluate_dataset(model, "sets/cifar10", preprocess, tokenizer, accelerator=accelerator)
    result.task      # "zeroshot_classification" or "zeroshot_retrieval" (from dataset_type.txt)
    result.metrics   # {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}

With an ``accelerate.Accelerator`` (as during training), every process must call it:
each encodes a contiguous block of the set, the features are gathered in sample
order, and every process returns the same result, equal to a one-process run. The
model may be the prepared (DDP-wrapped) one; it is unwrapped, put in eval mode for
the evaluation and given back in the mode it was in.

``load_model`` opens what ``mmggem eval`` takes as ``--checkpoint``: an mmggem
model folder, a run folder or one of its checkpoints, ``hf-hub:org/name`` (an mmggem or
an open_clip model repo), or ``open_clip:NAME`` with a checkpoint file, pretrained tag or
``hf-hub:`` name, so open_clip baselines are measured by the same code as in CLIP_benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..data import formats
from ..errors import UsageError, UserError
from ..model.text_length import TrimmableCLIP, text_trim, trimming
from .dataset import Processes, open_eval_set
from .encode import Encoding
from .metadata import resolve_metadata
from .results import DEFAULT_RECALL_K, ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, EvalResult
from .retrieval import evaluate_retrieval
from .zeroshot import evaluate_zeroshot

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..checkpoint.runs import ModelSource

__all__ = ["EvalResult", "LoadedModel", "evaluate_dataset", "load_model", "load_run_model", "TASKS"]

TASKS = {formats.CLASSIFICATION: ZEROSHOT_CLASSIFICATION, formats.RETRIEVAL: ZEROSHOT_RETRIEVAL}
"""Dataset type (``dataset_type.txt``) -> CLIP_benchmark task name."""

OPEN_CLIP_PREFIX = "open_clip:"


def evaluate_dataset(
    model: torch.nn.Module,
    dataset_dir: str | Path,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    task: str | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    device: str | torch.device | None = None,
    accelerator: "Accelerator | None" = None,
    amp: bool | None = None,
    recall_k: Sequence[int] = DEFAULT_RECALL_K,
    name: str | None = None,
    progress: bool = True,
    trim_text: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on the CLIP_benchmark-layout set in ``dataset_dir``, as its ``dataset_type.txt`` says.

    Args:
        task: the CLIP_benchmark task expected (``zeroshot_classification`` or ``zeroshot_retrieval``);
            a set of the other type is an error. None accepts either.
        device: where the model runs; default the accelerator's device, else CUDA when available.
        accelerator: split the set over its processes and gather (all processes must call).
        amp: ``torch.autocast`` around the model (True) or full fp32 (False). None, the default, is autocast
            on CUDA, as CLIP_benchmark's default and faster there, and fp32 on other devices: autocast on a
            CPU means bf16, which is slower without bf16 units and moves the numbers. The result's
            ``precision`` says which one ran.
        recall_k: the k of Recall@k for retrieval.
        name: the dataset name in the result and for built-in class names (default: the folder's name).
        progress: a progress bar on the main process.
        trim_text: cut each text batch to its longest caption where the features stay the same
            (:mod:`mmggem.model.text_length`); False encodes every caption at the full context length.
    """
    if task is not None and task not in TASKS.values():
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS.values())}")
    evalset = open_eval_set(dataset_dir)
    found = TASKS[evalset.dataset_type]
    if task is not None and task != found:
        raise UserError(f"{dataset_dir}: a {evalset.dataset_type} set ({formats.DATASET_TYPE_FILE}), "
                        f"not one for {task}")
    processes = Processes(accelerator)
    device = torch.device(device) if device is not None else _default_device(accelerator)
    encoding = Encoding(
        device=device,
        amp=amp if amp is not None else device.type == "cuda",
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )
    name = name or evalset.name
    module = accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator is not None else model
    tokenizer = trimming(tokenizer, text_trim(module) if trim_text else None)
    was_training = module.training
    module.eval()
    try:
        if found == ZEROSHOT_RETRIEVAL:
            return evaluate_retrieval(module, evalset, preprocess, tokenizer, processes, encoding, name=name,
                                      recall_k=recall_k)
        metadata = resolve_metadata(name, evalset.classnames, evalset.templates, source=str(evalset.root))
        return evaluate_zeroshot(module, evalset, metadata, preprocess, tokenizer, processes, encoding, name=name)
    finally:
        module.train(was_training)


def _default_device(accelerator: "Accelerator | None") -> torch.device:
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class LoadedModel:
    """A model ready to evaluate, and the names its results are filed under.

    ``label`` names its result files (``{pretrained}`` in the output pattern): the run and
    checkpoint for a run's model, so two runs' ``final/`` never share a file. ``run`` and ``step``
    are recorded in the results when the model comes from a training run.
    """

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    pretrained: str
    label: str
    run: str | None = None
    step: int | None = None

    def provenance(self) -> dict[str, str | int]:
        """The ``run`` and ``step`` keys a result of this model carries (none for a model outside a run)."""
        return {} if self.run is None else {"run": self.run, "step": self.step}


def load_model(checkpoint: str, pretrained: str | None = None, cache_dir: str | None = None) -> LoadedModel:
    """Open what ``mmggem eval --checkpoint`` names.

    - an mmggem model folder, a run folder (its ``final/``) or a run's ``checkpoints/step_N``
      (see :mod:`mmggem.checkpoint.runs`), or ``hf-hub:org/name`` of an mmggem model repo;
    - ``hf-hub:org/name`` of any other open_clip model repo, built by open_clip's own ``hf-hub:`` loader;
    - ``open_clip:NAME`` with ``pretrained`` = a checkpoint file, a pretrained tag of NAME or an
      ``hf-hub:`` name, found as ``model.pretrained`` is (:func:`mmggem.model.pretrained.resolve_pretrained`).

    Hub files come from huggingface_hub's cache (``cache_dir`` or its default; offline, only the cache).
    Raises UserError when the weights do not fit the architecture, naming both.
    """
    from ..model.hub import fetch_config, is_hub_name

    if checkpoint.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(checkpoint[len(OPEN_CLIP_PREFIX):], pretrained, cache_dir)
    if pretrained is not None:
        raise UsageError(f"--pretrained is for open_clip:NAME checkpoints; {checkpoint!r} is a whole model")
    if not is_hub_name(checkpoint):
        from ..checkpoint.runs import locate

        return load_run_model(locate(checkpoint))
    if "mmggem" not in fetch_config(checkpoint, cache_dir):
        return _open_clip_model(checkpoint, None, checkpoint, cache_dir)
    from ..model.clip import load

    model, preprocess, tokenizer = load(checkpoint, cache_dir)
    return LoadedModel(model, preprocess, tokenizer, model.mmggem_spec.name, checkpoint, Path(checkpoint).name)


def load_run_model(source: "ModelSource") -> LoadedModel:
    """The model ``source`` names, filed under its run and step."""
    from ..checkpoint.runs import load_source

    model, preprocess, tokenizer = load_source(source)
    return LoadedModel(model, preprocess, tokenizer, model.mmggem_spec.name, str(source.path), source.label,
                       source.run, source.step)


def _load_open_clip(name: str, pretrained: str | None, cache_dir: str | None) -> LoadedModel:
    """open_clip's model ``name`` with ``pretrained``, built by open_clip's factory as it builds it itself.

    A tag brings its preprocessing and, through ``force_quick_gelu``, its QuickGELU (open_clip only warns
    of a config without it); an ``hf-hub:`` repo is open_clip's ``hf-hub:`` name, so its config, preprocessing
    and tokenizer apply, not those of ``name``; a file gets ``name``'s defaults.
    """
    import open_clip

    from ..model.clip import MODEL_CONFIG_DIR
    from ..model.hub import is_hub_name
    from ..model.pretrained import resolve_pretrained, tag_quick_gelu

    if pretrained is None:
        raise UsageError(f"open_clip:{name} needs --pretrained: a checkpoint file, one of its pretrained tags "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}) or hf-hub:ORG/NAME")
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if name not in open_clip.list_models():
        raise UserError(f"open_clip has no model {name!r}; known: {', '.join(open_clip.list_models())}")
    source = resolve_pretrained(name, pretrained, cache_dir)
    if source.weights.is_dir():
        raise UsageError(f"--pretrained {pretrained} is a whole mmggem model: evaluate it with --checkpoint {pretrained}")
    if is_hub_name(pretrained):  # results are filed under NAME, as for any --pretrained
        return replace(_open_clip_model(pretrained, None, pretrained, cache_dir), model_name=name)
    configured = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    if tag_quick_gelu(name, source, configured, explicit=configured) != configured:  # open_clip can only force it on
        return _open_clip_model(name, pretrained, pretrained, cache_dir, force_quick_gelu=True)
    return _open_clip_model(name, pretrained if source.tag else str(source.weights), pretrained, cache_dir)


def _open_clip_model(name: str, weights: str | None, pretrained: str, cache_dir: str | None,
                     force_quick_gelu: bool = False) -> LoadedModel:
    """open_clip's own model, transform and tokenizer for ``name`` (or an ``hf-hub:`` name) and ``weights``."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, cache_dir=cache_dir,
                                                                     require_pretrained=True,
                                                                     force_quick_gelu=force_quick_gelu)
    except (RuntimeError, AssertionError, KeyError, TypeError) as error:  # open_clip's loader raises all of these
        detail = str(error)[:2000] or type(error).__name__
        raise UserError(f"{pretrained} does not fit open_clip model {name!r}: {detail}") from error
    if type(model) is open_clip.CLIP:  # its text batches may then be trimmed (mmggem.model.text_length)
        TrimmableCLIP.adopt(model)
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name, cache_dir=cache_dir), name, pretrained,
                       Path(pretrained).name)
