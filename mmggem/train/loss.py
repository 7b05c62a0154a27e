"""Contrastive losses whose negatives come from every process.

Two image-text losses, both callable on L2-normalised features:

* :class:`ClipLoss`: CLIP's symmetric InfoNCE (Radford et al. 2021, "Learning
  Transferable Visual Models From Natural Language Supervision", Fig. 3):
  the mean of the image->text and text->image cross-entropies over the
  ``N x N`` similarity matrix scaled by the learned temperature.
* :class:`SigLipLoss`: the pairwise sigmoid loss of SigLIP (Zhai et al. 2023,
  "Sigmoid Loss for Language Image Pre-Training", Eq. 1), with a learned
  scale ``t`` and bias ``b``.

Distributed semantics. Under ``torch.distributed`` with ``W`` processes each
holding ``b`` rows (equal on every process), the losses score every row
against the ``N = W * b`` rows of all processes. Gradients flow through the
all-gather, so a loss ``L`` that every process evaluates on the concatenated
batch is reproduced exactly as follows:

* the value: :class:`ClipLoss` returns ``L`` itself on every process; with
  ``local_loss=True`` and for :class:`SigLipLoss` each process returns the
  part of ``L`` owned by its rows, and the mean over processes is ``L``;
* the gradient: each process's backward yields ``W * dL/d(local features)``
  (the all-gather's backward sums the gradients of every copy) and the mean
  over processes of the scalars' gradients is ``dL/d(logit_scale)``, so after
  DDP/FSDP averages parameter gradients over processes they equal ``dL/dθ``
  of one process on the concatenated batch. Nothing has to be scaled.

The learned temperature: pass ``logit_scale = model.logit_scale.exp()``. As in
CLIP and open_clip the log-parameter is clamped after every optimizer step so
that the scale never exceeds 100; see :func:`clamp_logit_scale_`.

Gradient accumulation that still scores every micro-batch against all
accumulated negatives (open_clip's ``--accum-freq``) is done with
:func:`micro_batch_loss`; its docstring gives the training-loop recipe.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "build_loss",
    "clamp_logit_scale_",
    "gather_rows",
    "micro_batch_loss",
]


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every process along dim 0, in rank order.

    Every process must pass the same shape. The gradient of every copy flows
    back to its owner (see the module docstring), which is what makes the
    distributed loss equal to the one-process loss; open_clip's cheaper
    ``gather_with_grad=False`` is not offered, since it gives other gradients.
    A single process (no process group) returns ``x`` unchanged.

    torch's functional all-gather is differentiable with exactly that backward: a
    reduce-scatter summing the copies' gradients (half the bytes of an all-reduce of
    the whole gathered gradient; gloo and NCCL both have it). ``wait()`` makes the
    result a plain tensor before the loss reads it.
    """
    _, world = _rank_and_world()
    if world == 1:
        return x
    return funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD).wait()


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE over the negatives of all processes.

    ``loss(image_features, text_features, logit_scale)`` with features
    ``(b, d)`` already L2-normalised and ``logit_scale`` the exponentiated
    temperature (a scalar tensor). Row ``i`` of the images pairs with row
    ``i`` of the texts; every other row of every process is a negative.

    Args:
        local_loss: open_clip's memory saver (``train.local_loss``): each
            process scores only its own ``b`` rows against the ``N`` gathered
            rows (``b x N`` instead of ``N x N`` logits, labels offset by
            ``rank * b``) and returns the mean over those rows; the mean of the
            returned values over processes is the full loss. The gradients are
            the same as without it.

    The target indices are kept between calls of the same shape and device.
    """

    def __init__(self, local_loss: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def _targets(self, device: torch.device, rows: int, offset: int) -> Tensor:
        key = (device, rows, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(offset, offset + rows, device=device)
        return self._labels[key]

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        all_images = gather_rows(image_features)
        all_texts = gather_rows(text_features)
        if self.local_loss:
            rank, _ = _rank_and_world()
            rows = image_features.shape[0]
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
            labels = self._targets(image_features.device, rows, rank * rows)
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T
            logits_per_text = logits_per_image.T
            labels = self._targets(image_features.device, all_images.shape[0], 0)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss over the negatives of all processes.

    ``loss(image_features, text_features, logit_scale, logit_bias)`` computes,
    for the local images ``x_i`` against the texts ``y_j`` of every process,
    ``-1/b * sum_ij log sigmoid(z_ij * (t * x_i . y_j + bias))`` with
    ``z_ij = 1`` for the matching pair and ``-1`` otherwise (SigLIP Eq. 1,
    normalised by the local batch size as in the paper's Algorithm 1).

    open_clip passes the texts around a ring of neighbour exchanges; here the
    texts are all-gathered with gradient instead, which scores the same pairs:
    the mean over processes of the returned values equals the loss of one
    process on the concatenated batch, and DDP-averaged gradients equal that
    process's gradients. SigLIP initialises ``log t = log 10`` and
    ``bias = -10``; ``logit_scale`` here is ``t`` (already exponentiated).
    """

    def __init__(self) -> None:
        super().__init__()
        self._labels: dict[tuple[torch.device, torch.dtype, int, int, int], Tensor] = {}

    def _signs(self, like: Tensor, rows: int, cols: int, offset: int) -> Tensor:
        key = (like.device, like.dtype, rows, cols, offset)
        if key not in self._labels:
            signs = -torch.ones(rows, cols, device=like.device, dtype=like.dtype)
            index = torch.arange(rows, device=like.device)
            signs[index, index + offset] = 1
            self._labels[key] = signs
        return self._labels[key]

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        rank, _ = _rank_and_world()
        rows = image_features.shape[0]
        all_texts = gather_rows(text_features)
        logits = logit_scale * image_features @ all_texts.T + logit_bias
        signs = self._signs(logits, rows, all_texts.shape[0], rank * rows)
        return -F.logsigmoid(signs * logits).sum() / rows


