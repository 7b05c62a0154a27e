"""The image transforms of a model (open_clip's), and the check of the training augmentation they accept.

``data.augment`` is passed to open_clip's training transform as its ``aug_cfg``; open_clip ignores
(with a warning) the keys its chosen path does not read, so :func:`validate_augment` refuses them
when the config is loaded, beside the transform whose reading it mirrors.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from torch import nn

from ..errors import ConfigError


def image_transform(model: nn.Module, is_train: bool,
                    augment: dict[str, Any] | None = None) -> Callable[[Any], torch.Tensor]:
    """open_clip's image transform for this model: augmenting for training, else resize and crop.

    ``augment`` holds open_clip's ``aug_cfg`` keys (``scale``, ``color_jitter``, ``gray_scale_prob``,
    ``use_timm``, ``ratio``...; see ``open_clip.transform.AugmentationCfg``) and optionally the
    ``interpolation`` of timm's random resized crop; it only changes the training transform.
    """
    aug_cfg = dict(augment or {})
    preprocess_cfg = {**model.mmggem_spec.preprocess_cfg}
    if is_train and "interpolation" in aug_cfg:
        preprocess_cfg["interpolation"] = aug_cfg.pop("interpolation")
    with warnings.catch_warnings():  # open_clip warns of keys it does use (color jitter, grayscale) as unused;
        # validate_augment refuses the keys it would really ignore
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=is_train, aug_cfg=aug_cfg or None)


# open_clip's augmentation keys (AugmentationCfg), plus the interpolation its timm path reads from the
# preprocessing config. Without use_timm, open_clip's own transform reads only these:
_AUGMENT_KEYS = (*(f.name for f in dataclasses.fields(AugmentationCfg)), "interpolation")
_AUGMENT_OPEN_CLIP_KEYS = ("scale", "color_jitter", "color_jitter_prob", "gray_scale_prob", "use_timm")


def validate_augment(augment: dict[str, Any]) -> None:
    """``data.augment`` holds keys open_clip's training transform reads, and nothing it would ignore.

    Random erasing (``re_prob``) runs on the normalised tensor, after the step mmggem moves to the
    device (:mod:`mmggem.data.device`), so it is refused rather than dropped.
    """
    unknown = sorted(set(augment) - set(_AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"unknown key data.augment.{unknown[0]}; allowed: {', '.join(_AUGMENT_KEYS)}")
    if not augment.get("use_timm"):
        ignored = sorted(set(augment) - set(_AUGMENT_OPEN_CLIP_KEYS))
        if ignored:
            raise ConfigError(f"data.augment.{ignored[0]}: only timm's transform reads it; "
                              "set data.augment.use_timm=true")
        jitter = augment.get("color_jitter")
        if augment.get("color_jitter_prob") and not (isinstance(jitter, list) and len(jitter) == 4):
            raise ConfigError("data.augment.color_jitter_prob needs data.augment.color_jitter as four numbers "
                              "(brightness, contrast, saturation, hue)")
        if augment.get("color_jitter") is not None and not augment.get("color_jitter_prob"):
            raise ConfigError("data.augment.color_jitter: open_clip's transform applies it with probability "
                              "data.augment.color_jitter_prob; set that too (or use_timm=true)")
    else:
        dropped = sorted({"color_jitter_prob", "gray_scale_prob"} & set(augment))
        if dropped:
            raise ConfigError(f"data.augment.{dropped[0]}: open_clip's timm path (use_timm=true) drops it")
    if augment.get("re_prob"):
        raise ConfigError("data.augment.re_prob: random erasing runs after normalisation, which mmggem does on "
                          "the device; not supported")
    if augment.get("interpolation") not in (None, "bicubic", "bilinear", "random"):
        raise ConfigError(f"data.augment.interpolation: one of bicubic, bilinear, random, "
                          f"got {augment['interpolation']!r}")
