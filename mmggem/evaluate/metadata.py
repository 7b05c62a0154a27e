"""Class names and prompt templates for zero-shot classification.

A set's own ``classnames.txt`` and ``zeroshot_classification_templates.txt`` win;
when one is absent, the built-in metadata of the set's name is used:

- ImageNet-1k: open_clip's class names and OpenAI's 80 templates (``open_clip.zero_shot_metadata``).
- CIFAR-10 and CIFAR-100: torchvision's class names (those CLIP_benchmark uses for its
  ``cifar10`` / ``cifar100``) and CLIP's 18 CIFAR templates (CLIP_benchmark's as well).
- Fashion-MNIST: readable forms of torchvision's class names and a few photo templates.

Names are matched loosely: case, punctuation and a ``wds`` prefix are ignored, so
``wds_cifar10``, ``CIFAR-10`` and ``cifar10`` all find CIFAR-10.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from ..data import formats
from ..data.classnames import openai_imagenet_templates
from ..errors import UserError


@dataclass(frozen=True)
class ClassMetadata:
    """Class names (index i is label i), templates with a ``{c}`` placeholder, and where the names come from."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    classnames_source: str = "built-in"


CIFAR10_CLASSNAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR100_CLASSNAMES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
    tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)

CIFAR_TEMPLATES = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
)

FASHION_MNIST_CLASSNAMES = (
    "t-shirt or top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

FASHION_MNIST_TEMPLATES = (
    "a photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a photo of the {c}.",
    "a photo of a {c}, a type of clothing.",
    "a product photo of a {c}.",
)


@cache
def _builtin() -> dict[str, ClassMetadata]:
    from open_clip import IMAGENET_CLASSNAMES

    imagenet = ClassMetadata(tuple(IMAGENET_CLASSNAMES), openai_imagenet_templates())
    return {
        "imagenet1k": imagenet,
        "imagenet": imagenet,
        "cifar10": ClassMetadata(CIFAR10_CLASSNAMES, CIFAR_TEMPLATES),
        "cifar100": ClassMetadata(CIFAR100_CLASSNAMES, CIFAR_TEMPLATES),
        "fashionmnist": ClassMetadata(FASHION_MNIST_CLASSNAMES, FASHION_MNIST_TEMPLATES),
    }


def _lookup_key(name: str) -> str:
    return re.sub(r"^wds", "", re.sub(r"[^a-z0-9]", "", name.lower()))


def builtin_metadata(name: str) -> ClassMetadata | None:
    """Built-in metadata for a dataset name (``imagenet1k``, ``cifar10``, ``cifar100``, ``fashion_mnist``), or None."""
    return _builtin().get(_lookup_key(name))


def template_sets() -> dict[str, tuple[str, ...]]:
    """Named template sets: open_clip's (``openai_imagenet``, 80; ``simple_imagenet``, 7) and each
    built-in dataset's (``imagenet1k``, ``cifar10``, ``cifar100``, ``fashion_mnist``)."""
    from open_clip import SIMPLE_IMAGENET_TEMPLATES

    sets = {name: metadata.templates for name, metadata in _builtin().items()}
    sets["openai_imagenet"] = openai_imagenet_templates()
    sets["simple_imagenet"] = tuple(template(formats.CLASS_PLACEHOLDER) for template in SIMPLE_IMAGENET_TEMPLATES)
    return sets


def template_set(name: str) -> tuple[str, ...] | None:
    """The templates a set name stands for (matched as dataset names are), or None."""
    return {_lookup_key(key): templates for key, templates in template_sets().items()}.get(_lookup_key(name))


def builtin_names() -> list[str]:
    """The dataset names with built-in metadata, as matched by :func:`builtin_metadata`."""
    return sorted(_builtin())


def resolve_metadata(
    name: str,
    classnames: list[str] | None,
    templates: list[str] | None,
    *,
    source: str,
) -> ClassMetadata:
    """The class names and templates to use: the set's own where given, else the built-in ones of ``name``.

    ``source`` names where the set's own lists come from (its folder), for error messages.
    Raises UserError when a list is missing with no built-in fallback, or is malformed.
    """
    fallback = builtin_metadata(name)
    if (classnames is None or templates is None) and fallback is None:
        missing = formats.CLASSNAMES_FILE if classnames is None else formats.TEMPLATES_FILE
        raise UserError(
            f"{source}: {missing} is missing and {name!r} has no built-in class names and templates "
            f"(built-in: {', '.join(builtin_names())}); add the file to the set"
        )
    classnames_source = f"{source}/{formats.CLASSNAMES_FILE}" if classnames is not None else f"built-in {name}"
    templates_source = f"{source}/{formats.TEMPLATES_FILE}" if templates is not None else f"built-in {name}"
    metadata = ClassMetadata(
        tuple(classnames) if classnames is not None else fallback.classnames,
        tuple(templates) if templates is not None else fallback.templates,
        classnames_source,
    )
    _check_classnames(metadata.classnames, classnames_source)
    formats.check_templates(metadata.templates, templates_source)
    return metadata


def _check_classnames(classnames: tuple[str, ...], source: str) -> None:
    if not classnames:
        raise UserError(f"{source}: no class names")
    for line, classname in enumerate(classnames, start=1):
        if not classname:
            raise UserError(f"{source}: line {line} is an empty class name")
