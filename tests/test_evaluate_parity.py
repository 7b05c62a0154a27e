"""mmggem's zero-shot classification and retrieval give CLIP_benchmark's numbers on the same model and sets.

The sets are real tar shards in CLIP_benchmark's layout, written with webdataset's
TarWriter; the reference is CLIP_benchmark's own ``build_wds_dataset`` fed to its
DataLoader as its CLI does, and its ``zeroshot_classification.evaluate`` /
``zeroshot_retrieval.evaluate``.

A randomly initialised CLIP maps every image (and every text) to nearly the same
direction, so it predicts one class for everything and agreement would prove
little. :func:`spread_model` removes that shared direction from both projections:
still untrained, but its predictions now depend on each image, so a feature paired
with the wrong label or caption changes the numbers.

The helpers here (sets, model, reference) are shared by the other ``test_evaluate_*`` files.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

import mmggem
from mmggem.evaluate import evaluate_dataset
from mmggem.model.clip import get_tokenizer, image_transform

NAME = "ViT-Ti-4-28"
WORDS = "red green blue small large dark light round square striped dotted plain old new".split()
CLASSNAMES = ["cat", "dog", "car", "tree", "house", "boat", "plane"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}.", "a blurry photo of the {c}."]


def encode_image(rng: np.random.Generator, fmt: str = "png") -> bytes:
    """A 28x28 random image (RGB, grey or palette) encoded as PNG or JPEG."""
    pixels = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
    image = PIL.Image.fromarray(pixels)
    mode = ("RGB", "L", "P")[int(rng.integers(3))]
    if mode == "L":
        image = image.convert("L")
    elif mode == "P" and fmt == "png":
        image = image.quantize(16)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG")
    return buffer.getvalue()


def write_set(root: Path, shards: list[list[dict[str, Any]]], *, dataset_type: str | None,
              classnames: list[str] | None = None, templates: list[str] | None = None) -> Path:
    """Write a CLIP_benchmark-layout set: ``root/test/{i}.tar`` from sample dicts, plus its text files."""
    (root / "test").mkdir(parents=True)
    for index, samples in enumerate(shards):
        with wds.TarWriter(str(root / "test" / f"{index}.tar")) as writer:
            for sample in samples:
                writer.write(sample)
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    if dataset_type is not None:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def classification_samples(n: int, num_classes: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` samples with random images (PNG and JPEG) and labels in ``range(num_classes)``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(start, start + n):
        fmt = "jpg" if i % 3 == 0 else "png"
        samples.append({"__key__": f"s{i:07d}", fmt: encode_image(rng, fmt), "cls": int(rng.integers(num_classes))})
    return samples


def classification_set(root: Path, *, n: int = 45, num_classes: int = 7, seed: int = 0, nshards: int = 2) -> Path:
    """A classification set of ``n`` samples over ``nshards`` shards, with its class names and templates."""
    samples = classification_samples(n, num_classes, seed)
    step = math.ceil(n / nshards)
    return write_set(root, [samples[i : i + step] for i in range(0, n, step)], dataset_type="classification",
                     classnames=CLASSNAMES[:num_classes], templates=TEMPLATES)


def retrieval_samples(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` images with one to four random captions each."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        captions = [" ".join(rng.choice(WORDS, size=4)) + " thing" for _ in range(int(rng.integers(1, 5)))]
        samples.append({"__key__": f"s{i:07d}", "png": encode_image(rng), "txt": "\n".join(captions)})
    return samples


def retrieval_set(root: Path, *, n: int = 23, seed: int = 0) -> Path:
    """A retrieval set of ``n`` images (several captions each) in two shards."""
    samples = retrieval_samples(n, seed)
    return write_set(root, [samples[: n // 2], samples[n // 2 :]], dataset_type="retrieval")


@torch.no_grad()
def spread_model(model: torch.nn.Module, tokenizer: Any, seed: int) -> torch.nn.Module:
    """Remove the direction all image (and all text) embeddings share from the projections, in place."""
    generator = torch.Generator().manual_seed(seed)
    probe_images = torch.randn(32, 3, 28, 28, generator=generator)
    probe_texts = tokenizer([" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4)) for i in range(32)])
    for projection, shared in (
        (model.visual.proj, model.encode_image(probe_images).mean(dim=0)),
        (model.text_projection, model.encode_text(probe_texts).mean(dim=0)),
    ):
        direction = F.normalize(shared, dim=0)
        projection -= (projection @ direction)[:, None] * direction[None, :]
    return model


def tiny_model(seed: int, pooling: str = "ggem") -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess, tokenizer)``: a random mmggem model whose predictions depend on the image."""
    torch.manual_seed(seed)
    model = mmggem.create_model(NAME, pooling=pooling).eval()
    tokenizer = get_tokenizer(model)
    return spread_model(model, tokenizer, seed), image_transform(model, is_train=False), tokenizer


