"""Zero-shot classification: a classifier from class names and templates, and CLIP_benchmark's metrics.

The operations and their order are CLIP_benchmark's (``clip_benchmark.metrics.
zeroshot_classification``), so the numbers are the same:

- class embedding = normalised mean of the normalised embeddings of the class's
  templates, under ``torch.autocast(device, enabled=amp)``;
- logits = ``100. * normalised image features @ classifier`` under the same autocast;
- ``acc1`` / ``acc5`` from ``logits.topk(5)`` (``acc5`` only with at least 5 classes,
  and ``acc1`` from ``topk(1)`` below that), ``mean_per_class_recall`` = balanced
  accuracy of ``logits.argmax`` (the mean, over the labels present, of each label's recall).

What differs is the work around them: all class-template texts are encoded in
batches (split over processes), and image features are computed once per sample
across processes and gathered in sample order.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..data import formats
from ..errors import UserError
from .dataset import EvalSet, Processes, Sample
from .encode import Encoding, encode_set_images, encode_texts
from .metadata import ClassMetadata
from .results import ZEROSHOT_CLASSIFICATION, EvalResult

LOGIT_SCALE = 100.0
"""CLIP_benchmark scales cosine similarities by a fixed 100, not the model's learned scale."""


def check_labels(samples: Sequence[Sample], metadata: ClassMetadata) -> None:
    """Raise :class:`UserError` naming the first sample whose label is not an index into the class names."""
    num_classes = len(metadata.classnames)
    for sample in samples:
        if not 0 <= sample.label < num_classes:
            raise UserError(
                f"{sample.where}.{formats.LABEL_KEY}: label {sample.label} is not covered by the {num_classes} "
                f"class names of {metadata.classnames_source} (valid labels: 0..{num_classes - 1})"
            )


@torch.inference_mode()
def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    metadata: ClassMetadata,
    processes: Processes,
    encoding: Encoding,
) -> torch.Tensor:
    """The ``(embed_dim, num_classes)`` zero-shot classifier, on the encoding device."""
    texts = [template.format(c=classname) for classname in metadata.classnames for template in metadata.templates]
    per_template = encode_texts(model, tokenizer, texts, processes, encoding).to(encoding.device)
    count = len(metadata.templates)
    columns = []
    with torch.autocast(encoding.device.type, enabled=encoding.amp):
        for c in range(len(metadata.classnames)):
            embedding = per_template[c * count : (c + 1) * count].mean(dim=0)
            embedding /= embedding.norm()
            columns.append(embedding)
    return torch.stack(columns, dim=1)


@torch.inference_mode()
def logits_of(features: torch.Tensor, classifier: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """CLIP_benchmark's logits ``100. * features @ classifier``, in float32 on the CPU, computed in batches."""
    chunks = []
    for start in range(0, len(features), encoding.batch_size):
        with torch.autocast(encoding.device.type, enabled=encoding.amp):
            logits = LOGIT_SCALE * features[start : start + encoding.batch_size].to(encoding.device) @ classifier
        chunks.append(logits.float().cpu())
    return torch.cat(chunks)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``acc1``, ``acc5`` (with at least 5 classes) and ``mean_per_class_recall``, as CLIP_benchmark computes them."""
    ks = (1, 5) if num_classes >= 5 else (1,)
    top = logits.topk(max(ks), 1, True, True)[1].t()
    correct = top.eq(target.view(1, -1).expand_as(top))
    metrics = {f"acc{k}": int(correct[:k].sum()) / len(target) for k in ks}
    metrics["mean_per_class_recall"] = balanced_accuracy(target.numpy(), logits.argmax(dim=1).numpy())
    return metrics


def balanced_accuracy(target: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the labels present in ``target`` (ascending) of the fraction of them predicted right.

    The same arithmetic as scikit-learn's ``balanced_accuracy_score`` (float64 ratios, ``np.mean``).
    """
    labels, counts = np.unique(target, return_counts=True)
    hits = np.bincount(target[target == predicted], minlength=int(labels[-1]) + 1)[labels]
    return float(np.mean(hits / counts))


def evaluate_zeroshot(
    model: torch.nn.Module,
    evalset: EvalSet,
    metadata: ClassMetadata,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
    processes: Processes,
    encoding: Encoding,
    *,
    name: str,
) -> EvalResult:
    """Zero-shot classification of ``evalset`` with ``model``; every process returns the same result."""
    check_labels(evalset.samples, metadata)
    classifier = build_classifier(model, tokenizer, metadata, processes, encoding)
    images = encode_set_images(model, evalset, preprocess, processes, encoding)
    target = torch.tensor([evalset.samples[i].label for i in images.indices.tolist()])
    logits = logits_of(images.features, classifier, encoding)
    return EvalResult(
        dataset=name,
        task=ZEROSHOT_CLASSIFICATION,
        metrics=classification_metrics(logits, target, len(metadata.classnames)),
        num_samples=len(target),
        precision=encoding.precision,
        skipped=dict(images.skips.counts),
        details={"predicted": logits.argmax(dim=1), "target": target, "classnames": list(metadata.classnames)},
    )
