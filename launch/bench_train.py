"""Training throughput: `mmggem train` against open_clip's `open_clip_train.main`, in one run.

Both trainers train the same architecture (``--model``, pooling ``cls`` = open_clip's class token)
on the same webdataset shards with the same batch size, fp32, torch threads, data workers,
optimizer settings (AdamW, lr, betas, eps, weight decay, warm-up, gradient clipping at 1.0) and
number of steps, in one epoch without resampling, each in its own process, one after the other.
Throughput is steady state, measured the same way for both from each trainer's own log: the
wall-clock time of its logging windows (every ``--log-every`` steps) after the first ``--warmup``
steps, so start-up, the shuffle buffer filling and mmggem's final checkpoint and export are left
out. open_clip_train needs webdataset 0.2.86 and pandas, so it runs under ``--peer-python`` (its
own virtual environment, see shared docs/peers.md); mmggem's model JSON is registered with it
first.

It then measures the step-time overhead of pooling ``ggem`` over ``avg`` three ways: from
``--repeats`` more pairs of `mmggem train` runs (same settings); less exposed to other load on the machine, by timing
mmggem's own training step (``mmggem.train.train_step`` plus clipping and the optimizer step) on
one fixed batch for the two poolings in alternation (ABBA order) in this process, reported as the
median of the paired ratios with a bootstrap 95% interval; and by timing the two poolers' own
forward and backward on tokens of the model's shape, which bounds what pooling can add (eager,
and under torch.compile, which fuses GGeM's elementwise passes). ``--pooling-only`` runs this part alone.

    python launch/bench_train.py --peer-python /work/peers-venv/bin/python
    python launch/bench_train.py --pooling-only --workers 0
    python launch/bench_train.py --peer-python ... --shards 'DIR/{00000..00009}.tar' --repeats 2

Without ``--shards`` it first writes synthetic shards (JPEG images of the model's input size, short captions) with
mmggem's shard writer into a temporary directory (under ``--work-dir`` if given), removed at the end.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

SHUFFLE_BUFFER = 5000  # open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE)
# open_clip_train logs "[{samples seen}/{epoch samples} (..%)] Data (t): .. Batch (t): {window mean s}, ..."
OPEN_CLIP_LOG_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Batch \(t\): ([0-9.]+),")
# open_clip_train's defaults for ViTs, set explicitly on both sides
OPTIMIZER = {"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2, "warmup": 10, "grad_clip": 1.0}


@dataclass(frozen=True)
class Window:
    """One logging window of a training run: the steps ``first..last`` (1-based) and their wall-clock time."""

    first: int
    last: int
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default="/work/peers-venv/bin/python",
                        help="python of the open_clip_train environment (default: %(default)s)")
    parser.add_argument("--model", default="ViT-Ti-4-32", help="an mmggem model config (default: %(default)s)")
    parser.add_argument("--shards", help="shard spec with sizes.json (default: synthetic shards written first)")
    parser.add_argument("--work-dir", help="where the temporary directory of shards and runs goes (default: TMPDIR)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=30, help="first steps left out of the timing")
    parser.add_argument("--log-every", type=int, default=10, help="logging window of both trainers, in steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each trainer")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers of each trainer")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per trainer; the best is kept")
    parser.add_argument("--pooling-only", action="store_true",
                        help="only the ggem/avg overhead, without the open_clip_train comparison")
    parser.add_argument("--pairs", type=int, default=60, help="ABBA step pairs of the in-process ggem/avg timing")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.steps - args.log_every:
        parser.error(f"--warmup must be in 1..{args.steps - args.log_every - 1} so that a window is timed")
    return args


# --- data ------------------------------------------------------------------------------------------


def write_synthetic_shards(directory: Path, samples: int, per_shard: int, size: int) -> str:
    """``samples`` smooth random ``size``-px JPEG images with short captions; returns the brace pattern."""
    import numpy as np
    from PIL import Image

    from mmggem.data.write import EncodedImage, TrainingSample, write_training_shards

    rng = np.random.default_rng(0)
    colours, things, places = (["red", "green", "blue", "grey", "white", "dark"],
                               ["dog", "car", "tree", "house", "boat", "bird", "chair"],
                               ["on a beach", "in a street", "at night", "in the snow", "near a river"])

    def generate():
        for _ in range(samples):
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            coarse.resize((size, size), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
            caption = f"a photo of a {rng.choice(colours)} {rng.choice(things)} {rng.choice(places)}"
            yield TrainingSample(EncodedImage("jpg", buffer.getvalue()), caption)

    directory.mkdir(parents=True, exist_ok=True)
    counts = write_training_shards(directory, generate(), per_shard)
    return str(directory / f"{{00000..{len(counts) - 1:05d}}}.tar")


def model_image_size(model: str) -> int:
    """The input size of an mmggem model config, so that the transform does not resample the images."""
    from mmggem.model import MODEL_CONFIG_DIR

    return json.loads((MODEL_CONFIG_DIR / f"{model}.json").read_text())["vision_cfg"]["image_size"]


def shard_sample_count(pattern: str) -> int:
    """Samples in the shards of ``pattern``, from the sizes.json beside them."""
    import braceexpand

    paths = [Path(p) for p in braceexpand.braceexpand(pattern)]
    sizes = json.loads((paths[0].parent / "sizes.json").read_text())
    return sum(sizes[p.name] for p in paths)


# --- the two trainers -----------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}


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
                  "grad_clip": OPTIMIZER["grad_clip"], "precision": "no", "threads": args.threads,
                  "checkpoint_every": args.steps + 1},  # only the final checkpoint, after the timing
        "log": {"every": args.log_every, "wandb": "off", "progress": False},
    }


def write_config(args: argparse.Namespace, run_dir: Path, pooling: str) -> Path:
    """Create ``run_dir`` and write the run config there, with ``run_dir/out`` as output_dir."""
    run_dir.mkdir(parents=True)
    config = run_dir / "bench.yaml"
    config.write_text(yaml.safe_dump(mmggem_config(args, run_dir / "out", pooling), sort_keys=False))
    return config


def run_mmggem(args: argparse.Namespace, run_dir: Path, pooling: str) -> list[Window]:
    """One `mmggem train` run; its windows from results.jsonl (``perf/samples_per_s`` per window)."""
    config = write_config(args, run_dir, pooling)
    run_child([sys.executable, "-m", "mmggem.cli", "train", str(config)], args.threads, run_dir / "train.log")
    windows, previous = [], 0
    for line in (run_dir / "out" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "perf/samples_per_s" in record:
            steps = record["step"] - previous
            windows.append(Window(previous + 1, record["step"], steps * args.batch_size / record["perf/samples_per_s"]))
            previous = record["step"]
    return windows


def open_clip_command(args: argparse.Namespace, logs: Path) -> list[str]:
    from mmggem.model import MODEL_CONFIG_DIR

    entry = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
             "from open_clip_train.main import main; main(sys.argv[1:])")
    return [args.peer_python, "-c", entry, str(MODEL_CONFIG_DIR / f"{args.model}.json"),
            "--model", args.model, "--train-data", args.shards, "--dataset-type", "webdataset",
            "--train-num-samples", str(args.steps * args.batch_size), "--epochs", "1",
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--precision", "fp32",
            "--device", "cpu", "--seed", "0", "--lr", str(OPTIMIZER["lr"]), "--beta1", str(OPTIMIZER["betas"][0]),
            "--beta2", str(OPTIMIZER["betas"][1]), "--eps", str(OPTIMIZER["eps"]),
            "--wd", str(OPTIMIZER["weight_decay"]), "--warmup", str(OPTIMIZER["warmup"]),
            "--grad-clip-norm", str(OPTIMIZER["grad_clip"]), "--log-every-n-steps", str(args.log_every),
            "--save-frequency", "0", "--report-to", "", "--logs", str(logs), "--name", "bench"]


def run_open_clip(args: argparse.Namespace, run_dir: Path) -> list[Window]:
    """One open_clip_train run; its windows from out.log (``Batch (t)`` is the window's mean step time)."""
    run_dir.mkdir(parents=True)
    run_child(open_clip_command(args, run_dir / "logs"), args.threads, run_dir / "train.log")
    windows, previous = [], 0
    for line in (run_dir / "logs" / "bench" / "out.log").read_text().splitlines():
        match = OPEN_CLIP_LOG_LINE.search(line)
        if match:
            step = int(match.group(1)) // args.batch_size
            windows.append(Window(previous + 1, step, (step - previous) * float(match.group(2))))
            previous = step
    return windows


def run_child(command: list[str], threads: int, log_file: Path) -> None:
    with log_file.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads)).returncode
    if status != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-20:])
        raise SystemExit(f"{command[0]} ... exited with {status}; last lines of {log_file}:\n{tail}")


