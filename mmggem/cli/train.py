"""`mmggem train CONFIG [key=value ...]`: train, directly or under `accelerate launch`."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config
from ..stopping import EXIT_REQUEUE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a CLIP model from a YAML config",
        description="Train from a YAML run config with dotted overrides, e.g. "
                    "`mmggem train configs/demo.yaml train.steps=200 output_dir=runs/x`. "
                    f"Exits {EXIT_REQUEUE} when stopped by a signal or train.time_limit (resume with "
                    "train.resume=latest).",
    )
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"mmggem train: {error}", file=sys.stderr)
        return 2
    from ..train import TrainingDiverged, train

    try:
        outcome = train(cfg)
    except (TrainingDiverged, ValueError) as error:
        print(f"mmggem train: {error}", file=sys.stderr)
        return 1
    return outcome.exit_code
