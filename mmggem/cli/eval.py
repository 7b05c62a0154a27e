"""`mmggem eval`: zero-shot classification and retrieval on CLIP_benchmark-layout sets, and a summary CSV.

    mmggem eval zeroshot  --checkpoint PATH --dataset DIR [DIR ...] --output FILE.json
    mmggem eval retrieval --checkpoint PATH --dataset DIR [DIR ...] --output FILE.json
    mmggem eval summary RESULTS_DIR --output summary.csv

PATH is an mmggem model folder, ``hf-hub:ORG/NAME`` (an mmggem or open_clip model repo), or
``open_clip:NAME`` with ``--pretrained`` a checkpoint file, pretrained tag or ``hf-hub:`` name;
Hub files and tags are read from the cache (``--cache-dir``; offline, only from there).
``--output`` takes CLIP_benchmark's placeholders ({dataset}, {model}, {pretrained},
{task}, {language}); with several datasets it must contain {dataset} or be a folder.
Under ``accelerate launch`` the sets are split over the processes; only the main
process writes and prints.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..evaluate.results import DEFAULT_OUTPUT_PATTERN, DEFAULT_RECALL_K, ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL

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
                         help="an mmggem model folder (mmggem.save_model), hf-hub:ORG/NAME, "
                              "or open_clip:NAME with --pretrained")
        sub.add_argument("--pretrained", metavar="FILE_OR_TAG",
                         help="for --checkpoint open_clip:NAME: a checkpoint file, a pretrained tag of NAME "
                              "(e.g. laion2b_s34b_b79k) or hf-hub:ORG/NAME")
        sub.add_argument("--cache-dir", metavar="DIR",
                         help="where Hub files and tagged weights are cached (default: huggingface_hub's and "
                              "open_clip's own; with HF_HUB_OFFLINE=1 only this cache is read)")
        sub.add_argument("--dataset", required=True, nargs="+", metavar="DIR", help="CLIP_benchmark-layout set folder(s)")
        sub.add_argument("--output", default=DEFAULT_OUTPUT_PATTERN,
                         help="result JSON file, pattern with {dataset} {model} {pretrained} {task} {language}, "
                              "or an existing folder (default: %(default)s)")
        sub.add_argument("--batch-size", type=int, default=64)
        sub.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
        sub.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.autocast around the model (--amp) or fp32 (--no-amp); default: autocast on "
                              "CUDA, as CLIP_benchmark, and fp32 on a CPU, where autocast means bf16: slower "
                              "without bf16 units, and the numbers move. The result JSON's 'precision' says which")
        sub.add_argument("--language", default="en", help="recorded in the result, as CLIP_benchmark's --language")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        sub.set_defaults(func=run_eval, task=task, recall_k=list(DEFAULT_RECALL_K))
        if task == ZEROSHOT_RETRIEVAL:
            sub.add_argument("--recall-k", type=int, nargs="+", metavar="K",
                             help=f"the k of Recall@k (default: {' '.join(map(str, DEFAULT_RECALL_K))})")
    summary = commands.add_parser("summary", help="a CSV over a folder of result JSON files")
    summary.add_argument("results_dir", metavar="RESULTS_DIR")
    summary.add_argument("--output", default="summary.csv", help="CSV file to write (default: summary.csv)")
    summary.set_defaults(func=run_summary)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint on each ``--dataset``; write one result JSON per set and print one table per task."""
    from accelerate import Accelerator

    from ..evaluate import evaluate_dataset, load_model
    from ..evaluate.results import format_tables, write_json

    loaded = load_model(args.checkpoint, args.pretrained, args.cache_dir)
    accelerator = Accelerator()
    outputs = _output_files(args, loaded.model_name, loaded.pretrained)
    model = loaded.model.to(accelerator.device)
    records = []
    for dataset, output in zip(args.dataset, outputs):
        result = evaluate_dataset(
            model, dataset, loaded.preprocess, loaded.tokenizer,
            task=args.task, batch_size=args.batch_size, num_workers=args.num_workers,
            accelerator=accelerator, amp=args.amp, recall_k=args.recall_k, progress=not args.quiet,
        )
        record = result.record(model=loaded.model_name, pretrained=loaded.pretrained, language=args.language)
        if accelerator.is_main_process:
            print(f"{result.dataset}: wrote {write_json(record, output)}")
        records.append(record)
    if accelerator.is_main_process:
        print(format_tables(records))
    return 0


def _output_files(args: argparse.Namespace, model_name: str, pretrained: str) -> list[Path]:
    """One output path per dataset, checked before any work: distinct, and never one file for several sets."""
    from ..evaluate.results import output_path

    pattern = args.output
    if Path(pattern).is_dir():
        pattern = str(Path(pattern) / DEFAULT_OUTPUT_PATTERN)
    elif len(args.dataset) > 1 and "{dataset}" not in pattern:
        raise UsageError(f"--output {args.output!r} names one file for {len(args.dataset)} datasets; "
                         "put {dataset} in it or give an existing folder")
    paths = [
        output_path(pattern, {"dataset": Path(d).resolve().name, "model": model_name, "pretrained": pretrained,
                              "task": args.task, "language": args.language})
        for d in args.dataset
    ]
    if len(set(paths)) < len(paths):
        raise UsageError(f"--output {args.output!r} gives the same file for two datasets: {[str(p) for p in paths]}")
    return paths


def run_summary(args: argparse.Namespace) -> int:
    """Write a CSV with one row per result JSON in ``RESULTS_DIR``."""
    from ..evaluate.results import summary_rows, write_summary_csv

    rows = summary_rows(args.results_dir)
    print(f"wrote {write_summary_csv(rows, args.output)} ({len(rows)} results)")
    return 0
