"""Where pretrained weights come from, and what travels with them: a path, an open_clip tag, or ``hf-hub:``.

Weights come with more than their tensors, and open_clip's factory
(``open_clip.create_model_and_transforms``) reads all of it; so does :func:`resolve_pretrained`:

- an open_clip pretrained tag brings its preprocessing (``mean``, ``std``, ``interpolation``,
  ``resize_mode``) and the activation it was trained with (``quick_gelu``);
- an ``hf-hub:org/repo`` brings its ``open_clip_config.json``: the model config (which replaces the
  named one's, as open_clip's ``hf-hub:`` names do: its text tower and tokenizer included) and its
  ``preprocess_cfg``;
- a folder written by :func:`mmggem.save_model` (or an mmggem Hub repo) brings its ``preprocess_cfg``
  and the model config it was trained with (its ``mmggem.model_cfg``: ``quick_gelu``,
  ``final_ln_after_pool`` and the like, which change the features but not the weights' shapes); a
  folder in open_clip's ``local-dir`` layout brings its ``model_cfg`` and ``preprocess_cfg``;
- a bare weights file, or a Hub repo of weights alone (no ``open_clip_config.json``), brings nothing,
  and the named model's config and open_clip's default preprocessing hold.

open_clip's own download code fetches tags and plain open_clip Hub repos (so its cache layout and
file choices hold); an mmggem model repo is fetched whole by :mod:`mmggem.model.hub`, since its pooler
and config travel with it. Offline, only the cache is read, and a miss says which file goes where.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
from open_clip.transform import merge_preprocess_dict

from ..errors import MissingPathError, UserError
from .hub import CONFIG_FILE, HF_HUB_PREFIX, cache_folder, download_model_folder, fetch_config, is_hub_name

QUICKGELU_SUFFIX = "-quickgelu"
"""open_clip's name for a config whose activation is QuickGELU (``ViT-B-32-quickgelu``)."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pretrained:
    """Weights and what open_clip's factory takes from their source besides them.

    ``preprocess_cfg`` holds the keys of ``open_clip.transform.PreprocessCfg`` the source sets (none for a
    bare file); ``model_cfg`` is a Hub repo's model config, which replaces the named model's (None
    otherwise), or a saved folder's; ``quick_gelu`` is a tag's activation (open_clip reads a missing key as False; None when
    ``pretrained`` is no tag); ``weights`` is None where they were not fetched.
    """

    weights: Path | None
    preprocess_cfg: dict[str, Any] = field(default_factory=dict)
    model_cfg: dict[str, Any] | None = None
    tag: str = ""
    quick_gelu: bool | None = None


def resolve_pretrained(name: str, pretrained: str | Path, cache_dir: str | Path | None = None,
                       fetch_weights: bool = True) -> Pretrained:
    """The weights ``pretrained`` names for model ``name``, with their preprocessing and config (module docstring).

    An existing path is used as is. An ``hf-hub:org/repo`` name of an mmggem model (its config has
    an ``mmggem`` section) is that repo's snapshot folder in Hugging Face's cache, so the pooler's
    parameters load too. Any other ``hf-hub:`` name or an open_clip pretrained tag
    of ``name`` (``open_clip.list_pretrained_tags_by_model(name)``) is fetched by open_clip's own
    download code into ``cache_dir``, or taken from there when it is cached (with
    ``HF_HUB_OFFLINE=1``, or no network, only the cache is read). Anything else, or weights that
    cannot be fetched, is a :class:`UserError` naming the tag, the cache folder and how to fill it.
    Without ``fetch_weights`` only what travels with the weights is read (``weights`` is None): what a
    checkpoint of a run that started from them is rebuilt with.
    """
    from open_clip.pretrained import get_pretrained_cfg

    text = str(pretrained)
    cache = str(cache_dir) if cache_dir else None
    if Path(text).exists():
        return _local(Path(text))
    if is_hub_name(text):
        source = {"hf_hub": text[len(HF_HUB_PREFIX):].rstrip("/") + "/"}  # open_clip's form: the default file
        try:
            config = fetch_config(text, cache)
        except MissingPathError as no_config:  # a repo of weights alone: they load into ``name``'s config
            if not fetch_weights:
                return Pretrained(None)
            try:
                return Pretrained(_download(text, source, cache))
            except MissingPathError:
                raise no_config from None
        if "mmggem" in config:  # the whole folder, so that the pooler's parameters load too
            return _travelling(download_model_folder(text, cache) if fetch_weights else None, config)
        if not isinstance(config.get("model_cfg"), dict):
            raise UserError(f"{text}: its {CONFIG_FILE} has no 'model_cfg' section, which open_clip's hf-hub: "
                            "loader needs as well")
        return Pretrained(_download(text, source, cache) if fetch_weights else None,
                          _preprocess_keys(config.get("preprocess_cfg")), config["model_cfg"])
    source = get_pretrained_cfg(name, text)
    if not source and not fetch_weights:  # a weights file moved since training: nothing else came with it
        return Pretrained(None)
    if not source:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise MissingPathError(f"pretrained weights not found: {text} is neither a file or folder nor an "
                               f"open_clip tag of {name!r} (its tags: {', '.join(tags) or 'none'})")
    return Pretrained(_download(text, source, cache) if fetch_weights else None, _preprocess_keys(source), tag=text,
                      quick_gelu=bool(source.get("quick_gelu", False)))


