"""`mmggem data`: write the demo dataset, training shards and CLIP_benchmark evaluation sets.

Thin: parses arguments, calls mmggem.data.captions / .write / .demo, prints the reports.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..data import formats
from ..errors import UsageError

if TYPE_CHECKING:
    from ..data.write import WriteReport


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser("data", help="write training shards and CLIP_benchmark evaluation sets",
                                   description="Write webdataset training shards and CLIP_benchmark evaluation sets.")
    commands = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    demo = commands.add_parser("demo", help="the embedded Fashion-MNIST subset: OUT/train, OUT/zeroshot, OUT/retrieval")
    demo.add_argument("out", type=Path, metavar="OUT")
    _common(demo, default_per_shard="1000 for the demo")
    demo.set_defaults(func=_demo)

    captions = commands.add_parser("captions", help="training shards from a folder of images and a caption file")
    _images(captions)
    _captions(captions)
    _out(captions, "output directory for the shards and sizes.json")
    _common(captions)
    captions.set_defaults(func=_from_captions, layout="training")

    classes = commands.add_parser("classes", help="a classification set from one sub-folder of images per class")
    _images(classes)
    _out(classes, "output directory (CLIP_benchmark layout)")
    classes.add_argument("--classnames", type=Path, metavar="FILE",
                         help="class names, one per line in the sorted order of the class folders (default: "
                              "ImageNet's names for WordNet-id folders such as n01440764, else the folder names)")
    classes.add_argument("--templates", metavar="NAME_OR_FILE",
                         help=f"zero-shot templates: a file, one per line with {formats.CLASS_PLACEHOLDER} for the "
                              "class name, or a named set: openai_imagenet (80), simple_imagenet, imagenet1k, "
                              "cifar10, cifar100, fashion_mnist (default: openai_imagenet for WordNet-id folders, "
                              f"else {len(formats.DEFAULT_TEMPLATES)} 'a photo of a {{c}}.'-style ones)")
    _common(classes)
    classes.set_defaults(func=_classes)

    retrieval = commands.add_parser("retrieval", help="a retrieval set from images and a caption file "
                                                      "(several rows per image allowed)")
    _images(retrieval)
    _captions(retrieval)
    _out(retrieval, "output directory (CLIP_benchmark layout)")
    _common(retrieval)
    retrieval.set_defaults(func=_from_captions, layout="retrieval")


def _images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of images")


def _out(parser: argparse.ArgumentParser, description: str) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help=description)


def _captions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captions", type=Path, required=True, metavar="FILE",
                        help="CSV or TSV with a header row, or JSONL, of (file name, caption) rows")
    parser.add_argument("--file-column", default="file", metavar="NAME",
                        help="column holding the image file name (default: file)")
    parser.add_argument("--caption-column", default="caption", metavar="NAME",
                        help="column holding the caption (default: caption)")
    parser.add_argument("--split-column", metavar="NAME",
                        help="column naming each row's split (e.g. split); use with --split")
    parser.add_argument("--split", metavar="VALUE", help="use only the rows whose --split-column is VALUE "
                                                         "(e.g. train); images of other splits are skipped")


def _common(parser: argparse.ArgumentParser, default_per_shard: str = str(formats.DEFAULT_SAMPLES_PER_SHARD)) -> None:
    parser.add_argument("--samples-per-shard", type=int, metavar="N",
                        help=f"samples per tar shard (default: {default_per_shard})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _per_shard(args: argparse.Namespace) -> dict[str, int]:
    """The builder keyword for --samples-per-shard when given (the builders hold the defaults)."""
    return {} if args.samples_per_shard is None else {"samples_per_shard": args.samples_per_shard}


def _run(build: Callable[[], WriteReport | list[WriteReport]]) -> int:
    """Call a builder and print its report(s); what stops it propagates to the CLI's error handling."""
    reports = build()
    for report in reports if isinstance(reports, list) else [reports]:
        print(report.summary())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..data.fashion_mnist import write_demo

    return _run(lambda: write_demo(args.out, overwrite=args.overwrite, **_per_shard(args)))


def _from_captions(args: argparse.Namespace) -> int:
    """`data captions` (training shards) and `data retrieval` (a retrieval set): one builder, two layouts."""
    from ..data.captions import build_from_captions

    return _run(lambda: build_from_captions(
        args.images, args.captions, args.out, layout=args.layout, overwrite=args.overwrite, **_per_shard(args),
        file_column=args.file_column, caption_column=args.caption_column, split_column=args.split_column,
        split=args.split))


def _classes(args: argparse.Namespace) -> int:
    from ..data.write import build_classification_set

    def build() -> WriteReport:
        templates = None if args.templates is None else _templates(args.templates)
        return build_classification_set(args.images, args.out, classnames=args.classnames, templates=templates,
                                        overwrite=args.overwrite, **_per_shard(args))

    return _run(build)


def _templates(name_or_file: str) -> list[str]:
    """``--templates``: an existing file's non-empty lines, else a named set (mmggem.evaluate.metadata)."""
    from ..evaluate.metadata import template_set, template_sets

    if Path(name_or_file).is_file():
        return [line for line in formats.read_lines(name_or_file) if line]
    templates = template_set(name_or_file)
    if templates is None:
        raise UsageError(f"--templates {name_or_file!r} is neither a file nor a template set "
                         f"({', '.join(sorted(template_sets()))})")
    return list(templates)