_LOSSES: dict[str, type[nn.Module]] = {"clip": ClipLoss, "siglip": SigLipLoss}


def build_loss(name: str, **kwargs: bool) -> nn.Module:
    """The loss called ``name`` (``"clip"`` or ``"siglip"``) built with ``kwargs``."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def micro_batch_loss(
    loss_fn: Callable[..., Tensor],
    cached_image: Sequence[Tensor],
    cached_text: Sequence[Tensor],
    index: int,
    image_features: Tensor,
    text_features: Tensor,
    *scalars: Tensor,
) -> Tensor:
    """Loss of one micro-batch scored against every accumulated micro-batch.

    open_clip's gradient accumulation: first compute the features of all
    ``K`` micro-batches without gradient (``cached_image``, ``cached_text``),
    then for each micro-batch ``index`` recompute its features with gradient
    and call this, which splices them into the cached ones and evaluates
    ``loss_fn(images, texts, *scalars)`` on the whole accumulated batch. Each
    backward adds the part of ``dL/dθ`` that flows through that micro-batch,
    so after the ``K`` backwards the gradients equal those of ``L`` on the
    full ``K``-micro-batch batch (across processes too, see the module
    docstring). The ``scalars`` (``logit_scale``, and ``logit_bias`` for
    SigLIP) get their gradient from the last micro-batch only; otherwise it
    would be counted ``K`` times.

    Training-loop recipe (do NOT divide the loss by ``K``; build the
    Accelerator without ``gradient_accumulation_steps``)::

        with torch.no_grad():
            cache = [model(images[j], texts[j]) for j in range(K)]
        cached_image, cached_text = [c[0] for c in cache], [c[1] for c in cache]
        for j in range(K):              # gradients sync on the last backward only
            with nullcontext() if j == K - 1 else accelerator.no_sync(model):
                image, text, scale = model(images[j], texts[j])
                loss = micro_batch_loss(loss_fn, cached_image, cached_text, j, image, text, scale)
                accelerator.backward(loss)
        optimizer.step()

    The recomputed features must equal the cached ones (no dropout, or the
    same RNG state in both passes).
    """
    if len(cached_image) != len(cached_text) or not 0 <= index < len(cached_image):
        raise ValueError(
            f"micro-batch index {index} needs 0 <= index < {len(cached_image)} and as many "
            f"cached text as image micro-batches (got {len(cached_text)})"
        )
    images = torch.cat([*cached_image[:index], image_features, *cached_image[index + 1 :]])
    texts = torch.cat([*cached_text[:index], text_features, *cached_text[index + 1 :]])
    last = index == len(cached_image) - 1
    return loss_fn(images, texts, *(s if last else s.detach() for s in scalars))


def clamp_logit_scale_(model_or_param: nn.Module | Tensor, max_scale: float = 100.0) -> None:
    """Clamp the log-temperature in place to ``[0, ln(max_scale)]``.

    Call after every optimizer step (as open_clip does), so that
    ``logit_scale.exp()`` stays within ``[1, max_scale]``; CLIP (Sec. 2.5)
    clips it "to prevent scaling the logits by more than 100". Takes the
    parameter itself or a module, in which every parameter named
    ``logit_scale`` (also inside wrappers such as DDP's ``module.``) is
    clamped.
    """
    if isinstance(model_or_param, nn.Module):
        params = [
            p for n, p in model_or_param.named_parameters() if n == "logit_scale" or n.endswith(".logit_scale")
        ]
        if not params:
            raise ValueError(f"{type(model_or_param).__name__} has no parameter named 'logit_scale'")
    else:
        params = [model_or_param]
    with torch.no_grad():
        for p in params:
            p.clamp_(0, math.log(max_scale))
