"""`mmggem ablate CONFIG --poolings cls,avg,max,gem,ggem --seeds 3 [--dry-run]`: the pooling ablation."""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError, UserError
from ..experiments.summary import SUMMARY_METRICS
from ..model.pooling import POOLER_NAMES

if TYPE_CHECKING:
    from ..experiments.ablation import AblationRun


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="train and evaluate every pooling (or variant) x seed on one config, and tabulate",
        description="Train CONFIG once per arm (a pooling, or a named variant of one) and seed with the same "
                    "budget, evaluate each on the config's eval.datasets, and write OUT/ablation.md, .csv and "
                    ".png. Finished runs are reused, cut-short ones resumed, if their config.yaml trained what "
                    "CONFIG would (else it stops, naming them). Under `accelerate launch` each process takes its "
                    "share of the runs.",
    )
    parser.add_argument("config", type=Path, help="YAML run config with eval.datasets set")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    parser.add_argument("--poolings", default=",".join(p for p in POOLER_NAMES if p != "attn"),
                        help="comma-separated poolings (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per pooling (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/ablation"), help="default: %(default)s")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time in this process (default: 1)")
    parser.add_argument("--variant", action="append", default=[], metavar='"NAME=POOLING KEY=VALUE ..."',
                        help="also train a named variant of a pooling with its own overrides, e.g. "
                             "\"ggem-signed=ggem model.pooling_kwargs.negatives=signed\" (repeatable)")
    parser.add_argument("--baseline", metavar="ARM[,ARM]",
                        help="poolings or variants to compare every other arm with, paired by seed, with a 95%% t "
                             "interval over the seeds (one table per baseline)")
    parser.add_argument("--metrics", default=",".join(SUMMARY_METRICS),
                        help="metric names to tabulate, for every evaluation set that reports them; "
                             "head_dependence adds the head-wise dependence of each run's pooled features on "
                             "every evaluation set (default: %(default)s)")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--dry-run", action="store_true",
                       help="check the config and every arm's overrides, print the planned runs (arm, seed, "
                            "folder, finished, resumable or new) and exit without training: 2 when it lists a "
                            "problem a run would stop on, 0 when none")
    stage.add_argument("--report", action="store_true",
                       help="train nothing: write the tables from the runs finished so far, an interim look at a "
                            "long ablation (the tables then say how many runs they cover and name the others)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan the runs, refuse runs already there with another config, then tabulate, dry-run or train."""
    from ..config.run import load_config
    from ..experiments.ablation import conflicts_message, find_conflicts, parse_arms, plan_runs

    if args.seeds < 1 or args.parallel < 1:
        raise UsageError(f"--seeds and --parallel must be >= 1, got {args.seeds} and {args.parallel}")
    arms = parse_arms(args.poolings, args.variant)
    names = [arm.name for arm in arms]
    baselines = [b.strip() for b in (args.baseline or "").split(",") if b.strip()]
    strangers = [b for b in baselines if b not in names]
    if strangers:
        raise UsageError(f"--baseline {','.join(strangers)} is not among the arms {','.join(names)}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    cfg = load_config(args.config, args.overrides)
    for arm in arms:  # a typo in a variant's overrides fails now, not after hours of the other arms
        load_config(args.config, [*args.overrides, *arm.run_overrides])
    runs = plan_runs(args.output_dir, arms, args.seeds)
    if args.report:
        return _write_tables(runs, args.output_dir, baselines, metrics)
    conflicts = find_conflicts(args.config, runs, args.overrides, cfg.log.tags)
    if args.dry_run:
        from ..experiments.ablation import describe_ablation
        from ..train.dry_run import report

        return report(functools.partial(describe_ablation, cfg, runs, conflicts))
    if conflicts:
        raise UserError(conflicts_message(conflicts))
    if not _train_share(args, runs, cfg.log.tags):
        return 0
    missing = [run for run in runs if not run.finished]
    if missing:
        print("mmggem ablate: unfinished runs (see their train.log): "
              + ", ".join(str(run.output_dir) for run in missing), file=sys.stderr)
        return 1
    return _write_tables(runs, args.output_dir, baselines, metrics)


def _train_share(args: argparse.Namespace, runs: list["AblationRun"], tags: list[str]) -> bool:
    """Train this process's share of ``runs``; return whether this is the main process, which writes the
    tables, once every process has trained its share.

    No collective is held across the training: processes finish hours apart (one has fewer runs, or
    reuses them), longer than torch's process-group timeout (10 minutes under NCCL), at which a barrier
    would fail and the tables would never be written. So the group is used once, while every process
    has just started (the main process clears the last launch's marks first), and given up; then each
    process marks its share done with a file (:func:`~mmggem.experiments.ablation.mark_done`) and the
    main process polls for them. Every process other than the main one exits 0, as a launcher stops
    the rest of the launch when one fails: the main process names the runs that failed and exits 1.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..experiments.ablation import clear_marks, mark_done, run_all, wait_for_ranks

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as accelerate's AcceleratorState reads it
    marks = args.output_dir / ".ranks"
    if state.is_main_process:
        clear_marks(marks)
    state.wait_for_everyone()
    state.destroy_process_group()
    device = state.local_process_index if state.device.type == "cuda" else None
    run_all(args.config, runs, args.overrides, args.parallel, state.process_index, state.num_processes, device,
            tags=tags)
    mark_done(marks, state.process_index)
    if state.is_main_process:
        wait_for_ranks(marks, state.num_processes)
        clear_marks(marks)
    return state.is_main_process


def _write_tables(runs: list["AblationRun"], out: Path, baselines: list[str], metrics: list[str]) -> int:
    """Tabulate the finished ones of ``runs`` into OUT/ablation.{md,csv,png} (and ablation_p.png), and print."""
    from ..experiments.summary import write_summary

    finished = [run for run in runs if run.finished]
    if not finished:
        raise UserError(f"no run under {out} has finished yet: nothing to tabulate")
    write_summary(finished, out, baselines, metrics, missing=[run for run in runs if not run.finished])
    print((out / "ablation.md").read_text())
    written = [out / name for name in ("ablation.md", "ablation.csv", "ablation.png", "ablation_p.png")]
    print("wrote " + ", ".join(str(path) for path in written if path.is_file()))
    return 0