def steady_rate(windows: list[Window], warmup: int, batch_size: int) -> float:
    """Samples/s over the windows that start after step ``warmup``."""
    timed = [w for w in windows if w.first > warmup]
    if not timed:
        raise ValueError(f"no logging window starts after step {warmup}: {windows}")
    return sum(w.last - w.first + 1 for w in timed) * batch_size / sum(w.seconds for w in timed)


# --- ggem against avg, in process -----------------------------------------------------------------


def paired_step_times(args: argparse.Namespace, work: Path, poolings: tuple[str, str],
                      pairs: int) -> dict[str, list[float]]:
    """Seconds of mmggem's training step for two poolings, alternated ABBA on one fixed batch.

    The batch and model come from the same run config as the trainer runs; alternating the two
    models step by step puts both under the same momentary load of the machine.
    """
    import torch
    from accelerate import Accelerator

    from mmggem.config import load_config
    from mmggem.loss import build_loss
    from mmggem.model import get_tokenizer
    from mmggem.optim import build_optimizer
    from mmggem.train import build_model, train_step

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    runners = {}
    for pooling in poolings:
        cfg = load_config(write_config(args, work / f"paired-{pooling}", pooling))
        torch.manual_seed(0)
        model = build_model(cfg)
        optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas),
                                    cfg.train.adam_eps, cfg.train.pool_p_lr_mult)
        runners[pooling] = (model, optimizer, build_loss("clip"))
    size = model.visual.image_size[0]
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(args.batch_size)])

    def one_step(pooling: str) -> float:
        model, optimizer, loss_fn = runners[pooling]
        start = time.perf_counter()
        train_step(model, loss_fn, accelerator, images, texts, accum_steps=1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for pooling in poolings * 3:  # warm-up
        one_step(pooling)
    times: dict[str, list[float]] = {p: [] for p in poolings}
    for pair in range(pairs):
        for pooling in (poolings if pair % 2 == 0 else poolings[::-1]):
            times[pooling].append(one_step(pooling))
    return times


def pooler_times(args: argparse.Namespace, repeats: int = 200) -> dict[str, float]:
    """Median seconds of the poolers' forward and backward on the patch tokens of one batch of ``--model``.

    Times ``avg``, ``ggem`` and ``ggem`` under torch.compile (which fuses GGeM's dozen elementwise
    passes; what ``model.compile=true`` does for the whole model).
    """
    import torch

    from mmggem import create_model

    torch.set_num_threads(args.threads)
    tower = create_model(args.model, pooling="ggem").visual
    tokens, width = tower.grid_size[0] * tower.grid_size[1], tower.positional_embedding.shape[-1]
    x = torch.randn(args.batch_size, tokens, width, requires_grad=True)
    poolers = {"avg": create_model(args.model, pooling="avg").visual.pooler, "ggem": tower.pooler,
               "ggem-compiled": torch.compile(tower.pooler)}
    medians = {}
    for name, pooler in poolers.items():
        times = []
        for _ in range(repeats + 10):  # the first ten (and torch.compile's compilation) are left out
            start = time.perf_counter()
            pooler(x).sum().backward()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times[10:])
    return medians


