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
model folder, or ``open_clip:NAME`` with an open_clip checkpoint file, so open_clip
baselines are measured by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..data import formats
from ..errors import MissingPathError, UsageError, UserError
from .dataset import Encoding, Processes, open_eval_set
from .metadata import resolve_metadata
from .results import DEFAULT_RECALL_K, ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, EvalResult
from .retrieval import evaluate_retrieval
from .zeroshot import evaluate_zeroshot

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["EvalResult", "LoadedModel", "evaluate_dataset", "load_model", "TASKS"]

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
    """A model ready to evaluate, and the names its results are filed under."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    pretrained: str


def load_model(checkpoint: str, pretrained: str | None = None) -> LoadedModel:
    """Open an mmggem model folder, or ``open_clip:NAME`` with ``pretrained`` = an open_clip checkpoint file.

    Raises UserError when the weights do not fit the architecture, naming both.
    """
    if not checkpoint.startswith(OPEN_CLIP_PREFIX):
        if pretrained is not None:
            raise UsageError(f"--pretrained is for open_clip:NAME checkpoints; {checkpoint!r} is an mmggem model folder")
        from ..model import load

        model, preprocess, tokenizer = load(checkpoint)
        return LoadedModel(model, preprocess, tokenizer, model.mmggem_spec.name, str(checkpoint))
    return _load_open_clip(checkpoint[len(OPEN_CLIP_PREFIX):], pretrained)


def _load_open_clip(name: str, pretrained: str | None) -> LoadedModel:
    import open_clip

    from ..model import MODEL_CONFIG_DIR

    if pretrained is None or not Path(pretrained).is_file():
        raise MissingPathError(f"open_clip:{name} needs --pretrained FILE, an open_clip checkpoint; got {pretrained!r}")
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if name not in open_clip.list_models():
        raise UserError(f"open_clip has no model {name!r}; known: {', '.join(open_clip.list_models())}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except (RuntimeError, AssertionError, KeyError) as error:  # open_clip's loader raises all three on a mismatch
        detail = str(error)[:2000] or type(error).__name__
        raise UserError(f"{pretrained} does not fit open_clip model {name!r}: {detail}") from error
    model.eval()
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(name), name, pretrained)
