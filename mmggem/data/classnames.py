"""Class names and templates of a folder-per-class image set, as CLIP_benchmark would use them.

A folder's name is its class name (``golden_retriever`` -> ``golden retriever``), unless the
folders are ImageNet-1k WordNet ids (``n01440764``...), as in ImageNet's own train and validation
folders: then each takes open_clip's ImageNet class name of its synset (``IMAGENET_CLASSNAMES``,
indexed as timm's ImageNet-1k synset list, which open_clip installs) and the set gets OpenAI's 80
ImageNet templates, as CLIP_benchmark evaluates ImageNet. A subset of the 1000 folders keeps the
names of its synsets; labels still follow the sorted folder names, which for all 1000 are
ImageNet's own indices.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from . import formats

WNID = re.compile(r"n\d{8}")


def class_folders(images: Path) -> list[tuple[str, Path]]:
    """(class name, folder) per non-hidden sub-folder, sorted by folder name; '_' in a name becomes a space."""
    folders = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{images} has no sub-folders; expected one sub-folder of images per class")
    named = [(p.name.replace("_", " ").strip(), p) for p in folders]
    duplicates = [name for name, count in Counter(name for name, _ in named).items() if count > 1]
    if duplicates:
        raise UserError(f"{images}: several folders give the class name(s) {duplicates}")
    return named


@cache
def imagenet_synsets() -> dict[str, int]:
    """ImageNet-1k WordNet id -> class index (timm's list: the sorted synsets, ImageNet's label order)."""
    from timm.data import ImageNetInfo

    return {wnid: index for index, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def openai_imagenet_templates() -> tuple[str, ...]:
    """OpenAI's 80 ImageNet templates (open_clip's ``OPENAI_IMAGENET_TEMPLATES``) with a ``{c}`` placeholder."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return tuple(template(formats.CLASS_PLACEHOLDER) for template in OPENAI_IMAGENET_TEMPLATES)


def imagenet_classnames(folder_names: Sequence[str]) -> list[str] | None:
    """open_clip's ImageNet class names of ``folder_names`` when every one is an ImageNet-1k WordNet id, else None."""
    from open_clip import IMAGENET_CLASSNAMES

    if not folder_names or not all(WNID.fullmatch(name) for name in folder_names):
        return None
    synsets = imagenet_synsets()
    if not all(name in synsets for name in folder_names):  # e.g. ImageNet-21k ids: plain folder names
        return None
    return [IMAGENET_CLASSNAMES[synsets[name]] for name in folder_names]


def read_classnames(path: str | Path, expected: int) -> list[str]:
    """Class names from a file, one per line in sorted-folder order; its count must be the folders' count."""
    names = [line.strip() for line in formats.read_lines(path) if line.strip()]
    if len(names) != expected:
        raise UserError(f"{path}: {len(names)} class names for {expected} class folders; write one name per "
                        "folder, in the sorted order of the folder names")
    return names
