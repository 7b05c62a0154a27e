"""Training throughput: `mmggem train` against open_clip's `open_clip_train.main`, in one run.

Both trainers train the same architecture (``--model``, pooling ``cls`` = open_clip's class token)
on the same webdataset shards with the same batch size, device (``--device``: cpu, or one CUDA
GPU), precision (``--precision``: fp32, or bf16 autocast = open_clip_train's ``amp_bf16``), torch
threads, data workers, optimizer settings (AdamW, lr, betas, eps, weight decay, warm-up, gradient
clipping at 1.0) and number of steps, in one epoch without resampling, each in its own process, one
after the other, without checkpoints inside the timed steps.
Throughput is steady state, measured the same way for both from each trainer's own log: the
wall-clock time of its logging windows (every ``--log-every`` steps) after the first ``--warmup``
steps, so start-up, the shuffle buffer filling and mmggem's final checkpoint and export are left
out. open_clip_train needs webdataset 0.2.86 and pandas, so it runs under ``--peer-python`` (its
own virtual environment, see shared docs/peers.md); the model's open_clip JSON (mmggem's own, or
open_clip's, such as ViT-B-16) is written out and registered with it first.

Beside samples/s it prints model FLOPs utilisation (MFU): the FLOPs of one forward and backward of
one training batch (image and text towers and the loss, at ``--batch-size``), counted by torch's
``FlopCounterMode`` on the meta device (so attention counts the same whichever kernel a device
would pick), times steps/s, over the device's peak. On CUDA the peak is the datasheet's dense
figure for ``torch.cuda.get_device_name()`` (bf16, or TF32 for fp32: both trainers allow TF32
matmuls), or where the name is not in the table the rate of a large matrix product measured on the
GPU; on CPU it is the rate of an fp32 matrix product measured on this machine with ``--threads``
threads (the machine rate to state beside CPU figures). The output says which.

It then measures the step-time overhead of pooling ``ggem`` over ``avg`` three ways: from
``--repeats`` more pairs of `mmggem train` runs (same settings); less exposed to other load on the machine, by timing
mmggem's own training step (``mmggem.train.train_step`` plus clipping and the optimizer step) on
one fixed batch for the two poolings in alternation (ABBA order) in this process, reported as the
median of the paired ratios with a bootstrap 95% interval; and by timing the two poolers' own
forward and backward on tokens of the model's shape, which bounds what pooling can add (eager,
and under torch.compile, which fuses GGeM's elementwise passes). ``--pooling-only`` runs this part alone.

    python launch/bench_train.py --peer-python /work/peers-venv/bin/python
    python launch/bench_train.py --peer-python ... --device cuda --model ViT-B-16 --precision bf16 \
        --batch-size 256 --workers 8
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
# --precision as each trainer spells it: train.precision, open_clip_train's --precision
MMGGEM_PRECISION = {"fp32": "no", "bf16": "bf16"}
OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
# Dense (no 2:4 sparsity) peak TFLOP/s of NVIDIA's datasheets, by a pattern of the lower-cased
# torch.cuda.get_device_name() (the first that matches); "tf32" is what fp32 matmuls reach with TF32
# allowed. H100 SXM reports itself as "NVIDIA H100 80GB HBM3". NVIDIA publishes no A10G datasheet:
# its figures are the ones AWS quotes for it, lower than the A10's on tensor cores.
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"h100.*nvl", "H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h100.*pcie", "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"gh200", "GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h100", "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"h200.*nvl", "H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"h200", "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"a100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"a10g", "A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    (r"\ba10\b", "A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\ba40\b", "A40", {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"l40s", "L40S", {"bf16": 366.0, "tf32": 183.0, "fp32": 91.6}),
    (r"\bl40\b", "L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bl4\b", "L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


@dataclass(frozen=True)
class Window:
    """One logging window of a training run: the steps ``first..last`` (1-based) and their wall-clock time."""

    first: int
    last: int
    seconds: float


@dataclass(frozen=True)
class Peak:
    """The FLOP/s that MFU is taken against, and where the figure comes from."""

    flops: float
    source: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default="/work/peers-venv/bin/python",
                        help="python of the open_clip_train environment (default: %(default)s)")
    parser.add_argument("--model", default="ViT-Ti-4-32",
                        help="an mmggem or open_clip model config, e.g. ViT-B-16 (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both trainers train; cuda is one GPU (default: %(default)s)")
    parser.add_argument("--precision", choices=tuple(MMGGEM_PRECISION), default="fp32",
                        help="fp32, or bf16 autocast (mmggem train.precision=bf16, open_clip_train amp_bf16)")
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


def model_config(model: str) -> dict:
    """The open_clip config of ``model``: one of mmggem's model_configs/ or one of open_clip's own."""
    import open_clip

    import mmggem.model  # noqa: F401  (registers mmggem's model configs with open_clip)

    config = open_clip.get_model_config(model)
    if config is None:
        raise SystemExit(f"unknown model {model!r}: neither mmggem's nor open_clip's")
    return config


def model_image_size(model: str) -> int:
    """The input size of a model config, so that the transform does not resample the images."""
    size = model_config(model)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def shard_sample_count(pattern: str) -> int:
    """Samples in the shards of ``pattern``, from the sizes.json beside them."""
    import braceexpand

    paths = [Path(p) for p in braceexpand.braceexpand(pattern)]
    sizes = json.loads((paths[0].parent / "sizes.json").read_text())
    return sum(sizes[p.name] for p in paths)


# --- the two trainers -----------------------------------------------------------------------------


def child_env(threads: int, device: str) -> dict[str, str]:
    """A trainer's environment: ``threads`` threads, no wandb, and no GPU in sight unless ``device`` is cuda."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


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