def median_with_interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """The median of ``values`` and a bootstrap 95% interval of it (seeded, so reruns print the same)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


# --- main -----------------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def describe(rates: list[float]) -> str:
    """The best rate, which is the figure compared, and every run's, which shows the noise."""
    return f"{max(rates):8.1f} samples/s (runs: {', '.join(f'{r:.1f}' for r in rates)})"


def alternate(args: argparse.Namespace, work: Path, sides: dict, label: str) -> dict[str, list[float]]:
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.shards is None:
            samples = (args.steps + args.log_every) * args.batch_size  # one epoch covers every step
            size = model_image_size(args.model)
            print(f"writing {samples} synthetic {size}x{size} samples to {work / 'shards'}", flush=True)
            args.shards = write_synthetic_shards(work / "shards", samples, per_shard=1000, size=size)
        available = shard_sample_count(args.shards)
        if available < args.steps * args.batch_size:
            raise SystemExit(f"{args.shards} holds {available} samples; {args.steps} steps of "
                             f"{args.batch_size} need {args.steps * args.batch_size} in one epoch")
        print(f"load average before: {load_average()} on {os.cpu_count()} CPUs", flush=True)

        trainers = {}
        if not args.pooling_only:
            print("mmggem (pooling cls) against open_clip_train:", flush=True)
            trainers = alternate(args, work, {
                "mmggem": lambda d: run_mmggem(args, d, "cls"),
                "open_clip_train": lambda d: run_open_clip(args, d),
            }, "trainers")
        print("mmggem, pooling avg against ggem:", flush=True)
        poolings = alternate(args, work, {
            "mmggem-avg": lambda d: run_mmggem(args, d, "avg"),
            "mmggem-ggem": lambda d: run_mmggem(args, d, "ggem"),
        }, "pooling")
        print(f"in-process step timing, {args.pairs} ABBA pairs:", flush=True)
        paired = paired_step_times(args, work, ("avg", "ggem"), args.pairs)
        print("pooler forward and backward:", flush=True)
        pooler = pooler_times(args)

    ratios = [g / a for g, a in zip(paired["ggem"], paired["avg"])]
    print(f"\n{args.model}, batch {args.batch_size}, fp32, {args.threads} threads, {args.workers} worker(s), "
          f"{args.steps} steps, steady state over steps {args.warmup + 1}..{args.steps}, best of {args.repeats}; "
          f"shards {args.shards}; load average after: {load_average()}")
    best = {name: max(rates) for name, rates in {**trainers, **poolings}.items()}
    if trainers:
        print(f"mmggem train (cls):        {describe(trainers['mmggem'])}")
        print(f"open_clip_train (cls):     {describe(trainers['open_clip_train'])}")
        print(f"ratio mmggem / open_clip:  {best['mmggem'] / best['open_clip_train']:8.3f}")
    print(f"mmggem train (avg):        {describe(poolings['mmggem-avg'])}")
    print(f"mmggem train (ggem):       {describe(poolings['mmggem-ggem'])}")
    mean = {name: statistics.mean(rates) for name, rates in poolings.items()}
    print(f"ggem step-time overhead, trainer runs: {100 * (best['mmggem-avg'] / best['mmggem-ggem'] - 1):+.2f}% "
          f"best against best, {100 * (mean['mmggem-avg'] / mean['mmggem-ggem'] - 1):+.2f}% mean against mean")
    print(f"training step avg / ggem:  {1e3 * statistics.median(paired['avg']):8.1f} / "
          f"{1e3 * statistics.median(paired['ggem']):.1f} ms (median)")
    ratio, low, high = median_with_interval(ratios)
    print(f"ggem step-time overhead, paired steps: {100 * (ratio - 1):+.2f}% "
          f"(median of {len(ratios)} ABBA-paired ratios; "
          f"95% interval {100 * (low - 1):+.2f}% .. {100 * (high - 1):+.2f}%)")
    extra = pooler["ggem"] - pooler["avg"]
    print(f"pooler forward+backward avg / ggem / ggem compiled: {1e3 * pooler['avg']:.2f} / {1e3 * pooler['ggem']:.2f} "
          f"/ {1e3 * pooler['ggem-compiled']:.2f} ms (median); eager ggem adds {1e3 * extra:.2f} ms = "
          f"{100 * extra / statistics.median(paired['avg']):.2f}% of the avg step")


if __name__ == "__main__":
    main()
