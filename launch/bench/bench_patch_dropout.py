"""Training step time with FLIP patch dropout (``model.patch_dropout``) against none, in one run.

For each model (the demo's ViT-Ti-4-28 at the demo's batch size, and ViT-B-16), two models are built
from the same run config, one with ``model.patch_dropout=--dropout`` and one without, and mmggem's
training step (``mmggem.train.loop.train_step``: forward and backward of both towers and the loss, then
gradient clipping and the AdamW step) is timed on one fixed batch of random images and captions,
the two models in alternation (ABBA order, so both see the same momentary load of the machine).
The figure compared is the median of the paired ratios, with a bootstrap 95% interval. The rate of
an fp32 2048-square matrix product on this machine, with the same threads, is printed beside it:
the machine rate to quote with CPU figures.

    python launch/bench/bench_patch_dropout.py
    python launch/bench/bench_patch_dropout.py --pairs 10 --vit-batch-size 16 --threads 2

Patch dropout drops tokens before the image tower's first block, so the image tower's cost falls
roughly in proportion to the tokens kept (attention faster still); the text tower, the loss and
the optimizer step cost the same, which bounds the whole step's speed-up.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mfu import matmul_rate  # noqa: E402
from benchlib import median_with_interval  # noqa: E402

from mmggem.config.run import RunConfig, load_config  # noqa: E402
from mmggem.train.loss import build_loss  # noqa: E402
from mmggem.model.clip import get_tokenizer  # noqa: E402
from mmggem.config.model import model_from_config  # noqa: E402
from mmggem.train.optim import build_optimizer  # noqa: E402
from mmggem.train.step import train_step  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dropout", type=float, default=0.5, help="model.patch_dropout compared with 0")
    parser.add_argument("--pairs", type=int, default=6, help="timed ABBA pairs per model, after 2 warm-up pairs")
    parser.add_argument("--demo-batch-size", type=int, default=128, help="the demo recipe's batch size")
    parser.add_argument("--vit-batch-size", type=int, default=8, help="ViT-B-16 batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def fixed_batch_step(accelerator: Accelerator, cfg: RunConfig,
                     batch_size: int) -> tuple[torch.nn.Module, Callable[[torch.Tensor], float]]:
    """The model of ``cfg`` and a function timing one training step of it on ``batch_size`` fixed random
    images and the token batch it is given."""
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas),
                                cfg.train.adam_eps, cfg.train.pool_p_lr_mult)
    loss_fn = build_loss("clip")
    size = model.visual.image_size[0]
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    def one_step(texts: torch.Tensor) -> float:
        start = time.perf_counter()
        train_step(model, loss_fn, accelerator, images, texts, accum_steps=1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return model, one_step


def step_runner(accelerator: Accelerator, model_name: str, dropout: float, batch_size: int) -> Callable[[], float]:
    """A function timing one training step of ``model_name`` with ``dropout`` on a fixed random batch."""
    cfg = load_config(DEMO_CONFIG, [f"model.name={model_name}", f"model.patch_dropout={dropout}"])
    model, one_step = fixed_batch_step(accelerator, cfg, batch_size)
    texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(batch_size)])
    return lambda: one_step(texts)


def compare(accelerator: Accelerator, model_name: str, dropout: float, batch_size: int, pairs: int) -> str:
    """One Markdown row: median step time without and with dropout, and the paired speed-up."""
    runners = {0.0: step_runner(accelerator, model_name, 0.0, batch_size),
               dropout: step_runner(accelerator, model_name, dropout, batch_size)}
    order = list(runners)
    times: dict[float, list[float]] = {key: [] for key in order}
    for pair in range(pairs + 2):
        for key in (order if pair % 2 == 0 else order[::-1]):
            seconds = runners[key]()
            if pair >= 2:  # the first two pairs warm up allocators and caches
                times[key].append(seconds)
    ratio, low, high = median_with_interval([a / b for a, b in zip(times[0.0], times[dropout])])
    return (f"| {model_name} | {batch_size} | {statistics.median(times[0.0]) * 1000:.0f} ms | "
            f"{statistics.median(times[dropout]) * 1000:.0f} ms | {ratio:.2f}x ({low:.2f}-{high:.2f}) |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    print(f"fp32 2048-square matmul: {matmul_rate('cpu', 'fp32', 2048) / 1e9:.0f} GFLOP/s "
          f"({args.threads} threads); {args.pairs} ABBA pairs per model", flush=True)
    print(f"| model | batch | step, no dropout | step, patch_dropout={args.dropout} | speed-up (95% CI) |")
    print("|---|---|---|---|---|")
    for model_name, batch_size in (("ViT-Ti-4-28", args.demo_batch_size), ("ViT-B-16", args.vit_batch_size)):
        print(compare(accelerator, model_name, args.dropout, batch_size, args.pairs), flush=True)


if __name__ == "__main__":
    main()
