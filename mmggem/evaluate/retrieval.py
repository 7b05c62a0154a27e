"""Zero-shot image-text retrieval: Recall@k in both directions, as CLIP_benchmark defines it.

With ``scores = text features @ image features.T`` (both normalised, as
``clip_benchmark.metrics.zeroshot_retrieval`` computes them):

- ``image_retrieval_recall@k`` (text to image): the fraction of captions whose image
  is among the ``k`` best-scoring images for that caption;
- ``text_retrieval_recall@k`` (image to text): the fraction of images with at least
  one of their own captions among the ``k`` best-scoring captions for that image.

An image whose caption file is empty stays a candidate and counts as a miss, as in
CLIP_benchmark (a sample with no caption file at all is skipped and counted when the set is read).
A recall@k is left out when there are fewer than ``k`` candidates to rank (CLIP_benchmark
would fail there). The top-k ranking is ``torch.topk`` on the same score matrix, so ties
break as CLIP_benchmark's do.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import UsageError, UserError
from .dataset import EvalSet, Processes
from .encode import Encoding, encode_set_images, encode_texts
from .results import DEFAULT_RECALL_K, ZEROSHOT_RETRIEVAL, EvalResult


@torch.inference_mode()
def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_image: torch.Tensor,
    recall_k: Sequence[int],
    device: torch.device,
) -> dict[str, float]:
    """Recall@k both ways; ``text_image[t]`` is the row of caption ``t``'s image in ``image_features``."""
    scores = (text_features @ image_features.t()).to(device)
    text_image = text_image.to(device)
    images = torch.arange(len(image_features), device=device)
    metrics = {}
    for k in recall_k:
        if k <= len(image_features):
            best_images = scores.topk(k, dim=1)[1]
            hits = (best_images == text_image[:, None]).any(dim=1)
            metrics[f"image_retrieval_recall@{k}"] = hits.cpu().float().mean().item()
        if k <= len(text_features):
            best_texts = scores.T.topk(k, dim=1)[1]
            hits = (text_image[best_texts] == images[:, None]).any(dim=1)
            metrics[f"text_retrieval_recall@{k}"] = hits.cpu().float().mean().item()
    return metrics


def evaluate_retrieval(
    model: torch.nn.Module,
    evalset: EvalSet,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    processes: Processes,
    encoding: Encoding,
    *,
    name: str,
    recall_k: Sequence[int] = DEFAULT_RECALL_K,
) -> EvalResult:
    """Retrieval between the images of ``evalset`` and their captions; every process returns the same result."""
    if not recall_k or min(recall_k) < 1:
        raise UsageError(f"recall@k needs positive k values, got {list(recall_k)}")
    images = encode_set_images(model, evalset, preprocess, processes, encoding)
    captions = [evalset.samples[i].captions for i in images.indices.tolist()]
    texts = [text for image_captions in captions for text in image_captions]
    if not texts:
        raise UserError(f"{evalset.root}: no sample has a caption; a retrieval set needs captions in its txt members")
    text_image = torch.tensor([row for row, image_captions in enumerate(captions) for _ in image_captions])
    text_features = encode_texts(model, tokenizer, texts, processes, encoding)
    return EvalResult(
        dataset=name,
        task=ZEROSHOT_RETRIEVAL,
        metrics=retrieval_metrics(images.features, text_features, text_image, recall_k, encoding.device),
        num_samples=len(captions),
        precision=encoding.precision,
        skipped=dict(images.skips.counts),
        details={"image_features": images.features, "text_features": text_features, "text_image": text_image,
                 "samples": [evalset.samples[i] for i in images.indices.tolist()]},
    )
