"""Training samples/s: `mmggem train` against `open_clip_train`, alone (without bench_train's pooling part).

The comparison of ``launch/bench_train.py`` (same options, same synthetic shards of short captions,
same settings on both sides, runs alternating, steady-state windows from each trainer's own log)
without its GGeM-against-avg measurements, so that repeats are affordable on a busy machine.
mmggem trims each text batch to its longest caption (``mmggem.text_length``); open_clip_train
encodes every caption at the full context length. Prints every run, the best of each, their ratio
and the machine's fp32 2048-square matmul rate.

    python launch/bench_vs_open_clip.py --peer-python PEER_VENV/bin/python --steps 60 --warmup 20 --repeats 3
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mfu import matmul_rate  # noqa: E402
from bench_train import parse_args, run_open_clip  # noqa: E402
from benchlib import alternate, load_average, model_image_size, run_mmggem, write_synthetic_shards  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_vs_open_clip_", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.shards is None:
            samples = (args.steps + args.log_every + args.workers) * args.batch_size
            args.shards = write_synthetic_shards(work / "shards", samples, per_shard=1000,
                                                 size=model_image_size(args.model))
        rate = matmul_rate(args.device, "fp32", 2048)
        print(f"{args.model}, batch {args.batch_size}, {args.precision}, {args.device}, {args.threads} threads, "
              f"{args.workers} worker(s), {args.steps} steps (timed from step {args.warmup + 1}); fp32 2048-square "
              f"matmul {rate / 1e9:.0f} GFLOP/s; load average {load_average()} on {os.cpu_count()} CPUs", flush=True)
        rates = alternate(args, work, {"mmggem": lambda d: run_mmggem(args, d, "cls"),
                                       "open_clip_train": lambda d: run_open_clip(args, d)}, "trainers")
    best = {name: max(values) for name, values in rates.items()}
    print(f"mmggem train (cls): {best['mmggem']:.1f} samples/s best; open_clip_train: "
          f"{best['open_clip_train']:.1f}; ratio {best['mmggem'] / best['open_clip_train']:.3f}x "
          f"(load average after: {load_average()})")


if __name__ == "__main__":
    main()
