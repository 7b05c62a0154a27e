"""Training throughput: `mmggem train` against open_clip's `open_clip_train.main`, in one run.

Both trainers train the same architecture (``--model``, pooling ``cls`` = open_clip's class token)
on the same webdataset shards with the same batch size, device (``--device``: cpu, or one CUDA
GPU), precision (``--precision``: fp32, or bf16 autocast = open_clip_train's ``amp_bf16``), torch
threads, data workers, optimizer settings (AdamW, lr, betas, eps, weight decay, warm-up, gradient
clipping at 1.0) and number of steps, in one epoch without resampling, each in its own process, one
after the other (``--repeats`` times, alternating), without checkpoints inside the timed steps.
Throughput is steady state, measured the same way for both from each trainer's own log: the
wall-clock time of its logging windows (every ``--log-every`` steps) after the first ``--warmup``
steps, so start-up, the shuffle buffer filling and mmggem's final checkpoint and export are left
out. Beside samples/s it prints model FLOPs utilisation (``bench_mfu.py`` says how it is counted).

open_clip_train needs webdataset 0.2.86 and pandas, so it runs under ``--peer-python``, the python of
its own virtual environment (docs/benchmarks.md, "The peers' environments", says how to make it); the model's
open_clip JSON (mmggem's own, or open_clip's, such as ViT-B-16) is written out and registered with it
first.

    python launch/bench/bench_train.py --peer-python PEER_VENV/bin/python
    python launch/bench/bench_train.py --peer-python PEER_VENV/bin/python --device cuda --model ViT-B-16 \\
        --precision bf16 --batch-size 256 --workers 8

Without ``--shards`` it first writes synthetic shards (JPEG images of the model's input size, short captions) with
mmggem's shard writer into a temporary directory (under ``--work-dir`` if given), removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mfu import count_train_flops, device_peak, mfu  # noqa: E402
from benchlib import (  # noqa: E402
    OPTIMIZER, Window, add_run_arguments, alternate, check_run_arguments, child_env, device_name, format_rate,
    load_average, model_config, prepare_shards, read_windows, run_child, run_header, run_mmggem,
)

OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}  # --precision as open_clip_train spells it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", required=True,
                        help="python of the open_clip_train environment (see docs/benchmarks.md, \"The peers' environments\")")
    add_run_arguments(parser)
    return check_run_arguments(parser, parser.parse_args(argv))


def open_clip_command(args: argparse.Namespace, model_json: Path, logs: Path) -> list[str]:
    """open_clip_train's command line, registering ``model_json`` (the model's config) first."""
    entry = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
             "from open_clip_train.main import main; main(sys.argv[1:])")
    return [args.peer_python, "-c", entry, str(model_json),
            "--model", args.model, "--train-data", args.shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers),
            "--precision", OPEN_CLIP_PRECISION[args.precision], "--device", args.device, "--seed", "0",
            "--lr", str(OPTIMIZER["lr"]), "--beta1", str(OPTIMIZER["betas"][0]),
            "--beta2", str(OPTIMIZER["betas"][1]), "--eps", str(OPTIMIZER["eps"]),
            "--wd", str(OPTIMIZER["weight_decay"]), "--warmup", str(OPTIMIZER["warmup"]),
            "--grad-clip-norm", str(OPTIMIZER["grad_clip"]), "--log-every-n-steps", str(args.log_every),
            "--save-frequency", "0", "--report-to", "", "--logs", str(logs), "--name", "bench"]


def run_open_clip(args: argparse.Namespace, run_dir: Path) -> list[Window]:
    """One open_clip_train run in its own process; its logging windows from out.log."""
    run_dir.mkdir(parents=True)
    model_json = run_dir / f"{args.model}.json"  # the same architecture mmggem builds, under the same name
    model_json.write_text(json.dumps(model_config(args.model), indent=2))
    run_child(open_clip_command(args, model_json, run_dir / "logs"), child_env(args.threads, args.device),
              run_dir / "train.log")
    return read_windows(run_dir / "logs" / "bench" / "out.log", args.batch_size)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = device_name(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=args.work_dir) as tmp:
        work = Path(tmp)
        prepare_shards(args, work)
        flops = count_train_flops(args, work) / args.batch_size  # per sample
        peak = device_peak(args)
        print(f"load average before: {load_average()} on {os.cpu_count()} CPUs; device {device}", flush=True)
        print("mmggem (pooling cls) against open_clip_train:", flush=True)
        rates = alternate(args, work, {
            "mmggem": lambda d: run_mmggem(args, d, "cls"),
            "open_clip_train": lambda d: run_open_clip(args, d),
        }, "trainers")
    print("\n" + run_header(args, device))
    print(f"model FLOPs {flops / 1e9:.3f} GFLOP per sample; peak for MFU {format_rate(peak.flops)}, {peak.source}")
    for name, label in (("mmggem", "mmggem train (cls):"), ("open_clip_train", "open_clip_train (cls):")):
        best = max(rates[name])
        print(f"{label:26s} {best:8.1f} samples/s, MFU {100 * mfu(best, flops, peak):5.1f}% "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"{'ratio mmggem / open_clip:':26s} {max(rates['mmggem']) / max(rates['open_clip_train']):8.3f}")


if __name__ == "__main__":
    main()
