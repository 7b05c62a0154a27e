"""Two-tower CLIP built from open_clip towers, with a pluggable image pooler.

open_clip builds the towers from its JSON model configs (mmggem's own configs
in ``model_configs/`` are registered with open_clip at import, so open_clip can
build the same architectures). The image tower is open_clip's
``VisionTransformer``, adopted as a :class:`PooledVisionTransformer`: same
parameters under the same names, so open_clip state dicts load unchanged, but
its tokens are pooled by an :mod:`mmggem.model.pooling` pooler kept at
``model.visual.pooler``.

A saved model is a folder in open_clip's ``local-dir`` layout:
``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg`` and an ``mmggem``
section with the pooling and mmggem's own model config) and
``open_clip_model.safetensors``. The top-level ``model_cfg`` is open_clip's view
(:mod:`mmggem.model.open_clip_view`): open_clip builds the same model from it, or
refuses it with a message naming mmggem. Nothing in the folder is unpickled on load.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from open_clip.transformer import VisionTransformer
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import MissingPathError, UserError
from ..fileio import atomic_directory
from ..mappings import deep_merge
from ..version import __version__
from .hub import CONFIG_FILE, download_model_folder, is_hub_name
from .open_clip_view import open_clip_model_cfg
from .pooling import build_pooler
from .pretrained import resolve_pretrained, tag_quick_gelu
from .text_length import TrimmableCLIP
from .transforms import image_transform

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_FILE = "open_clip_model.safetensors"
POOLER_PREFIX = "visual.pooler."

open_clip.add_model_config(MODEL_CONFIG_DIR)
log = logging.getLogger(__name__)

Tokenizer = Callable[..., torch.Tensor]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: recorded on it and saved beside its weights."""

    name: str
    model_cfg: dict[str, Any]
    pooling: str = "ggem"
    pooling_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    # where a Hugging Face text tower came from (Hub id or folder), kept through save and load,
    # since a loaded model's tower is read from its own folder; "" for the tower's current name
    text_source: str = ""


class PooledVisionTransformer(VisionTransformer):
    """open_clip's ViT whose tokens are pooled by ``self.pooler``.

    The final LayerNorm ``ln_post`` runs before pooling (open_clip's default)
    or, with the config option ``vision_cfg.final_ln_after_pool``, on the
    pooled vector. The GGeM paper leaves this order open, so it is an option;
    note that after the LayerNorm about half the activations are negative and
    GGeM clamps them to ``eps``.
    """

    pooler: nn.Module

    @classmethod
    def adopt(cls, tower: VisionTransformer, pooler: nn.Module) -> "PooledVisionTransformer":
        """Turn an open_clip ViT into a pooled one in place, keeping its parameters."""
        if type(tower) is not VisionTransformer:
            raise TypeError(f"expected open_clip's VisionTransformer, got {type(tower).__name__}")
        if tower.attn_pool is not None:
            raise UserError("the open_clip config enables attentional_pool; use pooling='attn' instead")
        tower.__class__ = cls
        tower.pooler = pooler
        return tower

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        tokens = x[:, :1] if self.pooler.uses_class_token else x[:, 1:]
        pooled = self.pooler(tokens)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled, tokens

    def forward_with_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embedding, tokens)``: the projected image embedding and the ``[B, N, C]`` tokens pooled."""
        x = self.transformer(self._embeds(images))
        pooled, tokens = self._pool(x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return pooled, tokens


def _text_tower_cfg(text_tower: str | dict[str, Any]) -> dict[str, Any]:
    """open_clip text_cfg keys for a Hugging Face encoder.

    A string is a local ``from_pretrained`` folder (or hub id), loaded with its
    weights; a dict is merged into open_clip's ``text_cfg`` as is, e.g.
    ``{"hf_model_name": path, "hf_model_pretrained": False}`` builds the
    encoder from its config alone.
    """
    if isinstance(text_tower, str):
        return {"hf_model_name": text_tower, "hf_tokenizer_name": text_tower, "hf_model_pretrained": True}
    if "hf_model_name" not in text_tower:
        raise UserError(f"text_tower dict needs an 'hf_model_name' key, got keys {sorted(text_tower)}")
    return {"hf_tokenizer_name": text_tower["hf_model_name"], **text_tower}


def model_config(name: str) -> dict[str, Any]:
    """A copy of the open_clip model config ``name`` (open_clip's or mmggem's own, registered above); a
    UserError naming what is accepted otherwise. The factory's lookup, also used by ``mmggem train --dry-run``."""
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        ours = sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))
        raise UserError(
            f"unknown model {name!r}; mmggem's own: {', '.join(ours)}; "
            "or any open_clip model with a ViT image tower (open_clip.list_models())"
        )
    return copy.deepcopy(model_cfg)


