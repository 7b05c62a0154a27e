"""The model a run config describes: what training starts from, and the shell a checkpoint loads into.

The trainer builds its model here, and so do the readers of a finished run (:mod:`mmggem.checkpoint.runs`:
evaluation and export of a checkpoint), so a checkpoint always loads into the architecture it was
trained as, without importing the trainer. :func:`mmggem.model.clip.create_model` builds a model from
an architecture name; this adds what the run config says on top (FLIP patch dropout, SigLIP's
initial temperature and bias, gradient checkpointing, locked towers).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..model.clip import create_model, lock_towers
from .run import RunConfig


def model_from_config(cfg: RunConfig, load_pretrained: bool = True) -> nn.Module:
    """The model ``cfg.model`` describes, with its pretrained weights (unless ``load_pretrained`` is
    false: a shell to load a checkpoint into) and its towers locked as configured."""
    vision_cfg = {"final_ln_after_pool": cfg.model.final_ln_after_pool}
    if cfg.model.patch_dropout:  # FLIP (Li et al. 2023): open_clip drops this fraction of patch tokens in training
        vision_cfg["patch_dropout"] = cfg.model.patch_dropout
    overrides: dict[str, Any] = {"vision_cfg": vision_cfg}
    if cfg.train.loss == "siglip":  # SigLIP's initial temperature and bias (Zhai et al. 2023, Sec. 3.2)
        overrides.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    model = create_model(
        cfg.model.name,
        pooling=cfg.model.pooling,
        pooling_kwargs=cfg.model.pooling_kwargs,
        text_tower=cfg.model.text_tower or None,
        pretrained=cfg.model.pretrained or None,  # without its weights, what travels with them still applies
        cache_dir=cfg.model.cache_dir or None,
        load_weights=load_pretrained,
        **overrides,
    )
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    lock_towers(model, cfg.model.lock_image, cfg.model.lock_image_unlocked_groups, cfg.model.lock_text,
                cfg.model.lock_text_unlocked_layers, cfg.model.lock_pooler)
    return model
