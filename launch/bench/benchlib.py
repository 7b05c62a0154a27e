"""What the benchmark scripts of launch/ share: synthetic shards, trainer runs and their logs, timing, printing.

Each ``bench_*.py`` is one benchmark and imports this file from beside it. Peer tools (open_clip_train)
run under ``--peer-python``, the python of their own virtual environment; docs/benchmarks.md, "The
peers' environments", says how to make it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

SHUFFLE_BUFFER = 5000  # open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE)
# open_clip_train's defaults for ViTs, set explicitly on both sides
OPTIMIZER = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2, "warmup": 10, "grad_clip": 1.0}
# --precision as mmggem spells it (train.precision)
MMGGEM_PRECISION = {"fp32": "no", "bf16": "bf16"}
# open_clip_train logs "[{samples seen}/{epoch samples} (..%)] Data (t): .. Batch (t): {window mean s}, ..."
OPEN_CLIP_LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+),")
WORDS = ("a photo of the red blue green small large old new dog cat car tree house street beach "
         "mountain city person bike boat sky river at night in the morning with on under near").split()


# --- data ------------------------------------------------------------------------------------------


def write_synthetic_shards(directory: Path, samples: int, per_shard: int, size: int) -> str:
    """``samples`` smooth random ``size``-px JPEG photos with 8-20 word captions; returns the brace pattern."""
    import numpy as np
    from PIL import Image

    from mmggem.data.write import EncodedImage, TrainingSample, write_training_shards

    rng = np.random.default_rng(0)

    def generate():
        for _ in range(samples):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            photo = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
            photo = np.clip(photo + rng.integers(-12, 13, photo.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 21))))
            yield TrainingSample(EncodedImage("jpg", buffer.getvalue()), caption)

    directory.mkdir(parents=True, exist_ok=True)
    counts = write_training_shards(directory, generate(), per_shard)
    return str(directory / f"{{00000..{len(counts) - 1:05d}}}.tar")


def shard_samples(spec: str) -> int:
    """Samples in the shards of ``spec``, as the training loader counts them (sizes.json)."""
    from mmggem.data.shards import count_samples, parse_spec

    return count_samples([url for source in parse_spec(spec) for url in source.urls])


def model_config(model: str) -> dict:
    """The open_clip config of ``model``: one of mmggem's model_configs/ or one of open_clip's own."""
    import open_clip

    import mmggem.model.clip  # noqa: F401  (registers mmggem's model configs with open_clip)

    config = open_clip.get_model_config(model)
    if config is None:
        raise SystemExit(f"unknown model {model!r}: neither mmggem's nor open_clip's")
    return config


def model_image_size(model: str) -> int:
    """The input size of a model config, so that the transform does not resample the images."""
    size = model_config(model)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


# --- mmggem train runs and their logs -------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run that every trainer benchmark sets the same way."""
    parser.add_argument("--model", default="ViT-Ti-4-32",
                        help="an mmggem or open_clip model config, e.g. ViT-B-16 (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where it trains; cuda is one GPU (default: %(default)s)")
    parser.add_argument("--precision", choices=tuple(MMGGEM_PRECISION), default="fp32",
                        help="fp32, or bf16 autocast (mmggem train.precision=bf16, open_clip_train amp_bf16)")
    parser.add_argument("--shards", help="shard spec with sizes.json (default: synthetic shards written first)")
    parser.add_argument("--work-dir", help="where the temporary directory of shards and runs goes (default: TMPDIR)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=30, help="first steps left out of the timing")
    parser.add_argument("--log-every", type=int, default=10, help="logging window, in steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per side; the best is kept")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args``, once their warm-up leaves a logging window to time."""
    if not 0 < args.warmup < args.steps - args.log_every:
        parser.error(f"--warmup must be in 1..{args.steps - args.log_every - 1} so that a window is timed")
    return args


def prepare_shards(args: argparse.Namespace, work: Path) -> None:
    """Write synthetic shards into ``work`` unless ``--shards`` names some; check one epoch holds every step."""
    if args.shards is None:
        # one epoch covers every step, whatever part of a batch each worker's shards leave over
        samples = (args.steps + args.log_every + args.workers) * args.batch_size
        size = model_image_size(args.model)
        print(f"writing {samples} synthetic {size}x{size} samples to {work / 'shards'}", flush=True)
        args.shards = write_synthetic_shards(work / "shards", samples, per_shard=1000, size=size)
    available = shard_samples(args.shards)
    if available < args.steps * args.batch_size:
        raise SystemExit(f"{args.shards} holds {available} samples; {args.steps} steps of "
                         f"{args.batch_size} need {args.steps * args.batch_size} in one epoch")


def mmggem_config(args: argparse.Namespace, output_dir: Path, pooling: str) -> dict:
    """The run config of one `mmggem train` run (everything explicit, nothing from configs/)."""
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": args.model, "pooling": pooling},
        "data": {"train": args.shards, "resampled": False, "shuffle_buffer": SHUFFLE_BUFFER,
                 "workers": args.workers},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": OPTIMIZER["lr"],
                  "betas": list(OPTIMIZER["betas"]), "adam_eps": OPTIMIZER["eps"],
                  "weight_decay": OPTIMIZER["weight_decay"], "warmup_steps": OPTIMIZER["warmup"],
                  "grad_clip": OPTIMIZER["grad_clip"], "precision": MMGGEM_PRECISION[args.precision],
                  "threads": args.threads,
                  "checkpoint_every": args.steps + 1},  # only the final checkpoint, after the timing
        "log": {"every": args.log_every, "wandb": "off", "progress": False},
    }


def write_config(args: argparse.Namespace, run_dir: Path, pooling: str) -> Path:
    """Create ``run_dir`` and write the run config there, with ``run_dir/out`` as output_dir."""
    run_dir.mkdir(parents=True)
    config = run_dir / "bench.yaml"
    config.write_text(yaml.safe_dump(mmggem_config(args, run_dir / "out", pooling), sort_keys=False))
    return config


def child_env(threads: int, device: str) -> dict[str, str]:
    """A trainer's environment: ``threads`` threads, no wandb, and no GPU in sight unless ``device`` is cuda."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(command: list[str], env: dict[str, str], log_file: Path) -> None:
    """Run ``command`` with its output in ``log_file``; exit with the log's last lines if it fails."""
    with log_file.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-20:])
        raise SystemExit(f"{command[0]} ... exited with {status}; last lines of {log_file}:\n{tail}")