def clip_benchmark_metrics(model: torch.nn.Module, root: Path, preprocess: Any, tokenizer: Any, *,
                           batch_size: int, amp: bool, recall_k: tuple[int, ...] = (1, 5, 10),
                           device: str = "cpu") -> dict[str, float]:
    """CLIP_benchmark's own metrics for a local webdataset set, loaded as its CLI loads ``wds/`` sets."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    dataset = build_wds_dataset(root.name, transform=preprocess, split="test", data_dir=str(root))
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    if dataset.classes is None:
        return zeroshot_retrieval.evaluate(model, loader, tokenizer, device=device, amp=amp,
                                           recall_k_list=list(recall_k))
    return zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, device,
                                            amp=amp)


def assert_same_metrics(ours: dict[str, float], reference: dict[str, float]) -> None:
    """Same keys (a NaN in the reference is a metric mmggem leaves out) and values within 1e-6."""
    expected = {key: value for key, value in reference.items() if not math.isnan(value)}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert abs(ours[key] - value) <= 1e-6, (key, ours[key], value)


@pytest.mark.parametrize("seed, amp", [(0, False), (1, False), (2, True)])
def test_classification_matches_clip_benchmark(tmp_path: Path, seed: int, amp: bool) -> None:
    model, preprocess, tokenizer = tiny_model(seed)
    root = classification_set(tmp_path / "shapes", seed=seed)
    # fp32: trimmed texts give CLIP_benchmark's numbers; under autocast only the same shapes round the same way
    ours = evaluate_dataset(model, root, preprocess, tokenizer, batch_size=16, num_workers=0, amp=amp, progress=False,
                            trim_text=not amp)
    reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=16, amp=amp)
    assert_same_metrics(ours.metrics, reference)
    assert (ours.task, ours.dataset, ours.num_samples, ours.skipped) == ("zeroshot_classification", "shapes", 45, {})
    metrics = ours.metrics  # a model that predicts one class for everything would give acc1 == recall == 1/7
    assert 0 < metrics["acc1"] < metrics["acc5"] < 1 and metrics["mean_per_class_recall"] != pytest.approx(1 / 7)


def test_classification_with_fewer_than_five_classes_has_no_acc5(tmp_path: Path) -> None:
    model, preprocess, tokenizer = tiny_model(3)
    root = classification_set(tmp_path / "three", n=30, num_classes=3, seed=3, nshards=1)
    ours = evaluate_dataset(model, root, preprocess, tokenizer, batch_size=8, num_workers=1, amp=False, progress=False)
    reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=8, amp=False)
    assert math.isnan(reference["acc5"]) and set(ours.metrics) == {"acc1", "mean_per_class_recall"}
    assert_same_metrics(ours.metrics, reference)
    assert 0 < ours.metrics["acc1"] < 1


@pytest.mark.parametrize("seed, amp", [(0, False), (1, True)])
def test_retrieval_matches_clip_benchmark(tmp_path: Path, seed: int, amp: bool) -> None:
    model, preprocess, tokenizer = tiny_model(seed)
    root = retrieval_set(tmp_path / "captions", seed=seed)
    ours = evaluate_dataset(model, root, preprocess, tokenizer, batch_size=8, num_workers=0, amp=amp, progress=False,
                            trim_text=not amp)  # see test_classification_matches_clip_benchmark
    reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=8, amp=amp)
    assert_same_metrics(ours.metrics, reference)
    assert (ours.task, ours.num_samples) == ("zeroshot_retrieval", 23)
    assert len(ours.metrics) == 6
    for direction in ("image", "text"):
        recalls = [ours.metrics[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] < 1 and recalls[2] > 0
