"""One optimizer step with gradient accumulation (mmggem.train.step): where each micro-batch's backward runs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from accelerate import Accelerator

import mmggem
from mmggem.model.clip import get_tokenizer
from mmggem.train.loss import build_loss
from mmggem.train.step import train_step


def test_every_micro_batch_but_the_last_runs_its_backward_without_gradient_sync() -> None:
    """FSDP2 reads accelerate's no_sync flag when the backward runs (DDP reads it in the forward): a
    backward outside the context would reduce the gradients of every micro-batch."""
    torch.manual_seed(0)
    model = mmggem.create_model("ViT-Ti-4-28", pooling="ggem")
    accelerator = Accelerator(cpu=True)
    synced: list[bool] = []
    in_no_sync = [False]

    @contextmanager
    def no_sync(_: torch.nn.Module) -> Iterator[None]:
        in_no_sync[0] = True
        try:
            yield
        finally:
            in_no_sync[0] = False

    backward = accelerator.backward
    accelerator.no_sync = no_sync
    accelerator.backward = lambda loss: (synced.append(not in_no_sync[0]), backward(loss))
    images = torch.rand(6, 3, 28, 28)
    texts = get_tokenizer(model)([f"colour {i}" for i in range(6)])
    loss = train_step(model, build_loss("clip"), accelerator, images, texts, accum_steps=3)
    assert torch.isfinite(loss)
    assert synced == [False, False, True]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
