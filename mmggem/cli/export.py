"""`mmggem export`: a Hub-ready model folder (weights, config, model card) from a run or any of its checkpoints.

    mmggem export RUN_OR_CHECKPOINT OUT [--results DIR] [--license ID] [--push-to-hub ORG/NAME]
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export", help="a self-contained, Hub-ready model folder from a run, final/ or any checkpoint",
        description="Write the model of a training run (its final/ model, or any checkpoints/step_N, FSDP-sharded "
                    "ones included) or a model folder as a self-contained folder: safetensors weights, config, "
                    "tokenizer files for Hugging Face text towers, and a model card README.md with Hub metadata.",
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run folder (its final model), final/, a run's checkpoints/step_N, or a model folder")
    parser.add_argument("out", metavar="OUT", help="the folder to write (new or empty, unless --overwrite)")
    parser.add_argument("--results", metavar="DIR",
                        help="a folder of `mmggem eval` result JSONs: those of this model go into the card too")
    parser.add_argument("--license", default="other",
                        help="the card's license field, a Hub licence id such as apache-2.0 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is not empty")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME",
                        help="then upload OUT to this Hub model repository (token from HF_TOKEN or `hf auth login`)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export, then push when asked."""
    from ..share.export import export_model, push_to_hub

    out = export_model(args.source, args.out, results_dir=args.results, license=args.license,
                       repo_id=args.push_to_hub, overwrite=args.overwrite)
    print(f"exported {args.source} to {out}")
    if args.push_to_hub:
        print(f"pushed {out} to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub)}")
    return 0
