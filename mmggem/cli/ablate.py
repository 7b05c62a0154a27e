"""`mmggem ablate CONFIG --poolings cls,avg,max,gem,ggem --seeds 3`: the pooling ablation."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ..pooling import POOLER_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="train and evaluate every pooling x seed on one config, and tabulate",
        description="Train CONFIG once per pooling and seed with the same budget, evaluate each on the "
                    "config's eval.datasets, and write OUT/ablation.md, .csv and .png. Finished runs are "
                    "reused. Under `accelerate launch` each process takes its share of the runs.",
    )
    parser.add_argument("config", type=Path, help="YAML run config with eval.datasets set")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    parser.add_argument("--poolings", default=",".join(p for p in POOLER_NAMES if p != "attn"),
                        help="comma-separated poolings (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per pooling (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/ablation"), help="default: %(default)s")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time in this process (default: 1)")
    parser.add_argument("--baseline", metavar="POOLING",
                        help="one of --poolings: also report every pooling's difference to it, paired by seed, "
                             "with a 95%% t interval over the seeds")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..ablation import plan_runs, run_all, write_summary
    from ..config import load_config

    poolings = [p.strip() for p in args.poolings.split(",") if p.strip()]
    unknown = [p for p in poolings if p not in POOLER_NAMES]
    if unknown or args.seeds < 1 or args.parallel < 1:
        raise UsageError(f"poolings must be among {', '.join(POOLER_NAMES)} (got {unknown}), "
                         "--seeds and --parallel >= 1")
    if args.baseline is not None and args.baseline not in poolings:
        raise UsageError(f"--baseline {args.baseline} is not among --poolings {','.join(poolings)}")
    cfg = load_config(args.config, args.overrides)
    state = PartialState()
    runs = plan_runs(args.output_dir, poolings, args.seeds)
    device = state.local_process_index if state.device.type == "cuda" else None
    failed = run_all(args.config, runs, args.overrides, args.parallel, state.process_index, state.num_processes,
                     device, tags=cfg.log.tags)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 1 if failed else 0
    missing = [run for run in runs if not run.finished]
    if missing:
        print("mmggem ablate: unfinished runs (see their train.log): "
              + ", ".join(str(run.output_dir) for run in missing), file=sys.stderr)
        return 1
    write_summary(runs, args.output_dir, args.baseline)
    print((args.output_dir / "ablation.md").read_text())
    print(f"wrote {args.output_dir / 'ablation.md'}, {args.output_dir / 'ablation.csv'}, "
          f"{args.output_dir / 'ablation.png'}")
    return 0
