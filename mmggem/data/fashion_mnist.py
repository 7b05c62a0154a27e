"""The embedded demo dataset: a Fashion-MNIST subset with captions that describe each image.

Source and licence: Fashion-MNIST, (c) 2017 Zalando SE, MIT licence (``assets/LICENSE``), taken
from the original ``t10k-*-idx*-ubyte.gz`` files (Debian package ``dataset-fashion-mnist``).

Split: both splits come from the original 10,000-image test set, balanced by class and in file
order: the first 700 images of each class form the train split (7,000) and the next 150 of each
class the held-out test split (1,500). ``build_asset`` makes ``assets/fashion_mnist_subset.npz``
from the original files (uint8 arrays in an LZMA-compressed npz, about 3 MB). Why these sizes: the
demo trains a tiny ViT for a few minutes on CPU, seeing 15-25k samples, i.e. 2-3 passes over 7,000
images, enough to learn classes and attributes without memorising; 1,500 test images (150 per
class) keep zero-shot accuracy within about +-1 point (binomial standard error) and make
retrieval over 1,500 images a real search, while one evaluation takes seconds on CPU.

Captions: each caption names the class with one of a few synonyms ("a sneaker", "a trainer",
"a running shoe") and all attributes measured from the pixels, in one of several sentence frames.
The attributes are measured on the image as stored (a light item on a black background; the
original photos were inverted by Fashion-MNIST), on the foreground pixels (value > 32):

- size: the fraction of the 28x28 frame the item covers -> "small" / "large";
- width: the intensity-weighted spread of the item's columns -> "narrow" / "wide";
- tone: the mean foreground intensity -> "dark" / "light";
- pattern: the standard deviation of the foreground intensity -> "plain" / "patterned".

Each attribute is relative to the item's class, as words are ("a wide pair of trousers" is
narrower than "a narrow bag"): below the class's 33rd percentile gives the first word, above its
67th the second, in between no word. Percentiles come from the train split and apply to both
splits. Synonyms and frames are drawn from a fixed-seed generator in image order, so captions are
deterministic. The retrieval set gives each test image two differently phrased captions.
"""
from __future__ import annotations

import gzip
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..fileio import atomic_directory
from .write import (TRAINING_SHARDS, ClassSample, EncodedImage, RetrievalSample, TrainingSample, WriteReport,
                    progress_bar, write_classification_set, write_retrieval_set, write_training_shards)

ASSET = Path(__file__).parent / "assets" / "fashion_mnist_subset.npz"
TRAIN_PER_CLASS = 700
TEST_PER_CLASS = 150
CAPTION_SEED = 2212_04114  # the GGeM paper's arXiv id
DEMO_SAMPLES_PER_SHARD = 1000
FOREGROUND = 32

CLASSNAMES: tuple[str, ...] = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
"""Class names in Fashion-MNIST label order, phrased to read well after "a"/"the"."""

SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("t-shirt", "tee", "short-sleeved top"),
    ("pair of trousers", "pair of pants", "pair of slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "gown"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "open sandal", "summer sandal"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "short boot"),
)

ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of the {c}.",
    "a picture of the {c}.",
    "the {c}.",
    "a black and white photo of the {c}.",
)
"""Templates for the demo's zero-shot set; "the" avoids a/an errors with any class name."""

ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("size", "small", "large"),
    ("width", "narrow", "wide"),
    ("tone", "dark", "light"),
    ("pattern", "plain", "patterned"),
)
"""(measure, word below the 33rd percentile, word above the 67th), in caption order."""


@dataclass(frozen=True)
class DemoSplits:
    train_images: np.ndarray  # [N, 28, 28] uint8
    train_labels: np.ndarray  # [N] uint8
    test_images: np.ndarray
    test_labels: np.ndarray


def load_splits(path: str | os.PathLike = ASSET) -> DemoSplits:
    """The embedded train and held-out test splits."""
    with np.load(path) as arrays:
        return DemoSplits(*(arrays[name] for name in ("train_images", "train_labels", "test_images", "test_labels")))


# --- captions -------------------------------------------------------------------------------------


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image attribute measures (see the module docstring) of ``[N, H, W]`` uint8 images."""
    pixels = images.astype(np.float64)
    mask = images > FOREGROUND
    count = np.maximum(mask.sum(axis=(1, 2)), 1)
    foreground = np.where(mask, pixels, 0.0)
    tone = foreground.sum(axis=(1, 2)) / count
    pattern = np.sqrt(np.maximum((foreground**2).sum(axis=(1, 2)) / count - tone**2, 0.0))
    column_mass = foreground.sum(axis=1)  # [N, W]
    columns = np.arange(images.shape[2], dtype=np.float64)
    total = np.maximum(column_mass.sum(axis=1), 1e-9)
    centre = (column_mass * columns).sum(axis=1) / total
    width = np.sqrt((column_mass * (columns[None] - centre[:, None]) ** 2).sum(axis=1) / total)
    return {"size": mask.mean(axis=(1, 2)), "width": width, "tone": tone, "pattern": pattern}


def class_thresholds(measures: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per attribute, a ``[n_classes, 2]`` array of the class's 33rd and 67th percentiles."""
    classes = range(len(CLASSNAMES))
    return {name: np.array([np.percentile(values[labels == c], [33, 67]) for c in classes])
            for name, values in measures.items()}


