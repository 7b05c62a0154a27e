"""``hf-hub:org/name`` models through huggingface_hub's own cache.

huggingface_hub decides where files live (``HF_HUB_CACHE``, or ``cache_dir``), when the network is
asked (never with ``HF_HUB_OFFLINE=1``) and what a cached snapshot is; mmggem only turns its
failures into one line naming the repo and the cache folder. A repo is an mmggem model when its
``open_clip_config.json`` has an ``mmggem`` section (what :func:`mmggem.save_model` writes); any
other repo is a plain open_clip model, which open_clip's own ``hf-hub:`` loader reads.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MissingPathError, UserError

HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"  # open_clip's name, in local-dir folders and Hub repos alike


def is_hub_name(name: str | Path) -> bool:
    """Whether ``name`` is an ``hf-hub:org/name`` model name rather than a path."""
    return str(name).startswith(HF_HUB_PREFIX)


def repo_id(name: str) -> str:
    """``org/name`` of ``hf-hub:org/name`` (a trailing ``/``, open_clip's form for the default file, is dropped)."""
    repo = name[len(HF_HUB_PREFIX):].strip("/") if is_hub_name(name) else name
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"{name!r} is not a Hub model name: write hf-hub:ORG/NAME")
    return repo


def cache_folder(cache_dir: str | Path | None) -> str:
    """The cache huggingface_hub reads: ``cache_dir``, or its default (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir else constants.HF_HUB_CACHE


def _missing(name: str, cache_dir: str | Path | None, error: Exception) -> MissingPathError:
    repo, folder = repo_id(name), cache_folder(cache_dir)
    return MissingPathError(
        f"{name} is not in the Hugging Face cache {folder} and could not be fetched ({type(error).__name__}); "
        f"fill it on a machine with network with `hf download {repo} --cache-dir {folder}` and copy "
        f"{folder}/models--{repo.replace('/', '--')} here")


def download_model_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of the repo ``name`` (fetched into the cache when it is not there)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id(name), cache_dir=str(cache_dir) if cache_dir else None))
    except UserError:
        raise
    except Exception as error:  # offline, network, unknown or gated repo: all mean "not here and not fetchable"
        raise _missing(name, cache_dir, error) from error


def fetch_config(name: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The repo's ``open_clip_config.json`` (from the cache, or fetched into it)."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id(name), CONFIG_FILE, cache_dir=str(cache_dir) if cache_dir else None)
    except UserError:
        raise
    except Exception as error:  # no such file, repo or network
        raise _missing(name, cache_dir, error) from error
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{name}: {CONFIG_FILE} ({path}) is not JSON: {error}") from error
