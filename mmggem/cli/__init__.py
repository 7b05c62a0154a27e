"""The `mmggem` command line: one module per subcommand, each thin.

Every subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed namespace and returning an
exit code. The work itself lives in the library modules.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

from .. import __version__

SUBCOMMANDS = ("data", "train", "eval", "demo", "ablate")
"""The commands, in help order; command NAME is registered by the module ``mmggem.cli.NAME``."""


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mmggem",
        description="CLIP training and evaluation with Group Generalized Mean (GGeM) pooling.",
    )
    parser.add_argument("--version", action="version", version=f"mmggem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mmggem` console script."""
    parser = build_parser()
    # key=value overrides may follow options (`ablate CONFIG --seeds 3 train.lr=1e-3`), which
    # argparse cannot intermix with a nargs="*" positional; they are collected here instead.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