def check_buildable(name: str, model_cfg: dict[str, Any]) -> None:
    """A UserError unless ``model_cfg`` (of model ``name``) has an open_clip ViT image tower and no CoCa decoder:
    what :func:`build_model` can pool."""
    vision_cfg = model_cfg.get("vision_cfg", {})
    if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise UserError(f"model {name!r} has no open_clip ViT image tower (timm or ResNet): not supported")
    if "multimodal_cfg" in model_cfg:
        raise UserError(f"model {name!r} is a CoCa model: not supported")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build a randomly initialised model from a :class:`ModelSpec`.

    The pooler is built last and under its own fork of the CPU random stream, so that, for one seed,
    every other weight and everything drawn after the model (augmentation, dropout) is the same
    whatever the pooling: the runs of a pooling ablation are paired by seed.
    """
    check_buildable(spec.name, spec.model_cfg)
    model_cfg = copy.deepcopy(spec.model_cfg)
    vision_cfg = model_cfg.get("vision_cfg", {})
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    model_class = open_clip.CustomTextCLIP if custom_text else TrimmableCLIP
    model = model_class(**model_cfg)
    width = model.visual.transformer.width
    heads = width // CLIPVisionCfg(**vision_cfg).head_width
    with torch.random.fork_rng(devices=[]):  # the pooler's own draws leave the global stream where it was
        pooler = build_pooler(spec.pooling, width, heads, **spec.pooling_kwargs)
    PooledVisionTransformer.adopt(model.visual, pooler)
    # the tower's own image size last, as open_clip's factory sets it over a tag's or repo's preprocessing
    preprocess_cfg = {**asdict(PreprocessCfg()), **spec.preprocess_cfg, "size": model.visual.image_size}
    set_model_preprocess_cfg(model, preprocess_cfg)
    model.mmggem_spec = ModelSpec(spec.name, spec.model_cfg, spec.pooling, dict(spec.pooling_kwargs), preprocess_cfg,
                                  spec.text_source)
    return model


def create_model(
    name: str,
    pooling: str = "ggem",
    pooling_kwargs: dict[str, Any] | None = None,
    text_tower: str | dict[str, Any] | None = None,
    pretrained: str | Path | None = None,
    cache_dir: str | Path | None = None,
    load_weights: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build a CLIP model whose image tower pools its tokens with ``pooling``.

    Args:
        name: an mmggem config (``model_configs/``) or any open_clip model name
            with a ViT image tower, e.g. ``"ViT-B-16"``.
        pooling: one of :data:`mmggem.model.pooling.POOLER_NAMES`.
        pooling_kwargs: options of the pooler (``groups``, ``p_init``, ``eps``...).
        text_tower: None for open_clip's text transformer from the config, or a
            Hugging Face encoder (see :func:`_text_tower_cfg`).
        pretrained: an open_clip checkpoint file (``.pt``, ``.bin``,
            ``.safetensors``), a folder written by :func:`save_model`, an open_clip
            pretrained tag of ``name`` (``"laion2b_s34b_b88k"``) or an ``hf-hub:org/repo``
            name (see :func:`resolve_pretrained`); every weight must load except the
            pooler's own parameters. What travels with the weights applies as in
            ``open_clip.create_model_and_transforms``: the preprocessing of a tag, repo or
            folder; a repo's model config (it replaces ``name``'s, text tower and tokenizer
            included); a tag's ``quick_gelu`` (:func:`mmggem.model.pretrained.tag_quick_gelu`).
        cache_dir: where open_clip keeps downloaded weights for tags and ``hf-hub:``
            names; None for its defaults (Hugging Face's cache, ``~/.cache/clip``).
        load_weights: False builds the model ``pretrained`` describes (config, preprocessing,
            activation) without its weights: the shell a checkpoint of a run that started from
            them loads into.
        overrides: merged into the open_clip model config, nested dicts merged
            key by key, e.g. ``vision_cfg={"final_ln_after_pool": True, "patch_dropout": 0.5}``.
    """
    source = resolve_pretrained(name, pretrained, cache_dir, load_weights) if pretrained is not None else None
    model_cfg = deep_merge(source.model_cfg if source and source.model_cfg else model_config(name), overrides)
    if source is not None and source.quick_gelu is not None:
        model_cfg["quick_gelu"] = tag_quick_gelu(name, source, bool(model_cfg.get("quick_gelu", False)),
                                                 explicit="quick_gelu" in overrides)
    if text_tower is not None:
        model_cfg["text_cfg"] = deep_merge(model_cfg["text_cfg"], _text_tower_cfg(text_tower))
    model = build_model(ModelSpec(name, model_cfg, pooling, dict(pooling_kwargs or {}),
                                  preprocess_cfg=source.preprocess_cfg if source else {}))
    if source is not None and source.weights is not None:
        load_pretrained(model, source.weights)
    return model


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load open_clip or mmggem weights into ``model``; only pooler parameters may differ."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"pretrained weights not found: {path}")
    try:
        if path.is_dir():
            result = model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
        else:  # open_clip's loader converts old and third-party layouts and resizes position embeddings
            result = open_clip.load_checkpoint(model, str(path), strict=False)
    except RuntimeError as error:
        raise UserError(f"weights in {path} do not fit model {model.mmggem_spec.name!r}: {error}") from error
    missing = [key for key in result.missing_keys if not key.startswith(POOLER_PREFIX)]
    unexpected = [key for key in result.unexpected_keys if not key.startswith(POOLER_PREFIX)]
    if missing or unexpected:
        raise UserError(
            f"weights in {path} do not fit model {model.mmggem_spec.name!r}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    fresh = [key for key in result.missing_keys if key.startswith(POOLER_PREFIX)]
    if fresh:
        log.info("pooler parameters keep their initial values: %s", fresh)


def lock_towers(model: nn.Module, image: bool = False, image_unlocked_groups: int = 0, text: bool = False,
                text_unlocked_layers: int = 0, pooler: bool = False) -> None:
    """Freeze towers as LiT does (Zhai et al. 2022), with open_clip's own ``lock`` methods.

    ``image`` locks the ViT except its last ``image_unlocked_groups`` groups (open_clip's
    ``--lock-image-unlocked-groups``: 1 is the projection, 2 adds the last block with ``ln_post``,
    each more adds one block, and the patch and position embeddings come last);
    ``text`` locks the text tower except its last ``text_unlocked_layers`` groups, counted the same
    way for open_clip's text transformer (for a Hugging Face encoder: its last layers). The pooler
    (GGeM's ``p``, the attentional pooler) and a locked tower's projection stay trainable unless
    ``pooler`` is true, so a pretrained tower can learn a new pooling. Frozen parameters have
    ``requires_grad=False``, which keeps them out of the optimizer (:func:`mmggem.train.optim.param_groups`).
    """
    if image:
        model.lock_image_tower(unlocked_groups=image_unlocked_groups)
        if not pooler:
            model.visual.pooler.requires_grad_(True)
            model.visual.proj.requires_grad_(True)
    if text:
        model.lock_text_tower(unlocked_layers=text_unlocked_layers)
        if not pooler:
            tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower apart; CLIP unpacks it
            for name in ("proj", "text_projection"):  # a Hugging Face tower's projection, open_clip's
                if getattr(tower, name, None) is not None:
                    getattr(tower, name).requires_grad_(True)


def get_tokenizer(model: nn.Module) -> Tokenizer:
    """The tokenizer of the model's text tower, as ``open_clip.get_tokenizer`` builds it for this model.

    open_clip's factory reads the model config's ``text_cfg`` (``context_length``,
    ``tokenizer_kwargs`` such as ``clean`` or ``strip_sep_token``, ``hf_tokenizer_name``,
    ``tokenizer_mode``). It takes a model name, not a config, so the model is handed to it the way
    :func:`save_model` writes it, as a ``local-dir:`` folder (a temporary one, with a Hugging Face
    tokenizer's files when the text tower has one): the options come from the factory, never a copy.
    """
    from transformers import AutoTokenizer

    text_cfg = model.mmggem_spec.model_cfg["text_cfg"]
    with tempfile.TemporaryDirectory(prefix="mmggem-tokenizer-") as folder:
        (Path(folder) / CONFIG_FILE).write_text(json.dumps({"model_cfg": model.mmggem_spec.model_cfg}))
        if text_cfg.get("hf_tokenizer_name"):  # open_clip reads a local-dir model's tokenizer from the folder
            AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(folder)
        return open_clip.get_tokenizer(f"local-dir:{folder}")


def _spec_json(model: nn.Module) -> dict[str, Any]:
    """The saved config: open_clip's view at the top level, mmggem's own spec in the ``mmggem`` section."""
    spec = model.mmggem_spec
    section = {"version": __version__, "name": spec.name, "pooling": spec.pooling,
               "pooling_kwargs": spec.pooling_kwargs, "model_cfg": copy.deepcopy(spec.model_cfg)}
    text_source = spec.text_source or spec.model_cfg["text_cfg"].get("hf_model_name")
    if text_source:
        section["text_source"] = text_source
    return {
        "model_cfg": open_clip_model_cfg(spec.model_cfg, spec.pooling, text_source),
        "preprocess_cfg": spec.preprocess_cfg,
        "mmggem": section,
    }


def _save_text_files(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Make the text side self-contained: a Hugging Face tokenizer's files and a Hugging Face tower's config.

    open_clip's ``get_tokenizer('local-dir:...')`` reads the tokenizer from the folder whenever
    ``hf_tokenizer_name`` is set, also beside its own text transformer (CLIPA, MetaCLIP-2 worldwide),
    so the files go in for every such model, not only for Hugging Face towers.
    """
    from transformers import AutoTokenizer

    text_cfg = config["mmggem"]["model_cfg"]["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(folder)
        text_cfg["hf_tokenizer_name"] = "."
    if "hf_model_name" in text_cfg:
        model.text.transformer.config.save_pretrained(folder)
        text_cfg.update(hf_model_name=".", hf_model_pretrained=False)


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` to the folder ``path`` (replaced atomically if it exists) and return it."""
    path = Path(path)
    config = _spec_json(model)
    with atomic_directory(path, overwrite=True) as staging:
        _save_text_files(model, staging, config)
        state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(state_dict, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_spec(path: str | Path) -> ModelSpec:
    """Read the :class:`ModelSpec` of a folder written by :func:`save_model` (by any mmggem version)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise MissingPathError(f"not an mmggem model folder: {config_file} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{config_file}: not readable JSON ({error}); save_model writes it") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: holds a JSON {type(config).__name__}, not an object")
    if "model_cfg" in config and "mmggem" not in config:
        raise UserError(f"{config_file} is a plain open_clip model (no 'mmggem' section), not one written by "
                        "mmggem.save_model: start from its weights with mmggem.create_model(ARCHITECTURE, "
                        "pooling=..., pretrained=WEIGHTS), WEIGHTS its weights file or hf-hub: name, or "
                        "evaluate it as it is with `mmggem eval zeroshot --checkpoint open_clip:ARCHITECTURE "
                        "--pretrained WEIGHTS`")
    if "mmggem" not in config or "model_cfg" not in config:
        raise UserError(f"{config_file} has no 'mmggem' and 'model_cfg' sections: not written by mmggem.save_model")
    section = config["mmggem"]
    model_cfg = section.get("model_cfg", config["model_cfg"])  # older folders kept one model_cfg for both
    text_cfg = model_cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key) == ".":
            text_cfg[key] = str(path)
    return ModelSpec(section["name"], model_cfg, section["pooling"], section.get("pooling_kwargs", {}),
                     config.get("preprocess_cfg", {}), section.get("text_source", ""))


def load(path: str | Path,
         cache_dir: str | Path | None = None) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Tokenizer]:
    """Load a model saved by :func:`save_model`: ``(model, preprocess, tokenizer)``, model in eval mode.

    ``path`` is the folder, or ``hf-hub:org/name`` for one on the Hugging Face Hub, read through
    huggingface_hub's cache (``cache_dir``, or its default; with ``HF_HUB_OFFLINE=1`` only the cache).
    """
    path = download_model_folder(str(path), cache_dir) if is_hub_name(path) else Path(path)
    model = build_model(read_spec(path))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingPathError(f"model weights missing: {weights}")
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as error:
        raise UserError(f"weights {weights} do not match the config in {path / CONFIG_FILE}: {error}") from error
    model.eval()
    return model, image_transform(model, is_train=False), get_tokenizer(model)
