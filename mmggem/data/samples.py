"""One training sample: raw members read from a shard, then its (image, caption) pair.

Tar members group into samples by webdataset's own rules (:mod:`mmggem.data.tars`). A sample that
cannot be used raises :class:`~mmggem.data.images.Skip` with its reason (:mod:`mmggem.data.skips`);
the reader counts it and goes on. Captions are stripped and cut to MAX_CAPTION_CHARS characters
before tokenisation (more than any tokenizer context holds).
"""
from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from typing import Any, Iterator

import webdataset as wds
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from . import formats
from .images import Skip, decode_image
from .tars import DUPLICATE_MEMBER, group_samples

MAX_CAPTION_CHARS = 8192


def tar_samples(url: str, skips: Counter) -> Iterator[dict[str, Any]]:
    """Samples (dicts of raw bytes by extension) of one shard, as webdataset reads them (:mod:`.tars`).

    A read error ends the shard and is counted (``truncated_tar``; the sample being read is
    dropped), as is a shard that cannot be opened (``unreadable_shard``) and a sample with two
    members of one extension (``duplicate_member``).
    """
    try:
        stream = wds.gopen(url)
    except Exception:
        skips["unreadable_shard"] += 1
        return
    status = None  # stays None only while the consumer closes this generator early
    try:
        members = ((member["fname"], member["data"]) for member in tar_file_iterator(stream))
        yield from group_samples(members, url, on_duplicate=lambda key, name: skips.update([DUPLICATE_MEMBER]))
        status = "ok"
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        status = "truncated_tar"
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: command that failed (not counted when closed early on purpose)
            if status is not None:
                status = "unreadable_shard"
    if status != "ok":
        skips[status] += 1


def decode_caption(sample: dict[str, Any]) -> str:
    """The sample's caption, stripped and bounded; raises Skip for a missing, empty or non-UTF-8 one."""
    if formats.CAPTION_KEY not in sample:
        raise Skip("no_caption")
    try:
        caption = sample[formats.CAPTION_KEY].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Skip("caption_not_utf8") from None
    if not caption:
        raise Skip("empty_caption")
    return caption[:MAX_CAPTION_CHARS]


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, str]:
    """(RGB image, caption) of a raw sample; raises Skip."""
    ext = formats.image_key(sample)
    if ext is None:
        raise Skip("no_image")
    caption = decode_caption(sample)
    return decode_image(sample[ext]), caption