def attribute_words(measures: dict[str, np.ndarray], labels: np.ndarray,
                    thresholds: dict[str, np.ndarray]) -> list[list[str]]:
    """For each image, the attribute words that apply to it, in ATTRIBUTES order."""
    words: list[list[str]] = [[] for _ in labels]
    for name, low_word, high_word in ATTRIBUTES:
        low, high = thresholds[name][labels, 0], thresholds[name][labels, 1]
        for i, value in enumerate(measures[name]):
            if value < low[i]:
                words[i].append(low_word)
            elif value > high[i]:
                words[i].append(high_word)
    return words


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _and_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def compose(noun: str, words: list[str], frame: int) -> str:
    """One caption: class ``noun`` with its attribute ``words`` in sentence frame ``frame`` (0-4)."""
    described = " ".join(words + [noun])
    frames = (
        f"{_article(described)}.",
        f"a photo of {_article(described)}.",
        f"a picture of the {described}.",
        f"{_article(noun)} that is {_and_list(words)}." if words else f"a photo of {_article(noun)}.",
        f"{_article(described)} on a black background.",
    )
    return frames[frame]


N_FRAMES = 5


def captions(images: np.ndarray, labels: np.ndarray, thresholds: dict[str, np.ndarray],
             per_image: int = 1, seed: int = CAPTION_SEED) -> list[list[str]]:
    """``per_image`` differently phrased captions for each image, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    words = attribute_words(measure(images), labels, thresholds)
    result = []
    for label, image_words in zip(labels, words):
        synonyms = SYNONYMS[int(label)]
        picks = rng.choice(len(synonyms) * N_FRAMES, size=per_image, replace=False)
        result.append([compose(synonyms[p // N_FRAMES], image_words, p % N_FRAMES) for p in picks])
    return result


# --- writing the demo -----------------------------------------------------------------------------


def _png(image: np.ndarray) -> EncodedImage:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # uint8 [H, W] -> grey "L"
    return EncodedImage("png", buffer.getvalue())


def write_demo(out: str | os.PathLike, *, samples_per_shard: int = DEMO_SAMPLES_PER_SHARD,
               overwrite: bool = False, progress: bool = True) -> list[WriteReport]:
    """Write OUT/train (training shards + sizes.json), OUT/zeroshot and OUT/retrieval (CLIP_benchmark sets).

    The evaluation sets hold the held-out test split; everything is written to a temporary
    directory renamed to OUT at the end.
    """
    splits = load_splits()
    thresholds = class_thresholds(measure(splits.train_images), splits.train_labels)
    train_captions = captions(splits.train_images, splits.train_labels, thresholds, seed=CAPTION_SEED)
    test_captions = captions(splits.test_images, splits.test_labels, thresholds, per_image=2, seed=CAPTION_SEED + 1)
    n_test = len(test_captions)
    out = Path(out)
    reports = [WriteReport(out / "train", TRAINING_SHARDS), WriteReport(out / "zeroshot", "classification set"),
               WriteReport(out / "retrieval", "retrieval set")]

    def train() -> Iterator[TrainingSample]:
        rows = zip(splits.train_images, splits.train_labels, train_captions)
        for image, label, caption in progress_bar(rows, "train", len(train_captions), progress):
            yield TrainingSample(_png(image), caption[0], {"label": int(label)})

    def zeroshot() -> Iterator[ClassSample]:
        for image, label in progress_bar(zip(splits.test_images, splits.test_labels), "zeroshot", n_test, progress):
            yield ClassSample(_png(image), int(label))

    def retrieval() -> Iterator[RetrievalSample]:
        for image, caption in progress_bar(zip(splits.test_images, test_captions), "retrieval", n_test, progress):
            yield RetrievalSample(_png(image), caption)

    with atomic_directory(out, overwrite) as tmp:
        parts = [
            write_training_shards(_mkdir(tmp / "train"), train(), samples_per_shard),
            write_classification_set(_mkdir(tmp / "zeroshot"), zeroshot(), CLASSNAMES, ZEROSHOT_TEMPLATES,
                                     samples_per_shard),
            write_retrieval_set(_mkdir(tmp / "retrieval"), retrieval(), samples_per_shard),
        ]
    for report, counts in zip(reports, parts):
        report.samples, report.shards = sum(counts.values()), len(counts)
    return reports


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


# --- making the embedded asset from the original files ------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) as a uint8 array."""
    data = gzip.open(path).read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_asset(source_dir: str | os.PathLike, out: str | os.PathLike = ASSET,
                train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS) -> Path:
    """Make the embedded npz from Fashion-MNIST's original ``t10k-*`` files in ``source_dir``.

    E.g. ``build_asset("/usr/share/datasets/fashion-mnist")`` after ``apt-get install dataset-fashion-mnist``.
    """
    images = read_idx(Path(source_dir) / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(source_dir) / "t10k-labels-idx1-ubyte.gz")
    train_index, test_index = [], []
    for c in range(len(CLASSNAMES)):
        index = np.flatnonzero(labels == c)
        if len(index) < train_per_class + test_per_class:
            raise ValueError(f"{source_dir}: class {c} ({CLASSNAMES[c]}) has {len(index)} images, fewer than "
                             f"{train_per_class + test_per_class} (train_per_class + test_per_class)")
        train_index.append(index[:train_per_class])
        test_index.append(index[train_per_class:train_per_class + test_per_class])
    train_index, test_index = np.sort(np.concatenate(train_index)), np.sort(np.concatenate(test_index))
    arrays = {
        "train_images": images[train_index], "train_labels": labels[train_index],
        "test_images": images[test_index], "test_labels": labels[test_index],
        "train_source_index": train_index.astype(np.uint16), "test_source_index": test_index.astype(np.uint16),
    }
    # An npz is a zip of .npy files; LZMA members compress these images ~15% better than
    # np.savez_compressed's deflate, and np.load reads them unchanged.
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array))
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue(),
                             compress_type=zipfile.ZIP_LZMA)
    return Path(out)
