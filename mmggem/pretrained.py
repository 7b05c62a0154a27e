"""Where pretrained weights come from: a path, an open_clip tag, or an ``hf-hub:`` name in a cache.

open_clip's own download code fetches tags and plain open_clip Hub repos (so its cache layout and
file choices hold); an mmggem model repo is fetched whole by :mod:`mmggem.hub`, since its pooler
and config travel with it. Offline, only the cache is read, and a miss says which file goes where.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip

from .errors import MissingPathError
from .hub import HF_HUB_PREFIX, cache_folder, download_model_folder, is_hub_name, is_mmggem_repo


def resolve_pretrained(name: str, pretrained: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local weights file or folder that ``pretrained`` names for model ``name``.

    An existing path is returned as is. An ``hf-hub:org/repo`` name of an mmggem model (its config has
    an ``mmggem`` section) is that repo's snapshot folder in Hugging Face's cache, so the pooler's
    parameters load too. Any other ``hf-hub:`` name or an open_clip pretrained tag
    of ``name`` (``open_clip.list_pretrained_tags_by_model(name)``) is fetched by open_clip's own
    download code into ``cache_dir``, or taken from there when it is cached (with
    ``HF_HUB_OFFLINE=1``, or no network, only the cache is read). Anything else, or weights that
    cannot be fetched, is a :class:`UserError` naming the tag, the cache folder and how to fill it.
    """
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    text = str(pretrained)
    if Path(text).exists():
        return Path(text)
    cache = str(cache_dir) if cache_dir else None
    if is_hub_name(text) and is_mmggem_repo(text, cache):
        return download_model_folder(text, cache)
    if is_hub_name(text):  # open_clip's form for a repo's default weights file: 'org/repo/'
        source = {"hf_hub": text[len(HF_HUB_PREFIX):].rstrip("/") + "/"}
    else:
        source = get_pretrained_cfg(name, text)
        if not source:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise MissingPathError(f"pretrained weights not found: {text} is neither a file or folder nor an "
                                   f"open_clip tag of {name!r} (its tags: {', '.join(tags) or 'none'})")
    try:
        return Path(download_pretrained(source, cache_dir=cache))
    except Exception as error:  # hub, network and file errors alike: all mean "not here and not fetchable"
        raise MissingPathError(_missing_weights_message(text, source, cache, error)) from error


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