def run_mmggem(args: argparse.Namespace, run_dir: Path, pooling: str) -> list[Window]:
    """One `mmggem train` run in its own process; its logging windows."""
    config = write_config(args, run_dir, pooling)
    run_child([sys.executable, "-m", "mmggem.cli", "train", str(config)], child_env(args.threads, args.device),
              run_dir / "train.log")
    return read_windows(run_dir / "out" / "results.jsonl", args.batch_size)


@dataclass(frozen=True)
class Window:
    """One logging window of a training run: the steps ``first..last`` (1-based) and their wall-clock time."""

    first: int
    last: int
    seconds: float


def read_windows(log: Path, batch_size: int) -> list[Window]:
    """The logging windows of a trainer's log: mmggem's results.jsonl or open_clip_train's out.log.

    Each log line that closes a window gives its last step and its mean step time: mmggem's record
    its ``step`` and ``perf/samples_per_s``, open_clip_train's line its samples seen and ``Batch (t)``.
    """
    windows, previous = [], 0
    for line in log.read_text().splitlines():
        match = OPEN_CLIP_LOG_LINE.search(line)
        if match:
            step, step_seconds = int(match.group(1)) // batch_size, float(match.group(2))
        elif line.startswith("{") and "perf/samples_per_s" in (record := json.loads(line)):
            step, step_seconds = record["step"], batch_size / record["perf/samples_per_s"]
        else:
            continue
        windows.append(Window(previous + 1, step, (step - previous) * step_seconds))
        previous = step
    return windows


def steady_rate(windows: list[Window], warmup: int, batch_size: int) -> float:
    """Samples/s over the windows that start after step ``warmup``."""
    timed = [w for w in windows if w.first > warmup]
    if not timed:
        raise ValueError(f"no logging window starts after step {warmup}: {windows}")
    return sum(w.last - w.first + 1 for w in timed) * batch_size / sum(w.seconds for w in timed)


def alternate(args: argparse.Namespace, work: Path, sides: dict[str, Callable[[Path], list[Window]]],
              label: str) -> dict[str, list[float]]:
    """Run each side ``--repeats`` times in alternation; steady-state samples/s of every run."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, run in sides.items():
            started = time.perf_counter()
            windows = run(work / f"{label}-{name}-{repeat}")
            rates[name].append(steady_rate(windows, args.warmup, args.batch_size))
            print(f"  run {repeat + 1} {name:<18} {rates[name][-1]:7.1f} samples/s "
                  f"({time.perf_counter() - started:.0f} s, load {load_average()})", flush=True)
    return rates


# --- timing and printing --------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device``, so that the host's clock times it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def seconds(work: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of ``work()``, including what it queued on ``device``."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def median_with_interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median of ``values`` and a bootstrap 95% interval of it (seeded, so reruns print the same)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def format_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU count; fails at start if ``--device cuda`` finds no GPU."""
    import torch

    if device == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.cuda.get_device_name()


def run_header(args: argparse.Namespace, device: str) -> str:
    """The settings line printed above a trainer benchmark's results."""
    return (f"{args.model}, batch {args.batch_size}, {args.precision}, {device}, {args.threads} threads, "
            f"{args.workers} worker(s), {args.steps} steps, steady state over steps {args.warmup + 1}..{args.steps}, "
            f"best of {args.repeats}; shards {args.shards}; load average after: {load_average()}")
