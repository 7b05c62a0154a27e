"""One process of the 2-process loss test (run by tests/test_loss.py under torchrun).

A tiny two-tower model (a linear layer per tower, a learned logit scale and,
for SigLIP, a learned bias) is trained for one step on a fixed global batch.
:func:`run_case` does the step for one (loss, micro-batches) case on this
process's share of the batch, wrapped in DDP when a process group exists, and
returns the loss, the parameter gradients after DDP's averaging and the
gradients of the features. The test calls the same function with no process
group on the whole batch as the reference.

Usage: ``torchrun --nproc_per_node 2 tests/dist_loss_worker.py OUT_DIR``
writes ``OUT_DIR/rank{r}.pt``: ``{case: run_case(...)}``.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mmggem.train.loss import ClipLoss, SigLipLoss, micro_batch_loss

GLOBAL_ROWS = 12  # divisible by world size 2 x 2 micro-batches
LOSSES = {
    "clip": ClipLoss,
    "clip_local": partial(ClipLoss, local_loss=True),
    "siglip": SigLipLoss,
}
# (loss, micro-batches per optimizer step) run by each worker.
CASES = [
    ("clip", 1),
    ("clip_local", 1),
    ("siglip", 1),
    ("clip", 2),
    ("clip_local", 2),
    ("siglip", 2),
]


class TwoTowers(nn.Module):
    """Linear image and text towers returning normalised features and the scalars."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if with_bias else None

    def forward(self, images: Tensor, texts: Tensor) -> tuple[Tensor, ...]:
        scalars = (self.logit_scale.exp(),) if self.logit_bias is None else (self.logit_scale.exp(), self.logit_bias)
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1), *scalars


def global_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_ROWS, 6, generator=generator), torch.randn(GLOBAL_ROWS, 5, generator=generator)


def run_case(loss_name: str, micro_batches: int) -> dict[str, Tensor | dict[str, Tensor]]:
    """One optimizer step's backward for this process's rows; see the module docstring."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = TwoTowers(with_bias=loss_name.startswith("siglip"))
    net = DistributedDataParallel(model) if world > 1 else model
    loss_fn = LOSSES[loss_name]()
    images, texts = global_batch()
    rows = GLOBAL_ROWS // world
    micro = rows // micro_batches
    images, texts = images[rank * rows : (rank + 1) * rows], texts[rank * rows : (rank + 1) * rows]
    micro_images, micro_texts = images.split(micro), texts.split(micro)

    with torch.no_grad():
        cache = [net(i, t) for i, t in zip(micro_images, micro_texts)]
    cached_image, cached_text = [c[0] for c in cache], [c[1] for c in cache]
    for j in range(micro_batches):
        with nullcontext() if world == 1 or j == micro_batches - 1 else net.no_sync():
            image, text, *scalars = net(micro_images[j], micro_texts[j])
            image.retain_grad()
            text.retain_grad()
            loss = micro_batch_loss(loss_fn, cached_image, cached_text, j, image, text, *scalars)
            loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        # Meaningful with one micro-batch, where they cover all local rows.
        "image_grad": image.grad.clone(),
        "text_grad": text.grad.clone(),
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {f"{name}/{k}": run_case(name, k) for name, k in CASES}
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
