"""One optimizer step's forward and backward, with open_clip's gradient accumulation scheme.

``train.accum_steps`` micro-batches are each scored against the features of the whole step
(computed once without gradients), so accumulation changes memory use, not the loss.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator

from .loss import micro_batch_loss


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, accelerator: Accelerator,
               images: torch.Tensor, texts: torch.Tensor, accum_steps: int) -> torch.Tensor:
    """Forward and backward of one optimizer step's batch; returns the (detached) loss.

    Nothing here reads a device value: a non-finite loss shows up as a non-finite gradient
    norm afterwards, and the optimizer skips that step on the device (:mod:`mmggem.train.nonfinite`).
    """
    if accum_steps == 1:
        with accelerator.autocast():
            loss = loss_fn(*model(images, texts))
        accelerator.backward(loss)
        return loss.detach()
    image_chunks, text_chunks = images.chunk(accum_steps), texts.chunk(accum_steps)
    with torch.no_grad(), accelerator.autocast():
        cached = [model(i, t) for i, t in zip(image_chunks, text_chunks)]
        cached_images, cached_texts = [c[0] for c in cached], [c[1] for c in cached]
        loss = loss_fn(torch.cat(cached_images), torch.cat(cached_texts), *cached[-1][2:])
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        last = index == accum_steps - 1
        # The backward stays inside no_sync: DDP decides in the forward whether to reduce, but FSDP2
        # reads its flag when the backward runs, so a backward outside would reduce every micro-batch.
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                image_features, text_features, *scalars = model(image_chunk, text_chunk)
                micro_loss = micro_batch_loss(loss_fn, cached_images, cached_texts, index, image_features,
                                              text_features, *scalars)
            accelerator.backward(micro_loss)
    return loss
