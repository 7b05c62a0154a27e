"""Metrics the ablation measures on a finished run's model, beyond what its training logged.

``head_dependence`` tests the mechanism the GGeM paper (Ko et al., arXiv 2212.04114) proposes
for its gain: pooling each head's channels with its own exponent "leads to lower head-wise
dependence". For every image of an evaluation set, the image tower's pooler output (the ``[C]``
vector before any LayerNorm after the pool and before the projection) is taken; its C channels
are split into the tower's attention heads (C / heads contiguous channels each, the groups GGeM
uses by default), and the value is the mean absolute Pearson correlation, across the set's
images, between pairs of channels that belong to different heads
(:func:`mmggem.experiments.analysis.head_dependence`, ``between``). Lower means the heads' pooled channels
vary more independently. This is the project's proxy; the paper does not define a number.

The value is tabulated as ``eval/<set>/head_dependence`` beside the evaluation's metrics, so
``mmggem ablate --metrics head_dependence`` pairs it by seed like any other. It is computed once
per run and kept in ``<run>/head_dependence.json`` with what it was computed from (the eval sets'
folders, the final weights file's size and mtime): a run retrained to more steps or given another
eval set is measured again, not read from a stale cache.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from PIL.Image import Image

from ..fileio import write_text_atomic
from ..evaluate.dataset import EvalSet, Processes, loader, open_eval_set
from ..model.clip import WEIGHTS_FILE, load
from .analysis import FINAL_MODEL, head_dependence, run_eval_folders

HEAD_DEPENDENCE = "head_dependence"
CACHE_FILE = "head_dependence.json"
_BATCH = 256


def attention_heads(model: torch.nn.Module) -> int:
    """The image tower's number of attention heads (open_clip's ViT: the first block's attention)."""
    return int(model.visual.transformer.resblocks[0].attn.num_heads)


@torch.no_grad()
def pooled_features(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: the pooler's output for a preprocessed image batch (read by a hook during the image
    tower's forward, so it is what the model computes), on the CPU, in float32."""
    outputs: list[torch.Tensor] = []
    hook = model.visual.pooler.register_forward_hook(lambda module, args, out: outputs.append(out.float().cpu()))
    try:
        device = next(model.parameters()).device
        for start in range(0, len(batch), _BATCH):
            model.visual(batch[start:start + _BATCH].to(device))
    finally:
        hook.remove()
    return torch.cat(outputs)


def _eval_sets(run_dir: Path) -> list[Path]:
    """The image sets of the run's ``eval.datasets``; a set not found is an error, since its value would be missing."""
    folders = run_eval_folders(run_dir)
    missing = [entry for entry, folder in folders.items() if folder is None]
    if missing:
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: eval set {missing[0]!r} not found from "
                                f"{Path.cwd()}: run the summary from the folder the ablation ran in")
    return [folder for folder in folders.values() if folder is not None]


def set_features(model: torch.nn.Module, preprocess: Callable[[Image], torch.Tensor], evalset: EvalSet,
                 batch_size: int = _BATCH) -> torch.Tensor:
    """``[N, C]`` pooled features of the set's images, decoded and encoded ``batch_size`` at a time so that
    only the features are held (a set's preprocessed images, ImageNet's 50k at 224 px: 30 GB, are not).
    Images that do not decode are left out, as the evaluation leaves them out."""
    on_gpu = next(model.parameters()).is_cuda
    batches = loader(evalset, preprocess, Processes(), batch_size=batch_size, num_workers=0, pin_memory=on_gpu)
    return torch.cat([pooled_features(model, batch.images) for batch in batches if batch.images is not None])


def computed_from(run_dir: Path, folders: list[Path]) -> dict[str, Any]:
    """What a run's values are computed from: its eval sets' folders and its final weights file's size and
    mtime (a retrained run's ``final/`` is written anew). A cache that says otherwise is stale."""
    weights = (run_dir / FINAL_MODEL / WEIGHTS_FILE).stat()
    return {"eval_sets": [str(folder.resolve()) for folder in folders],
            "weights": {"size": weights.st_size, "mtime_ns": weights.st_mtime_ns}}


def run_head_dependence(run_dir: Path) -> dict[str, float]:
    """``{"eval/<set>/head_dependence": value}`` for every eval set of a finished run, cached in the run and
    measured again (on the GPU when there is one) when the cache is missing, stale or from an older version."""
    folders = _eval_sets(run_dir)
    source = computed_from(run_dir, folders)
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("computed_from") == source:
            return cached["values"]
    model, preprocess, _ = load(run_dir / FINAL_MODEL)
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    values = {}
    for folder in folders:
        evalset = open_eval_set(folder)
        features = set_features(model, preprocess, evalset)
        values[f"eval/{evalset.name}/{HEAD_DEPENDENCE}"] = head_dependence(features, attention_heads(model)).between
    write_text_atomic(cache, json.dumps({"computed_from": source, "values": values}, indent=1) + "\n")
    return values
