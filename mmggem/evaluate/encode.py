"""Encoding an evaluation set on every process: each encodes its block, every process gets all features.

:func:`encode_set_images` reads the images of a set (:mod:`mmggem.evaluate.dataset`) and
:func:`encode_texts` encodes class prompts or captions; both return normalised features on the CPU, in
order, gathered from every process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import PIL.Image
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from .dataset import EvalSet, Processes, Skips, loader

log = logging.getLogger(__name__)

_SHORT_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Encoding:
    """How features are computed: device, CLIP_benchmark's ``amp`` autocast switch, batch size, loader workers."""

    device: torch.device
    amp: bool
    batch_size: int
    num_workers: int
    progress: bool

    @property
    def precision(self) -> str:
        """What the numbers are computed in, for the result: ``fp32``, or ``amp_`` + autocast's dtype here."""
        if not self.amp:
            return "fp32"
        dtype = torch.get_autocast_dtype(self.device.type)
        return "amp_" + _SHORT_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class ImageFeatures:
    """Normalised features of every decodable image of a set, in sample order, and the samples left out."""

    indices: torch.Tensor
    features: torch.Tensor
    skips: Skips


@torch.inference_mode()
def encode_set_images(
    model: torch.nn.Module,
    evalset: EvalSet,
    preprocess: Callable[[PIL.Image.Image], torch.Tensor],
    processes: Processes,
    encoding: Encoding,
) -> ImageFeatures:
    """The images of an evaluation set, read from its shards: each process encodes its block, every process
    gets all features (on the CPU) and the samples skipped. (:func:`mmggem.experiments.analysis.encode_images` encodes
    a batch already in memory.)

    Raises UserError when no image of the set decodes.
    """
    device = encoding.device
    batches = loader(evalset, preprocess, processes, batch_size=encoding.batch_size,
                     num_workers=encoding.num_workers, pin_memory=device.type == "cuda")
    indices, features, failures = [], [], []
    for batch in tqdm(batches, desc=f"{evalset.name} images", disable=not (encoding.progress and processes.is_main)):
        failures.extend(batch.failures)
        if batch.images is None:
            continue
        with torch.autocast(device.type, enabled=encoding.amp):
            encoded = F.normalize(model.encode_image(batch.images.to(device)), dim=-1)
        indices.append(torch.tensor(batch.indices))
        features.append(encoded.cpu())
    parts = processes.gather([(torch.cat(indices), torch.cat(features))] if features else [])
    skips = _all_skips(evalset, processes.gather(failures), processes)
    if not parts:
        raise UserError(f"{evalset.root}: no image could be decoded ({skips.describe()})")
    return ImageFeatures(torch.cat([i for i, _ in parts]), torch.cat([f for _, f in parts]), skips)


def _all_skips(evalset: EvalSet, failures: list[tuple[int, str]], processes: Processes) -> Skips:
    """All skips of a run (those found while scanning, and images that failed to decode), logged once."""
    skips = Skips()
    skips.update(evalset.skips)
    for index, message in failures:
        skips.add("corrupt_image", f"{evalset.samples[index].where}: {message}")
    if skips.counts and processes.is_main:
        log.warning("%s: skipped %d sample(s): %s", evalset.root, sum(skips.counts.values()), skips.describe())
    return skips


@torch.inference_mode()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    processes: Processes,
    encoding: Encoding,
) -> torch.Tensor:
    """Normalised embeddings of ``texts`` (each process encodes a block), in order, on the CPU.

    Texts are batched shortest first (by characters), so that a batch trimmed to its longest text
    (:mod:`mmggem.model.text_length`) keeps little padding; the features are put back in order.
    """
    device = encoding.device
    mine = [texts[i] for i in processes.part(len(texts))]
    order = sorted(range(len(mine)), key=lambda i: len(mine[i]))
    chunks = []
    for start in range(0, len(mine), encoding.batch_size):
        tokens = tokenizer([mine[i] for i in order[start : start + encoding.batch_size]]).to(device)
        with torch.autocast(device.type, enabled=encoding.amp):
            chunks.append(F.normalize(model.encode_text(tokens), dim=-1).cpu())
    in_order = [torch.cat(chunks)[torch.argsort(torch.tensor(order))]] if chunks else []
    return torch.cat(processes.gather(in_order))