def _local(path: Path) -> Pretrained:
    """A weights file (nothing travels with it) or a model folder (its saved config and preprocessing do)."""
    config = path / CONFIG_FILE
    if not (path.is_dir() and config.is_file()):
        return Pretrained(path)
    try:
        saved = json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config}: not valid JSON ({error})") from None
    return _travelling(path, saved)


def _travelling(weights: Path | None, config: dict[str, Any]) -> Pretrained:
    """What a saved model folder's ``open_clip_config.json`` makes travel with its weights.

    An mmggem folder's own ``mmggem.model_cfg`` is the config it was trained with; its top-level
    ``model_cfg`` is only open_clip's view of it (:mod:`mmggem.model.open_clip_view`), so the first
    is taken where both exist. Without either (a hand-made folder), the named model's config holds.
    """
    own = config.get("mmggem", {}).get("model_cfg") if isinstance(config.get("mmggem"), dict) else None
    model_cfg = own if isinstance(own, dict) else config.get("model_cfg")
    return Pretrained(weights, _preprocess_keys(config.get("preprocess_cfg")),
                      model_cfg if isinstance(model_cfg, dict) else None)


def _preprocess_keys(source: dict[str, Any] | None) -> dict[str, Any]:
    """The keys of open_clip's ``PreprocessCfg`` that ``source`` sets, read as open_clip's factory reads them."""
    return merge_preprocess_dict({}, source or {})


def _download(tag: str, source: dict[str, Any], cache: str | None) -> Path:
    """The weights file of ``source`` (an open_clip pretrained config) from the cache, or fetched into it."""
    from open_clip.pretrained import download_pretrained

    try:
        return Path(download_pretrained(source, cache_dir=cache))
    except Exception as error:  # hub, network and file errors alike: all mean "not here and not fetchable"
        raise MissingPathError(_missing_weights_message(tag, source, cache, error)) from error


def tag_quick_gelu(name: str, pretrained: Pretrained, configured: bool, explicit: bool) -> bool:
    """The activation model ``name`` gets with the weights of ``pretrained``: the tag's, whatever the config says.

    open_clip's factory only warns when a tag trained with QuickGELU is loaded into a config without
    it (its ``-quickgelu`` configs exist for that), and the model then computes other features than
    the ones the weights were trained for. Here the tag's activation applies; a config that sets
    ``quick_gelu`` explicitly (``explicit``) against the tag is refused, naming the config to use.
    """
    if pretrained.quick_gelu is None or pretrained.quick_gelu == configured:
        return configured
    wanted = name if name.endswith(QUICKGELU_SUFFIX) else name + QUICKGELU_SUFFIX
    if not pretrained.quick_gelu:
        wanted = name.removesuffix(QUICKGELU_SUFFIX)
    if explicit:
        raise UserError(f"pretrained tag {pretrained.tag!r} of {name!r} was trained with quick_gelu="
                        f"{pretrained.quick_gelu}, but the model config sets quick_gelu={configured}: drop that "
                        f"setting (the tag's applies), or use open_clip's config {wanted!r}")
    log.info("pretrained tag %r was trained with quick_gelu=%s: the model uses it, as open_clip's config %r does",
             pretrained.tag, pretrained.quick_gelu, wanted)
    return pretrained.quick_gelu


def _missing_weights_message(tag: str, source: dict[str, Any], cache: str | None, error: Exception) -> str:
    """How to make the weights of ``tag`` available offline: which file goes where in the cache."""
    if source.get("hf_hub"):
        repo, filename = source["hf_hub"].rstrip("/"), "open_clip_model.safetensors"
        if not source["hf_hub"].endswith("/"):  # open_clip's convention: 'org/repo/' or 'org/repo/file'
            repo, _, filename = repo.rpartition("/")
        folder = cache_folder(cache)
        how = (f"fill it on a machine with network with `hf download {repo} {filename} --cache-dir "
               f"{folder}` and copy {folder}/models--{repo.replace('/', '--')} here, or download the file and "
               f"give its path instead (model.pretrained, or --pretrained of mmggem eval)")
    else:
        folder = cache or str(Path("~/.cache/clip").expanduser())
        how = (f"download {source['url']} into {folder}, or give the downloaded file instead "
               "(model.pretrained, or --pretrained of mmggem eval)")
    return (f"pretrained weights {tag!r} are not in the cache folder {folder} and could not be fetched "
            f"({type(error).__name__}); {how}")
