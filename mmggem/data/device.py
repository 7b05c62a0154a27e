"""uint8 images from the workers, converted to float and normalised on the device.

open_clip's transforms end in ``ToTensor`` + ``Normalize``: every worker would hand over float32
images, 4 bytes a pixel, through shared memory and then over PCIe. Here the workers stop at uint8
(``PILToTensor``, 1 byte a pixel) and the conversion ``x / 255``, ``(x - mean) / std`` runs on the
device after the copy, as timm's ``PrefetchLoader`` does. The arithmetic is the one ToTensor and
Normalize perform, in the same order, so the values are the same.

On CUDA the batches come from pinned memory (the DataLoader's ``pin_memory``) and are copied with
``non_blocking=True``: the host queues the copy and goes on without waiting for the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torchvision import transforms as T

__all__ = ["DeviceNormalizer", "Normalization", "split_transform", "to_device"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and standard deviation of a ``Normalize`` step (images in 0..1)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def _is_to_tensor(step: Any) -> bool:
    """torchvision's ToTensor, or open_clip's MaybeToTensor (ToTensor unless the input is a tensor already)."""
    return isinstance(step, T.ToTensor) or type(step).__name__ == "MaybeToTensor"


def split_transform(transform: Callable[[Any], torch.Tensor]) -> tuple[T.Compose, Normalization]:
    """Split an open_clip image transform into its uint8 part (for the workers) and its normalisation.

    ``transform`` must be a ``Compose`` whose PIL steps are followed by ``ToTensor`` and one
    ``Normalize``. The returned Compose runs the PIL steps and ends in ``PILToTensor`` (uint8, CHW).
    """
    steps = list(getattr(transform, "transforms", []))
    cut = next((index for index, step in enumerate(steps) if _is_to_tensor(step)), None)
    tail = steps[cut + 1:] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], T.Normalize):
        raise ValueError(f"cannot move this transform's normalisation to the device: expected PIL steps, then "
                         f"ToTensor and Normalize, got {transform!r}")
    normalize = tail[0]
    return T.Compose([*steps[:cut], T.PILToTensor()]), Normalization(tuple(map(float, normalize.mean)),
                                                                     tuple(map(float, normalize.std)))


class DeviceNormalizer:
    """Turns uint8 ``[B, C, H, W]`` batches on ``device`` into normalised float32 ones.

    The mean and std live on the device from construction on, so a call copies nothing from the host.
    """

    def __init__(self, normalization: Normalization, device: torch.device | str):
        self.mean = torch.tensor(normalization.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(normalization.std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
        return images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)


def to_device(images: torch.Tensor, tokens: torch.Tensor, device: torch.device,
              normalizer: DeviceNormalizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a (uint8 images, tokens) batch to ``device`` without blocking the host; normalise there."""
    images = images.to(device, non_blocking=True)
    tokens = tokens.to(device, non_blocking=True)
    return normalizer(images), tokens
