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
  folder's weights are loaded. A Hub id resolves anywhere, so the id the tower came from is written
  there; a local folder of the machine that trained the model does not, and the text config is
  refused the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

OPEN_CLIP_POOL_TYPES = {"cls": "tok", "avg": "avg"}
REFUSAL_PREFIX = "needs mmggem: "
HOW_TO_LOAD = "load it with mmggem.load(folder), or mmggem.load('hf-hub:org/name') for a Hub repo"


def refusal(reason: str) -> str:
    """A config key open_clip rejects; its text is what the user reads in open_clip's TypeError."""
    return f"{REFUSAL_PREFIX}{reason}, which open_clip cannot build; {HOW_TO_LOAD}"


def open_clip_model_cfg(model_cfg: dict[str, Any], pooling: str, text_source: str | None = None) -> dict[str, Any]:
    """open_clip's view of ``model_cfg`` for a model pooled with ``pooling``: exact, or refused by open_clip.

    ``text_source`` is where a Hugging Face text tower came from (a Hub id or a folder).
    """
    view = copy.deepcopy(model_cfg)
    vision_cfg = view.setdefault("vision_cfg", {})
    if pooling in OPEN_CLIP_POOL_TYPES:
        vision_cfg["pool_type"] = OPEN_CLIP_POOL_TYPES[pooling]
    else:
        vision_cfg[refusal(f"this model pools image tokens with {pooling} pooling")] = pooling
    text_cfg = view.get("text_cfg", {})
    source = (text_source or text_cfg["hf_model_name"]) if "hf_model_name" in text_cfg else None
    if source and _is_hub_id(source):  # open_clip fetches its config, as for its own HF-text models
        text_cfg.update(hf_model_name=source, hf_tokenizer_name=source)
    elif source:  # a folder of the training machine: open_clip elsewhere cannot rebuild the tower
        text_cfg[refusal(f"its Hugging Face text tower came from the local folder {source}")] = source
    return view


def open_clip_builds(model_cfg: dict[str, Any], pooling: str, text_source: str | None = None) -> bool:
    """Whether open_clip itself builds this model from its saved folder: its view holds no refusal."""
    view = open_clip_model_cfg(model_cfg, pooling, text_source)
    keys = [*view.get("vision_cfg", {}), *view.get("text_cfg", {})]
    return not any(key.startswith(REFUSAL_PREFIX) for key in keys)


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id (``org/name``) rather than a path, as huggingface_hub validates it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
