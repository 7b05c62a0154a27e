"""`mmggem demo [--output-dir DIR]`: build data, train a tiny GGeM CLIP, evaluate, print one table per task."""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train and evaluate a tiny GGeM CLIP on the embedded Fashion-MNIST subset",
        description="Build the demo shards, train the tiny GGeM CLIP of mmggem/recipes/demo.yaml, evaluate "
                    "zero-shot classification and retrieval on the held-out split and print one table per task. "
                    "Without --output-dir the run is made in a temporary folder and removed.",
    )
    parser.add_argument("--output-dir", type=Path, help="keep the run here (data, checkpoints, results.jsonl, "
                                                        "final model, evaluation JSON); a re-run reuses the data")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo in ``--output-dir`` or a temporary folder (removed afterwards, whatever happened)."""
    from ..experiments.demo import run_demo

    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="mmggem-demo-"))
    try:
        outcome = run_demo(output_dir, args.overrides)
    finally:
        if args.output_dir is None:
            shutil.rmtree(output_dir, ignore_errors=True)
            print(f"removed the temporary run {output_dir} (keep it with --output-dir)")
    return outcome.training.exit_code
