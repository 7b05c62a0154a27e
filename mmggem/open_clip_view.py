"""The ``model_cfg`` open_clip reads from a saved folder: the same model, or a refusal that names mmggem.

A folder written by :func:`mmggem.save_model` is in open_clip's ``local-dir`` layout, so
``open_clip.create_model("local-dir:" + folder)`` (and ``hf-hub:`` once it is on the Hub) builds
whatever the top-level ``model_cfg`` says. mmggem itself reads its own copy from the
``mmggem`` section, so this top-level view only has to be right for open_clip:

- ``cls`` and ``avg`` are open_clip's ``pool_type`` ``"tok"`` and ``"avg"`` (``final_ln_after_pool``
  means the same in both), so open_clip builds the same model.
- ``max``, ``gem``, ``ggem`` and ``attn`` have no open_clip equivalent. The vision config then
  carries a key whose name is the explanation: open_clip's ``CLIPVisionCfg(**vision_cfg)`` refuses
  it before any weight is read, with ``TypeError: ... unexpected keyword argument '<explanation>'``,
  so a user sees why and how to load the folder instead of a state-dict mismatch.
- A Hugging Face text tower is rebuilt by open_clip from ``hf_model_name`` (its config) before the
  folder's weights are loaded. A Hub id resolves anywhere, so it is kept; a local folder of the
  machine that trained the model does not, and the text config is refused the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

OPEN_CLIP_POOL_TYPES = {"cls": "tok", "avg": "avg"}
HOW_TO_LOAD = "load it with mmggem.load(folder), or mmggem.load('hf-hub:org/name') for a Hub repo"


def refusal(reason: str) -> str:
    """A config key open_clip rejects; its text is what the user reads in open_clip's TypeError."""
    return f"needs mmggem: {reason}, which open_clip cannot build; {HOW_TO_LOAD}"


def open_clip_model_cfg(model_cfg: dict[str, Any], pooling: str) -> dict[str, Any]:
    """open_clip's view of ``model_cfg`` for a model pooled with ``pooling``: exact, or refused by open_clip."""
    view = copy.deepcopy(model_cfg)
    vision_cfg = view.setdefault("vision_cfg", {})
    if pooling in OPEN_CLIP_POOL_TYPES:
        vision_cfg["pool_type"] = OPEN_CLIP_POOL_TYPES[pooling]
    else:
        vision_cfg[refusal(f"this model pools image tokens with {pooling} pooling")] = pooling
    text_cfg = view.get("text_cfg", {})
    source = text_cfg.get("hf_model_name")
    if source is not None:
        if Path(source).exists():  # a folder of this machine: open_clip elsewhere cannot rebuild the tower
            text_cfg[refusal(f"its Hugging Face text tower came from the local folder {source}")] = source
        else:  # a Hub id: open_clip fetches its config as it does for its own HF-text models
            text_cfg["hf_tokenizer_name"] = text_cfg.get("hf_tokenizer_name") or source
    return view
