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
per run and set and kept in ``<run>/head_dependence.json``: a finished run's model does not change.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import write_text_atomic
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


def pooled_head_dependence(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Mean absolute correlation between pooled channels of different heads over the images of ``batch``."""
    return head_dependence(pooled_features(model, batch), attention_heads(model)).between


def _eval_sets(run_dir: Path) -> list[Path]:
    """The image sets of the run's ``eval.datasets``; a set not found is an error, since its value would be missing."""
    folders = run_eval_folders(run_dir)
    missing = [entry for entry, folder in folders.items() if folder is None]
    if missing:
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: eval set {missing[0]!r} not found from "
                                f"{Path.cwd()}: run the summary from the folder the ablation ran in")
    return [folder for folder in folders.values() if folder is not None]


def run_head_dependence(run_dir: Path) -> dict[str, float]:
    """``{"eval/<set>/head_dependence": value}`` for every eval set of a finished run (cached in the run)."""
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        return json.loads(cache.read_text())
    from ..evaluate.dataset import open_eval_set, read_image
    from ..model.clip import load

    model, preprocess, _ = load(run_dir / FINAL_MODEL)
    model.eval()
    values = {}
    for folder in _eval_sets(run_dir):
        evalset = open_eval_set(folder)
        batch = torch.stack([preprocess(read_image(sample)) for sample in evalset.samples])
        values[f"eval/{evalset.name}/{HEAD_DEPENDENCE}"] = pooled_head_dependence(model, batch)
    write_text_atomic(cache, json.dumps(values, indent=1) + "\n")
    return values
