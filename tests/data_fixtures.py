"""Helpers for the data tests: tiny images, real tar shards, a transform and a reversible tokenizer."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms as T
import webdataset as wds
from PIL import Image

from mmggem.cli import main

SIDE = 8
CONTEXT = 96


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def noise(seed: int, size: int = 16) -> Image.Image:
    """A distinct RGB image per seed (so batches can be told apart)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_tar(path: Path, samples: Sequence[dict]) -> Path:
    """Write samples (webdataset dicts with __key__) into a real tar with webdataset's TarWriter."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def caption_shards(directory: Path, sizes: Sequence[int], start: int = 0, sizes_json: bool = True) -> list[Path]:
    """Training shards of the given sizes; sample i has a noise image and caption 'sample {i}'."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, counts, index = [], {}, start
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append({"__key__": f"{index:09d}", "png": image_bytes(noise(index)), "txt": f"sample {index}"})
            index += 1
        paths.append(write_tar(directory / f"{shard:05d}.tar", samples))
        counts[paths[-1].name] = size
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps(counts))
    return paths


def transform() -> T.Compose:
    """A random transform, so determinism and resume also cover the transform's random draws."""
    return T.Compose([T.RandomResizedCrop(SIDE, scale=(0.3, 1.0), antialias=True), T.ToTensor()])


def plain_transform(image: Image.Image) -> torch.Tensor:
    """Resize only: pixel values stay checkable."""
    return T.functional.to_tensor(image.resize((SIDE, SIDE), Image.NEAREST))


def byte_tokenizer(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes padded to CONTEXT: a tokenizer whose output decodes back to the caption."""
    rows = [list(text.encode("utf-8")[:CONTEXT].ljust(CONTEXT, b"\0")) for text in texts]
    return torch.tensor(rows, dtype=torch.long)


def decode_tokens(tokens: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode("utf-8", errors="replace") for row in tokens]


def run_cli(argv: Sequence[str]) -> int:
    """Run `mmggem ...` in this process through the console script's entry point."""
    return main(list(argv))
