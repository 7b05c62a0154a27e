"""Pictures of an evaluation, as ``[H, W, 3]`` uint8 arrays any tracker shows: what the model retrieves
for a few held-out captions, and the zero-shot confusion matrix.

They are drawn from what the evaluation already computed (:attr:`EvalResult.details`): no image is
encoded again, and only the handful of images shown are read back from the set's shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import ImageOps

from .dataset import Sample, read_image

EXAMPLE_CAPTIONS = 4
TOP_K = 5
THUMBNAIL = 64
MAX_CONFUSION_CLASSES = 100
RIGHT, WRONG = (40, 160, 40), (200, 200, 200)


@dataclass(frozen=True)
class RetrievalExample:
    """A held-out caption, the image rows ranked best for it (best first), and the row of its own image."""

    caption: str
    ranked: list[int]
    right: int

    @property
    def rank(self) -> int | None:
        """Where the right image came (1 = first) among those shown, None when it is not among them."""
        return self.ranked.index(self.right) + 1 if self.right in self.ranked else None


def retrieval_examples(details: dict, count: int = EXAMPLE_CAPTIONS, k: int = TOP_K) -> list[RetrievalExample]:
    """The first caption of ``count`` images spread evenly over the set (the same ones at every
    evaluation), each with its ``k`` best-scoring images; ``details`` is a retrieval result's."""
    texts = [text for sample in details["samples"] for text in sample.captions]  # text_features' order
    text_image = details["text_image"]
    rows = len(details["image_features"])
    chosen = sorted(set(np.linspace(0, rows - 1, min(count, rows)).round().astype(int).tolist()))
    firsts = torch.searchsorted(text_image, torch.tensor(chosen)).tolist()
    examples = []
    for row, text in zip(chosen, firsts):
        if text >= len(text_image) or int(text_image[text]) != row:
            continue  # an image with no caption
        scores = details["text_features"][text].float() @ details["image_features"].float().T
        ranked = scores.topk(min(k, rows)).indices.tolist()
        examples.append(RetrievalExample(texts[text], ranked, row))
    return examples


def thumbnail(sample: Sample, border: tuple[int, int, int], size: int = THUMBNAIL) -> np.ndarray:
    """The sample's image squeezed to ``size`` pixels square inside a 3-pixel frame of colour ``border``."""
    image = read_image(sample).resize((size - 6, size - 6))
    return np.asarray(ImageOps.expand(image, border=3, fill=border))


def retrieval_rows(examples: list[RetrievalExample], samples: Sequence[Sample]) -> list[list]:
    """Table rows: caption, the top images (the right one framed green), and the right image's rank."""
    return [[example.caption,
             *(thumbnail(samples[row], RIGHT if row == example.right else WRONG) for row in example.ranked),
             example.rank if example.rank is not None else f">{len(example.ranked)}"]
            for example in examples]


def retrieval_picture(examples: list[RetrievalExample], samples: Sequence[Sample]) -> np.ndarray:
    """One picture: a row per caption (its text above), its top images left to right, the right one framed."""
    rows = retrieval_rows(examples, samples)
    columns = max(len(row) - 2 for row in rows)
    figure = Figure(figsize=(1.3 * columns, 1.6 * len(rows)))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axis_row, (caption, *images, rank) in zip(axes, rows):
        for axis in axis_row:
            axis.axis("off")
        for axis, image in zip(axis_row, images):
            axis.imshow(image)
        axis_row[0].set_title(f"{caption[:70]}  (right image: {rank})", fontsize=7, loc="left")
    return pixels(figure)


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, classes: int) -> np.ndarray:
    """``[classes, classes]`` counts: row = true class, column = predicted class."""
    flat = target.long() * classes + predicted.long()
    return torch.bincount(flat, minlength=classes * classes).reshape(classes, classes).numpy()


def confusion_picture(predicted: torch.Tensor, target: torch.Tensor, classnames: Sequence[str]) -> np.ndarray:
    """The confusion matrix, each row divided by its class's count (the diagonal is per-class recall)."""
    counts = confusion_matrix(predicted, target, len(classnames))
    recall = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.25 * len(classnames), 14)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    image = axis.imshow(recall, vmin=0, vmax=1, cmap="Blues")
    if len(classnames) <= 30:
        axis.set_xticks(range(len(classnames)), classnames, rotation=90, fontsize=7)
        axis.set_yticks(range(len(classnames)), classnames, fontsize=7)
    axis.set(xlabel="predicted", ylabel="true")
    figure.colorbar(image, ax=axis, shrink=0.8)
    return pixels(figure)


def pixels(figure: Figure) -> np.ndarray:
    """The figure drawn by matplotlib's Agg canvas (no pyplot, no global backend), as RGB pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure.set_layout_engine("tight")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
