"""`mmggem train CONFIG [key=value ...] [--dry-run]`: train, directly or under `accelerate launch`."""
from __future__ import annotations

import argparse
import functools
import sys

from ..config.run import load_config
from ..train.stopping import EXIT_DISK_FULL, EXIT_REQUEUE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a CLIP model from a YAML config",
        description="Train from a YAML run config with dotted overrides, e.g. "
                    "`mmggem train configs/demo.yaml train.steps=200 output_dir=runs/x`. "
                    f"Exits {EXIT_REQUEUE} when stopped by a signal or train.time_limit, {EXIT_DISK_FULL} when the "
                    "disk filled while a checkpoint was written (free space first); either way resume with "
                    "train.resume=latest. Exit codes: docs/distributed.md.",
    )
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and overrides, print the resolved config and what would run "
                             "(processes, precision, steps, batch, model and pretrained weights, shards, "
                             "evaluation sets, resume) without building a model, fetching or writing anything; "
                             "exits 2 when it lists a problem a real run would stop on, 0 when none")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config (a ConfigError stops before any work), then describe the run (``--dry-run``)
    or train it and return the run's exit code.

    A diverged run is an outcome, not a bug: its message (the step and the last good checkpoint) is printed
    as one line and the command exits 1.
    """
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from ..train.dry_run import describe_run, report

        return report(functools.partial(describe_run, cfg))
    from ..train.loop import TrainingDiverged, train

    try:
        outcome = train(cfg)
    except TrainingDiverged as error:
        print(f"mmggem train: error: {error}", file=sys.stderr)
        return 1
    return outcome.exit_code
