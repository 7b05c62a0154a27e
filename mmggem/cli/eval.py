"""`mmggem eval`: zero-shot classification and retrieval on CLIP_benchmark-layout sets, and a summary CSV.

    mmggem eval zeroshot  --checkpoint PATH --dataset DIR [DIR ...] --output FILE.json
    mmggem eval retrieval --checkpoint PATH --dataset DIR [DIR ...] --output FILE.json
    mmggem eval summary RESULTS_DIR --output summary.csv

PATH is an mmggem model folder, a training run folder (its ``final/`` model), one of
its ``checkpoints/step_N``, ``hf-hub:ORG/NAME`` (an mmggem or open_clip model repo), or
``open_clip:NAME`` with ``--pretrained`` a checkpoint file, pretrained tag or ``hf-hub:`` name;
Hub files and tags are read from the cache (``--cache-dir``; offline, only from there).
``--all-checkpoints`` with a run folder evaluates every checkpoint it kept.
``--output`` takes CLIP_benchmark's placeholders ({dataset}, {model}, {pretrained},
{task}, {language}); with several datasets it must contain {dataset} or be a folder.
``{pretrained}`` is the run's folder name (``RUN_step_N`` for a checkpoint), or the base
name of a model folder or weights file, so the results of two runs never share a file.
A result file of another model is never written over (the same model's is replaced).
Under ``accelerate launch`` the sets are split over the processes; only the main
process writes and prints.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import UsageError
from ..evaluate.results import DEFAULT_OUTPUT_PATTERN, DEFAULT_RECALL_K, ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL

if TYPE_CHECKING:
    from ..evaluate import LoadedModel

TASK_COMMANDS = {"zeroshot": ZEROSHOT_CLASSIFICATION, "retrieval": ZEROSHOT_RETRIEVAL}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and its ``zeroshot``, ``retrieval`` and ``summary`` subcommands."""
    parser = subparsers.add_parser(
        "eval", help="zero-shot classification and retrieval, with CLIP_benchmark's numbers",
        description="Evaluate a model on CLIP_benchmark-layout webdataset sets, or summarise result files.",
    )
    commands = parser.add_subparsers(dest="eval_command", metavar="TASK", required=True)
    for command, task in TASK_COMMANDS.items():
        sub = commands.add_parser(command, help=f"{task} (CLIP_benchmark's metrics and JSON)")
        sub.add_argument("--checkpoint", required=True,
                         help="an mmggem model folder (mmggem.save_model), a training run folder (its final model), "
                              "a run's checkpoints/step_N, hf-hub:ORG/NAME, or open_clip:NAME with --pretrained")
        sub.add_argument("--all-checkpoints", action="store_true",
                         help="--checkpoint is a run folder: evaluate every checkpoint it kept")
        sub.add_argument("--pretrained", metavar="FILE_OR_TAG",
                         help="for --checkpoint open_clip:NAME: a checkpoint file, a pretrained tag of NAME "
                              "(e.g. laion2b_s34b_b79k) or hf-hub:ORG/NAME")
        sub.add_argument("--cache-dir", metavar="DIR",
                         help="where Hub files and tagged weights are cached (default: huggingface_hub's and "
                              "open_clip's own; with HF_HUB_OFFLINE=1 only this cache is read)")
        sub.add_argument("--dataset", required=True, nargs="+", metavar="DIR", help="CLIP_benchmark-layout set folder(s)")
        sub.add_argument("--output", default=DEFAULT_OUTPUT_PATTERN,
                         help="result JSON file, pattern with {dataset} {model} {pretrained} {task} {language}, "
                              "or a folder (one that exists, or a path ending in /) (default: %(default)s)")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
        sub.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.autocast around the model (--amp) or fp32 (--no-amp); default: autocast on "
                              "CUDA, as CLIP_benchmark, and fp32 on a CPU, where autocast means bf16: slower "
                              "without bf16 units, and the numbers move. The result JSON's 'precision' says which")
        sub.add_argument("--trim-text", action=argparse.BooleanOptionalAction, default=True,
                         help="cut each text batch to its longest caption where the features stay the same "
                              "(default); --no-trim-text encodes at the full context length, as CLIP_benchmark: "
                              "under --amp the two agree to bf16/fp16 rounding only")
        sub.add_argument("--language", default="en", help="recorded in the result, as CLIP_benchmark's --language")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.set_defaults(func=run_eval, task=task, recall_k=list(DEFAULT_RECALL_K))
        if task == ZEROSHOT_RETRIEVAL:
            sub.add_argument("--recall-k", type=int, nargs="+", metavar="K",
                             help=f"the k of Recall@k (default: {' '.join(map(str, DEFAULT_RECALL_K))})")
    summary = commands.add_parser("summary", help="a CSV over a folder of result JSON files, and metric by step")
    summary.add_argument("results_dir", metavar="RESULTS_DIR")
    summary.add_argument("--output", default="summary.csv", help="CSV file to write (default: summary.csv)")
    summary.add_argument("--plot", help="PNG of metric against training step (default: the CSV's name with .png)")
    summary.set_defaults(func=run_summary)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate each model (one, or every checkpoint of a run) on each ``--dataset``; write one result JSON
    per model and set and print one table per task."""
    from accelerate import Accelerator

    from ..evaluate import evaluate_dataset
    from ..evaluate.results import format_tables, write_json

    if args.all_checkpoints and not names_folder(args.output) and "{pretrained}" not in args.output:
        raise UsageError(f"--output {args.output!r} would give every checkpoint the same file; "
                         "put {pretrained} in it or give a folder (ending in /)")
    accelerator = Accelerator()
    for index, loaded in enumerate(_models(args)):
        outputs = _output_files(args, loaded)
        model = loaded.model.to(accelerator.device)
        records = []
        for dataset, output in zip(args.dataset, outputs):
            result = evaluate_dataset(
                model, dataset, loaded.preprocess, loaded.tokenizer,
                task=args.task, batch_size=args.batch_size, num_workers=args.num_workers,
                accelerator=accelerator, amp=args.amp, recall_k=args.recall_k, progress=not args.quiet,
                trim_text=args.trim_text,
            )
            record = {**result.record(model=loaded.model_name, pretrained=loaded.pretrained, language=args.language),
                      **loaded.provenance()}
            if accelerator.is_main_process:
                print(f"{result.dataset}: wrote {write_json(record, output)}")
            records.append(record)
        if accelerator.is_main_process:
            if args.all_checkpoints:
                print(("\n" if index else "") + f"{loaded.label} (step {loaded.step}):")
            print(format_tables(records))
    return 0


def _models(args: argparse.Namespace) -> Iterator["LoadedModel"]:
    """The models to evaluate, loaded one at a time: ``--checkpoint``, or every checkpoint of its run."""
    from ..checkpoint.runs import run_checkpoints
    from ..evaluate import load_model, load_run_model

    if not args.all_checkpoints:
        yield load_model(args.checkpoint, args.pretrained, args.cache_dir)
        return
    if args.pretrained is not None or args.checkpoint.startswith("open_clip:"):
        raise UsageError("--all-checkpoints takes a training run folder as --checkpoint, without --pretrained")
    for source in run_checkpoints(args.checkpoint):
        yield load_run_model(source)


def names_folder(output: str) -> bool:
    """Whether ``--output`` names a folder: one that exists, or a path ending in a separator (made when
    the first result is written), as ``results/`` reads to anyone."""
    return Path(output).is_dir() or output.endswith(("/", os.sep))


def _output_files(args: argparse.Namespace, loaded: "LoadedModel") -> list[Path]:
    """One output path per dataset, checked before any work: distinct, never one file for several sets, and
    never a file that holds another model's result."""
    from ..evaluate.results import output_path, refuse_other_model

    pattern = args.output
    if names_folder(pattern):
        pattern = str(Path(pattern) / DEFAULT_OUTPUT_PATTERN)
    elif len(args.dataset) > 1 and "{dataset}" not in pattern:
        raise UsageError(f"--output {args.output!r} names one file for {len(args.dataset)} datasets; "
                         "put {dataset} in it or give a folder (ending in /)")
    paths = [
        output_path(pattern, {"dataset": Path(d).resolve().name, "model": loaded.model_name,
                              "pretrained": loaded.label, "task": args.task, "language": args.language})
        for d in args.dataset
    ]
    if len(set(paths)) < len(paths):
        raise UsageError(f"--output {args.output!r} gives the same file for two datasets: {[str(p) for p in paths]}")
    for path in paths:
        refuse_other_model(path, loaded.model_name, loaded.pretrained, args.task)
    return paths


def run_summary(args: argparse.Namespace) -> int:
    """Write a CSV with one row per result JSON in ``RESULTS_DIR``; print and plot metric against step."""
    from ..evaluate.curves import format_curves, plot_curves
    from ..evaluate.results import summary_rows, write_summary_csv

    rows = summary_rows(args.results_dir)
    tables = format_curves(rows)
    if tables:
        print(tables + "\n")
    print(f"wrote {write_summary_csv(rows, args.output)} ({len(rows)} results)")
    plot = plot_curves(rows, args.plot or Path(args.output).with_suffix(".png"))
    print(f"wrote {plot} (metric against training step)" if plot else "no plot: no result carries a training step")
    return 0
