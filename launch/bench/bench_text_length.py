"""Training step time and FLOPs with text batches padded to the context length against trimmed ones.

One model (default ViT-B-16: 77-token context) and one fixed batch of random images with captions
whose token counts follow CC3M's (see :func:`cc3m_like_captions`). mmggem's training step
(``mmggem.train.loop.train_step``: forward and backward of both towers and the loss, then gradient
clipping and the AdamW step) is timed on the padded token batch and on the same batch trimmed by
``mmggem.model.text_length`` (cut to the longest caption, rounded up to a multiple of 8), in alternation
(ABBA order, so both see the same momentary load). The figure compared is the median of the paired
ratios with a bootstrap 95% interval; the fp32 2048-square matmul rate is printed beside it.

It also prints the FLOPs of one step both ways, counted as ``launch/bench/bench_train.py`` counts them
for MFU (torch's ``FlopCounterMode`` on the meta device), and what remains of the text cost after
trimming: the dense gradient of the token embedding (vocabulary x width, whatever the batch) and
its AdamW update, and the final LayerNorm, which ``TrimmableCLIP`` applies to the pooled rows only
(open_clip applies it to every position).

    python launch/bench/bench_text_length.py
    python launch/bench/bench_text_length.py --model ViT-Ti-4-28 --batch-size 128 --pairs 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patch_dropout import DEMO_CONFIG, fixed_batch_step  # noqa: E402
from bench_mfu import matmul_rate  # noqa: E402
from benchlib import median_with_interval  # noqa: E402

from mmggem.config.run import load_config  # noqa: E402
from mmggem.train.loss import build_loss  # noqa: E402
from mmggem.model.clip import get_tokenizer  # noqa: E402
from mmggem.model.text_length import text_trim  # noqa: E402
from mmggem.config.model import model_from_config  # noqa: E402

WORDS = ("a photo of the man woman dog red blue city street beach old young house tree car "
         "at in on with under near small large view young girl boy sitting standing").split()
CC3M_MEAN_TOKENS = 12.0  # CC3M captions: about 10 words, about 12 BPE tokens with start and end of text
CC3M_SIGMA = 0.35  # lognormal spread: 1% of captions are longer than ~26 tokens


def cc3m_like_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` captions of one-token words whose token counts (start and end included) are lognormal
    with mean :data:`CC3M_MEAN_TOKENS`: short on average, with CC3M's long tail."""
    rng = np.random.default_rng(seed)
    mu = np.log(CC3M_MEAN_TOKENS) - CC3M_SIGMA ** 2 / 2
    lengths = np.clip(np.rint(rng.lognormal(mu, CC3M_SIGMA, count)), 3, 77).astype(int)
    return [" ".join(rng.choice(WORDS, size=n - 2)) for n in lengths]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="an mmggem or open_clip model config")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6, help="timed ABBA pairs, after 2 warm-up pairs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def timed(work: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of ``work()`` over ``repeats`` calls after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_flops(model_name: str, batch_size: int, texts: torch.Tensor) -> int:
    """FLOPs of one forward and backward of the batch (both towers and the loss), as bench_train counts them
    (pooling ``cls``: the poolers add no matrix products, and GGeM's autocast switch fails on meta)."""
    with torch.device("meta"):
        model = model_from_config(load_config(DEMO_CONFIG, [f"model.name={model_name}", "model.pooling=cls"]))
    size = model.visual.image_size[0]
    images = torch.empty(batch_size, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        build_loss("clip")(*model(images, texts.to("meta"))).backward()
    return counter.get_total_flops()


def remaining_text_cost(model: torch.nn.Module, texts: torch.Tensor, full_length: int) -> dict[str, float]:
    """Seconds of the text costs trimming leaves: the token embedding's dense gradient (forward and
    backward of the lookup), its fused AdamW update, and the final LayerNorm over every position
    (open_clip's order) against over the pooled rows (mmggem's)."""
    weight = model.token_embedding.weight.detach().clone().requires_grad_(True)
    width = weight.shape[1]
    upstream = torch.randn(*texts.shape, width)

    def lookup() -> None:
        weight.grad = None
        F.embedding(texts, weight).backward(upstream)

    lookup()
    optimizer = torch.optim.AdamW([weight], lr=1e-4, fused=True)
    norm = model.ln_final
    every = torch.randn(len(texts), full_length, width, requires_grad=True)
    pooled = torch.randn(len(texts), width, requires_grad=True)
    return {"embedding gradient": timed(lookup), "embedding AdamW update": timed(optimizer.step),
            "final LayerNorm, every position": timed(lambda: norm(every).sum().backward()),
            "final LayerNorm, pooled rows": timed(lambda: norm(pooled).sum().backward())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    cfg = load_config(DEMO_CONFIG, [f"model.name={args.model}"])
    model, one_step = fixed_batch_step(accelerator, cfg, args.batch_size)
    padded = get_tokenizer(model)(cc3m_like_captions(args.batch_size))
    batches = {"padded": padded, "trimmed": text_trim(model)(padded)}
    needed = (padded != 0).sum(dim=1).float()
    print(f"{args.model}, batch {args.batch_size}, fp32, {args.threads} threads; fp32 2048-square matmul "
          f"{matmul_rate('cpu', 'fp32', 2048) / 1e9:.0f} GFLOP/s; captions {needed.mean():.1f} tokens on average "
          f"(longest {int(needed.max())}): padded to {padded.shape[1]}, trimmed to {batches['trimmed'].shape[1]}",
          flush=True)

    times: dict[str, list[float]] = {name: [] for name in batches}
    for pair in range(args.pairs + 2):
        for name in (list(batches) if pair % 2 == 0 else list(batches)[::-1]):
            seconds = one_step(batches[name])
            if pair >= 2:  # the first two pairs warm up allocators and caches
                times[name].append(seconds)
    ratio, low, high = median_with_interval([p / t for p, t in zip(times["padded"], times["trimmed"])])
    step = {name: statistics.median(values) for name, values in times.items()}
    print(f"training step: padded {1e3 * step['padded']:.0f} ms, trimmed {1e3 * step['trimmed']:.0f} ms (median of "
          f"{args.pairs}); speed-up {ratio:.3f}x (median of paired ratios, bootstrap 95% interval {low:.3f}-{high:.3f})")
    flops = {name: step_flops(args.model, args.batch_size, texts) for name, texts in batches.items()}
    print(f"FLOPs per step (FlopCounterMode, forward and backward): padded {flops['padded'] / 1e9:.1f} G, trimmed "
          f"{flops['trimmed'] / 1e9:.1f} G ({flops['padded'] / flops['trimmed']:.3f}x fewer)")
    for what, seconds in remaining_text_cost(model, batches["trimmed"], padded.shape[1]).items():
        print(f"  {what}: {1e3 * seconds:.2f} ms = {100 * seconds / step['trimmed']:.2f}% of the trimmed step")


if __name__ == "__main__":
    main()
