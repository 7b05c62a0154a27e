"""The poolers alone: forward and backward of ``avg``, ``ggem`` and ``ggem`` under torch.compile.

On the patch tokens of one batch of ``--model`` (random, of the tower's token count and width), on
``--device`` under ``--precision``: this bounds what the pooling can add to a training step.
torch.compile fuses GGeM's dozen elementwise passes (what ``model.compile=true`` does for the whole
model). Each figure is the median of ``--repeats`` timings after ten left out (with the compilation).

    python launch/bench/bench_ggem_pooler.py --batch-size 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import MMGGEM_PRECISION, device_name, seconds  # noqa: E402


def pooler_times(model: str, batch_size: int, device: str, precision: str, repeats: int) -> dict[str, float]:
    """Median seconds of each pooler's forward and backward on one batch of ``model``'s patch tokens."""
    import torch

    from mmggem import create_model

    tower = create_model(model, pooling="ggem").visual.to(device)
    tokens, width = tower.grid_size[0] * tower.grid_size[1], tower.positional_embedding.shape[-1]
    x = torch.randn(batch_size, tokens, width, device=device, requires_grad=True)
    poolers = {"avg": create_model(model, pooling="avg").visual.pooler.to(device), "ggem": tower.pooler,
               "ggem-compiled": torch.compile(tower.pooler)}

    def forward_backward(pooler: torch.nn.Module) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pooled = pooler(x)
        pooled.float().sum().backward()

    return {name: statistics.median([seconds(lambda: forward_backward(pooler), device)
                                     for _ in range(repeats + 10)][10:]) for name, pooler in poolers.items()}


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-Ti-4-32", help="an mmggem or open_clip model config")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=tuple(MMGGEM_PRECISION), default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=200, help="timed forward and backward passes per pooler")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = pooler_times(args.model, args.batch_size, args.device, args.precision, args.repeats)
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {device_name(args.device)}, "
          f"{args.threads} threads")
    print(f"pooler forward+backward avg / ggem / ggem compiled: {1e3 * times['avg']:.2f} / {1e3 * times['ggem']:.2f} "
          f"/ {1e3 * times['ggem-compiled']:.2f} ms (median); eager ggem adds {1e3 * (times['ggem'] - times['avg']):.2f} ms")


if __name__ == "__main__":
    main()
