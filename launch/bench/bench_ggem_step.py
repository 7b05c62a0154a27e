"""GGeM's cost per training step, in one process: pooling ``avg`` against ``ggem`` in ABBA-ordered pairs.

Two models are built from the run config of ``bench_train.py`` (pooling avg and ggem, the same seed),
and mmggem's own training step (``mmggem.train.loop.train_step`` for forward and backward, then
``mmggem.train.nonfinite.optimizer_step`` for clipping and the AdamW step) runs on one fixed random batch,
the two models in alternation (ABBA order, so both see the same momentary load of the machine).
The figure is the median of the paired step-time ratios with a bootstrap 95% interval.

    python launch/bench/bench_ggem_step.py --pairs 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    MMGGEM_PRECISION, add_run_arguments, device_name, median_with_interval, seconds, write_config,
)

POOLINGS = ("avg", "ggem")


def step_runners(args: argparse.Namespace, work: Path) -> dict[str, Callable[[], object]]:
    """For each pooling, a function that runs one whole training step of its model on one fixed batch."""
    import torch
    from accelerate import Accelerator

    from mmggem.config.run import load_config
    from mmggem.train.loss import build_loss
    from mmggem.model.clip import get_tokenizer
    from mmggem.config.model import model_from_config
    from mmggem.train.nonfinite import NonFiniteSteps, optimizer_step
    from mmggem.train.optim import build_optimizer
    from mmggem.train.step import train_step

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=MMGGEM_PRECISION[args.precision])
    runners = {}
    for pooling in POOLINGS:
        cfg = load_config(write_config(args, work / f"paired-{pooling}", pooling))
        torch.manual_seed(0)
        model = model_from_config(cfg).to(accelerator.device)
        optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas),
                                    cfg.train.adam_eps, cfg.train.pool_p_lr_mult)
        size = model.visual.image_size[0]
        images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        texts = get_tokenizer(model)([f"a photo of item {i}" for i in range(args.batch_size)])
        batch = images.to(accelerator.device), texts.to(accelerator.device)

        def step(model=model, optimizer=optimizer, batch=batch, loss_fn=build_loss(cfg.train.loss),
                 nonfinite=NonFiniteSteps(accelerator.device), grad_clip=cfg.train.grad_clip) -> None:
            loss = train_step(model, loss_fn, accelerator, *batch, accum_steps=1)
            optimizer_step(accelerator, model, optimizer, nonfinite, grad_clip, step=1, loss=loss)

        runners[pooling] = step
    return runners


def paired_step_times(runners: dict[str, Callable[[], object]], device: str, pairs: int) -> dict[str, list[float]]:
    """Seconds of each runner's step, alternated ABBA for ``pairs`` pairs after three warm-up rounds."""
    names = tuple(runners)
    for name in names * 3:
        runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for pair in range(pairs):
        for name in (names if pair % 2 == 0 else names[::-1]):
            times[name].append(seconds(runners[name], device))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--pairs", type=int, default=60, help="timed ABBA step pairs (default: %(default)s)")
    args = parser.parse_args(argv)
    args.shards = args.shards or "unused"  # the run config needs one; the steps read no data
    with tempfile.TemporaryDirectory(prefix="bench_ggem_step_", dir=args.work_dir) as work:
        times = paired_step_times(step_runners(args, Path(work)), args.device, args.pairs)
    ratio, low, high = median_with_interval([g / a for g, a in zip(times["ggem"], times["avg"])])
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {device_name(args.device)}, "
          f"{args.threads} threads, {args.pairs} ABBA pairs")
    print(f"training step avg / ggem: {1e3 * statistics.median(times['avg']):.1f} / "
          f"{1e3 * statistics.median(times['ggem']):.1f} ms (median)")
    print(f"ggem step-time overhead: {100 * (ratio - 1):+.2f}% (median of {args.pairs} paired ratios; "
          f"95% interval {100 * (low - 1):+.2f}% .. {100 * (high - 1):+.2f}%)")


if __name__ == "__main__":
    main()
