"""The `mmggem` command line: one module per subcommand, each thin.

Every subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` to a callable taking the parsed namespace and returning an
exit code. The work itself lives in the library modules.

Errors: a :class:`mmggem.errors.UserError` (a config key, a missing file, data
that cannot be used) is printed as one line, ``mmggem COMMAND: error: ...``, and
the command exits with the error's ``exit_code`` (2 for options and config, 1
for the rest). Any other exception propagates with its traceback: it is a bug or
a failure of the environment, and where it came from is what one needs to know.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .. import __version__
from ..errors import UserError

SUBCOMMANDS = ("data", "train", "eval", "export", "demo", "ablate")
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
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"mmggem {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