def run_mmggem(args: argparse.Namespace, run_dir: Path, pooling: str) -> list[Window]:
    """One `mmggem train` run; its windows from results.jsonl (``perf/samples_per_s`` per window)."""
    config = write_config(args, run_dir, pooling)
    run_child([sys.executable, "-m", "mmggem.cli", "train", str(config)], child_env(args.threads, args.device),
              run_dir / "train.log")
    windows, previous = [], 0
    for line in (run_dir / "out" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "perf/samples_per_s" in record:
            steps = record["step"] - previous
            windows.append(Window(previous + 1, record["step"], steps * args.batch_size / record["perf/samples_per_s"]))
            previous = record["step"]
    return windows


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
    """One open_clip_train run; its windows from out.log (``Batch (t)`` is the window's mean step time)."""
    run_dir.mkdir(parents=True)
    model_json = run_dir / f"{args.model}.json"  # the same architecture mmggem builds, under the same name
    model_json.write_text(json.dumps(model_config(args.model), indent=2))
    run_child(open_clip_command(args, model_json, run_dir / "logs"), child_env(args.threads, args.device),
              run_dir / "train.log")
    windows, previous = [], 0
    for line in (run_dir / "logs" / "bench" / "out.log").read_text().splitlines():
        match = OPEN_CLIP_LOG_LINE.search(line)
        if match:
            step = int(match.group(1)) // args.batch_size
            windows.append(Window(previous + 1, step, (step - previous) * float(match.group(2))))
            previous = step
    return windows


def run_child(command: list[str], env: dict[str, str], log_file: Path) -> None:
    with log_file.open("w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-20:])
        raise SystemExit(f"{command[0]} ... exited with {status}; last lines of {log_file}:\n{tail}")


def steady_rate(windows: list[Window], warmup: int, batch_size: int) -> float:
    """Samples/s over the windows that start after step ``warmup``."""
    timed = [w for w in windows if w.first > warmup]
    if not timed:
        raise ValueError(f"no logging window starts after step {warmup}: {windows}")
    return sum(w.last - w.first + 1 for w in timed) * batch_size / sum(w.seconds for w in timed)


# --- model FLOPs utilisation ----------------------------------------------------------------------


def count_train_flops(args: argparse.Namespace, work: Path, pooling: str = "cls") -> int:
    """FLOPs of one forward and backward of one training batch (both towers and the loss), by FlopCounterMode.

    Model and batch live on the meta device, where only shapes flow: a ViT-B/16 batch of 256 is
    counted in a second on any machine, and attention counts as its two matrix products whichever
    kernel a device would run (torch's fused CPU attention has no FLOP formula and would count as 0).
    FlopCounterMode counts matrix products and convolutions, which the poolers ``cls``, ``avg`` and
    ``ggem`` leave the same (GGeM, elementwise only, also switches autocast off, which the meta
    device does not support), so the ``cls`` count is every one's.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmggem.config import load_config
    from mmggem.loss import build_loss
    from mmggem.model import get_tokenizer
    from mmggem.train import build_model

    cfg = load_config(write_config(args, work / f"flops-{pooling}", pooling))
    with torch.device("meta"):
        model = build_model(cfg)
    size = model.visual.image_size[0]
    images = torch.empty(args.batch_size, 3, size, size, device="meta")
    texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(args.batch_size)]).to("meta")
    counter = FlopCounterMode(display=False)
    with counter:
        build_loss(cfg.train.loss)(*model(images, texts)).backward()
    return counter.get_total_flops()


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device``, so that the host's clock times it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def matmul_rate(device: str, precision: str, size: int, rounds: int = 5, per_round: int = 2) -> float:
    """FLOP/s of ``size``-square matrix products of random ``precision`` matrices: the best of ``rounds``."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))
    out = torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * per_round / best


def table_peak(device_name: str, kind: str) -> tuple[str, float] | None:
    """The chip and its dense ``kind`` peak FLOP/s for a CUDA device name, from PEAK_TFLOPS; None if absent."""
    for pattern, chip, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name.lower()):
            return chip, peaks[kind] * 1e12
    return None


def cuda_peak(precision: str) -> Peak:
    """This GPU's datasheet peak (bf16, or TF32 for fp32), else a measured 8192-square matrix product."""
    import torch

    name, kind = torch.cuda.get_device_name(), "bf16" if precision == "bf16" else "tf32"
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as both trainers have it
    try:
        measured = matmul_rate("cuda", precision, 8192, per_round=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.cuda.empty_cache()
    what = f"an 8192-square {kind} matrix product measured on the GPU, {format_rate(measured)}"
    found = table_peak(name, kind)
    if found is None:
        return Peak(measured, f"{what} ({name!r} is not in the datasheet table)")
    chip, flops = found
    return Peak(flops, f"datasheet dense {kind} peak of the {chip} ({name!r}); {what}")


def cpu_peak(precision: str, threads: int) -> Peak:
    """The rate of a 2048-square matrix product on this machine's CPU with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    return Peak(matmul_rate("cpu", precision, 2048),
                f"a 2048-square {precision} matrix product measured on this machine, {threads} threads")


def device_peak(args: argparse.Namespace) -> Peak:
    return cuda_peak(args.precision) if args.device == "cuda" else cpu_peak(args.precision, args.threads)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU count; fails at start if ``--device cuda`` finds no GPU."""
    import torch

    if device == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.cuda.get_device_name()


def format_rate(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


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
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=MMGGEM_PRECISION[args.precision])
    runners = {}
    for pooling in poolings:
        cfg = load_config(write_config(args, work / f"paired-{pooling}", pooling))
        torch.manual_seed(0)
        model = build_model(cfg).to(accelerator.device)
        optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas),
                                    cfg.train.adam_eps, cfg.train.pool_p_lr_mult)
        runners[pooling] = (model, optimizer, build_loss("clip"))
    size = model.visual.image_size[0]
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    images = images.to(accelerator.device)
    texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(args.batch_size)]).to(accelerator.device)

    def one_step(pooling: str) -> float:
        model, optimizer, loss_fn = runners[pooling]
        synchronize(args.device)
        start = time.perf_counter()
        train_step(model, loss_fn, accelerator, images, texts, accum_steps=1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(args.device)
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
    passes; what ``model.compile=true`` does for the whole model), on ``--device`` under ``--precision``.
    """
    import torch

    from mmggem import create_model

    torch.set_num_threads(args.threads)
    tower = create_model(args.model, pooling="ggem").visual.to(args.device)
    tokens, width = tower.grid_size[0] * tower.grid_size[1], tower.positional_embedding.shape[-1]
    x = torch.randn(args.batch_size, tokens, width, device=args.device, requires_grad=True)
    poolers = {"avg": create_model(args.model, pooling="avg").visual.pooler.to(args.device), "ggem": tower.pooler,
               "ggem-compiled": torch.compile(tower.pooler)}
    medians = {}
    for name, pooler in poolers.items():
        times = []
        for _ in range(repeats + 10):  # the first ten (and torch.compile's compilation) are left out
            synchronize(args.device)
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                pooled = pooler(x)
            pooled.float().sum().backward()
            synchronize(args.device)
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


def describe(rates: list[float], flops_per_sample: float, peak: Peak) -> str:
    """The best rate, which is the figure compared, with its MFU, and every run's, which shows the noise."""
    best = max(rates)
    return (f"{best:8.1f} samples/s, MFU {100 * best * flops_per_sample / peak.flops:5.1f}% "
            f"(runs: {', '.join(f'{r:.1f}' for r in rates)})")


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
    device = device_name(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=args.work_dir) as tmp:
        work = Path(tmp)
        if args.shards is None:
            # one epoch covers every step, whatever part of a batch each worker's shards leave over
            samples = (args.steps + args.log_every + args.workers) * args.batch_size
            size = model_image_size(args.model)
            print(f"writing {samples} synthetic {size}x{size} samples to {work / 'shards'}", flush=True)
            args.shards = write_synthetic_shards(work / "shards", samples, per_shard=1000, size=size)
        available = shard_sample_count(args.shards)
        if available < args.steps * args.batch_size:
            raise SystemExit(f"{args.shards} holds {available} samples; {args.steps} steps of "
                             f"{args.batch_size} need {args.steps * args.batch_size} in one epoch")
        flops = count_train_flops(args, work) / args.batch_size  # per sample
        peak = device_peak(args)
        print(f"model FLOPs per sample, forward and backward: {flops / 1e9:.3f} G; "
              f"peak {format_rate(peak.flops)}: {peak.source}", flush=True)
        print(f"load average before: {load_average()} on {os.cpu_count()} CPUs; device {device}", flush=True)

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
    print(f"\n{args.model}, batch {args.batch_size}, {args.precision}, {device}, {args.threads} threads, "
          f"{args.workers} worker(s), {args.steps} steps, steady state over steps {args.warmup + 1}..{args.steps}, "
          f"best of {args.repeats}; shards {args.shards}; load average after: {load_average()}")
    print(f"model FLOPs (torch FlopCounterMode, forward and backward of one batch of {args.batch_size}, image and "
          f"text towers and loss): {flops * args.batch_size / 1e9:.1f} GFLOP per step, {flops / 1e9:.3f} GFLOP "
          f"per sample")
    print(f"peak for MFU: {format_rate(peak.flops)}, {peak.source}; "
          f"arithmetic limit {peak.flops / flops:.1f} samples/s")
    best = {name: max(rates) for name, rates in {**trainers, **poolings}.items()}
    if trainers:
        print(f"mmggem train (cls):        {describe(trainers['mmggem'], flops, peak)}")
        print(f"open_clip_train (cls):     {describe(trainers['open_clip_train'], flops, peak)}")
        print(f"ratio mmggem / open_clip:  {best['mmggem'] / best['open_clip_train']:8.3f}")
    print(f"mmggem train (avg):        {describe(poolings['mmggem-avg'], flops, peak)}")
    print(f"mmggem train (ggem):       {describe(poolings['mmggem-ggem'], flops, peak)}")
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
