"""Shard specs: which tar files a training run reads, with what weight, and how many samples they hold.

A spec is one or more sources joined with ``::``; each source is a brace pattern (or glob) of local
paths, or a webdataset URL (``pipe:aws s3 cp s3://bucket/{000..099}.tar -``, ``https://...``), with an
optional sampling weight as a ``@WEIGHT`` suffix::

    /data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar@2

A weight is an upsampling factor, as open_clip's ``--train-data-upsampling-factors``: each shard of
that source is drawn WEIGHT times as often as a shard of weight 1 (weights need resampled mode). A
local pattern that matches no file is a UserError. The sample count of local shards comes from the
``sizes.json`` beside them (as ``mmggem data`` and open_clip's tools write it), else from the
``NNNNN_stats.json`` that img2dataset writes beside each shard (:func:`count_samples`).
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from ..errors import UserError
from . import formats

_WEIGHT = re.compile(r"^(?P<pattern>.+)@(?P<weight>\d+(?:\.\d*)?|\.\d+)$")
_GLOB = re.compile(r"[*?[]")
_NUM_SAMPLES_HINT = ("set the number of samples an epoch holds with the config key data.num_samples "
                     "(on the command line: mmggem train CONFIG data.num_samples=N)")


@dataclass(frozen=True)
class Source:
    """One ``::``-separated part of a spec: its expanded shard URLs and sampling weight."""

    urls: tuple[str, ...]
    weight: float = 1.0


def is_remote(url: str) -> bool:
    """True for URLs webdataset opens through a scheme (pipe:, http://, s3://, ...), not the local file system."""
    return url.startswith("pipe:") or "://" in url


def parse_spec(spec: str) -> list[Source]:
    """Split a shard spec into sources and expand each; a local pattern matching no file is a UserError."""
    sources = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            raise UserError(f"shard spec {spec!r} has an empty source between '::'")
        match = _WEIGHT.match(part)
        pattern, weight = (match["pattern"], float(match["weight"])) if match else (part, 1.0)
        if weight <= 0:
            raise UserError(f"source {part!r}: the weight after '@' must be positive")
        sources.append(Source(tuple(_expand(pattern)), weight))
    return sources


def _expand(pattern: str) -> list[str]:
    urls = list(braceexpand.braceexpand(pattern))
    if is_remote(pattern):
        return urls
    found: list[str] = []
    missing = []
    for url in urls:
        matches = sorted(glob.glob(url)) if _GLOB.search(url) else ([url] if Path(url).is_file() else [])
        found.extend(matches)
        if not matches:
            missing.append(url)
    if not found:
        raise UserError(f"shard pattern {pattern!r} matches no file")
    if missing:
        raise UserError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} shards do not exist, "
                        f"e.g. {missing[0]}")
    return found


def count_samples(urls: list[str]) -> int:
    """Total sample count of local shards: from the ``sizes.json`` beside them, else from img2dataset's
    per-shard ``<shard>_stats.json`` (its ``successes``: the samples it wrote); UserError when unknown."""
    total = 0
    sizes_by_dir: dict[Path, dict[str, int] | None] = {}
    for url in urls:
        if is_remote(url):
            raise UserError(f"cannot count the samples of remote shard {url}; {_NUM_SAMPLES_HINT}")
        shard = Path(url)
        if shard.parent not in sizes_by_dir:
            sizes_by_dir[shard.parent] = formats.read_sizes(shard.parent)
        sizes = sizes_by_dir[shard.parent]
        if sizes is None:
            total += _img2dataset_count(shard)
        elif shard.name in sizes:
            total += sizes[shard.name]
        else:
            raise UserError(f"{shard.parent / formats.SIZES_FILE} has no entry for {shard.name}; {_NUM_SAMPLES_HINT}")
    return total


def _img2dataset_count(shard: Path) -> int:
    """The ``successes`` of the ``<shard>_stats.json`` img2dataset wrote beside ``shard``."""
    stats = shard.with_name(f"{shard.name.removesuffix('.tar')}_stats.json")
    if not stats.is_file():
        raise UserError(f"no {formats.SIZES_FILE} in {shard.parent} and no img2dataset {stats.name} beside "
                        f"{shard.name}; {_NUM_SAMPLES_HINT}")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{stats}: expected img2dataset's JSON with an integer 'successes' ({error!r}); "
                        f"{_NUM_SAMPLES_HINT}") from error
