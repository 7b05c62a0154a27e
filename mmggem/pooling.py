"""Token poolers for the image tower: cls, avg, max, gem, ggem and attn.

Every pooler maps the tokens it is given, a ``[B, N, C]`` tensor, to one vector
per image, ``[B, C]``. The image tower decides which tokens a pooler receives:
the class token alone for ``cls`` (``uses_class_token = True``), the patch
tokens for all others.

The contribution studied here is Group Generalized Mean pooling (GGeM; Ko et
al., "Group Generalized Mean Pooling for Vision Transformer", arXiv 2212.04114).
GGeM splits the C channels into G contiguous groups, one per attention head by
default, and gives each group its own learnable exponent of a generalized mean
(GeM; Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
Annotation", TPAMI 2018). For channel c in group g:

    y[b, c] = ( 1/N * sum_n max(x[b, n, c], eps) ^ p_g ) ^ (1 / p_g)

p_g = 1 is the mean of the clamped tokens, p_g -> infinity their maximum; G = 1
is GeM and G = C is a per-channel GeM. Negative activations, which the paper
does not discuss, are clamped to ``eps`` as GeM does.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError

POOLER_NAMES = ("cls", "avg", "max", "gem", "ggem", "attn")


def _check_p_init(p_init: float) -> None:
    if not p_init > 0:
        raise UserError(f"p_init must be a positive number (p is clamped to >= 1 in forward), got {p_init!r}")


class ClassTokenPool(nn.Module):
    """The class token itself (open_clip's ``pool_type="tok"``); receives ``[B, 1, C]``."""

    uses_class_token = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


class AvgPool(nn.Module):
    """Mean of the patch tokens (open_clip's ``pool_type="avg"``)."""

    uses_class_token = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.mean(dim=1)


class MaxPool(nn.Module):
    """Channel-wise maximum over the patch tokens."""

    uses_class_token = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.amax(dim=1)


class GeM(nn.Module):
    """Generalized mean with one learnable exponent shared by all channels.

    ``y = (mean_n max(x, eps)^p)^(1/p)`` (Radenovic et al., Eq. 2), computed in
    float32 and cast back to the input dtype. Kept as the direct power-mean so
    that it doubles as an independent reference for :class:`GGeM` with G = 1.
    """

    uses_class_token = False

    def __init__(self, p_init: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        _check_p_init(p_init)
        self.p = nn.Parameter(torch.tensor(float(p_init)))
        self.eps = eps

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            p = self.p.float().clamp(min=1.0)
            pooled = tokens.float().clamp(min=self.eps).pow(p).mean(dim=1).pow(1.0 / p)
        return pooled.to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class GGeM(nn.Module):
    """Group Generalized Mean pooling (Ko et al., arXiv 2212.04114).

    Channels are split into ``groups`` contiguous groups of ``dim // groups``
    channels; group g pools its channels with its own exponent ``p[g]``
    (see the module docstring for the equation). The exponents live in the
    parameter ``p`` of shape ``[groups]`` and are clamped to >= 1 in forward.

    The mean of powers is evaluated in log space,
    ``(mean_n x^p)^(1/p) = exp((logsumexp_n(p * log x) - log N) / p)``,
    which is the same quantity but cannot overflow float32 when p is large,
    and always in float32, whatever autocast is active, then cast back.
    """

    uses_class_token = False

    def __init__(self, dim: int, groups: int, p_init: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if groups < 1 or dim % groups != 0:
            divisors = [g for g in range(1, dim + 1) if dim % g == 0]
            raise UserError(
                f"GGeM needs dim divisible by groups: dim={dim}, groups={groups}; valid groups: {divisors}"
            )
        _check_p_init(p_init)
        self.dim = dim
        self.groups = groups
        self.eps = eps
        self.p = nn.Parameter(torch.full((groups,), float(p_init)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        if dim != self.dim:
            raise ValueError(f"GGeM built for {self.dim} channels got tokens with {dim}")
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            p = self.p.float().clamp(min=1.0).view(1, 1, self.groups, 1)
            log_x = tokens.float().clamp(min=self.eps).log().view(batch, num_tokens, self.groups, -1)
            log_mean = torch.logsumexp(p * log_x, dim=1) - math.log(num_tokens)
            pooled = torch.exp(log_mean / p.view(1, self.groups, 1))
        return pooled.reshape(batch, dim).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, eps={self.eps}"


class AttentionPool(nn.Module):
    """Attentional pooling with one learned query (SigLIP's MAP head).

    A learned probe attends over the patch tokens (multi-head attention), and
    the result passes through a residual LayerNorm + MLP block, as in
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023).
    """

    uses_class_token = False

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.probe.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        pooled, _ = self.attn(query, tokens, tokens, need_weights=False)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


def _build_ggem(dim: int, heads: int, groups: int | None = None, **kwargs: Any) -> GGeM:
    return GGeM(dim, groups=heads if groups is None else groups, **kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cls": lambda dim, heads: ClassTokenPool(),
    "avg": lambda dim, heads: AvgPool(),
    "max": lambda dim, heads: MaxPool(),
    "gem": lambda dim, heads, **kwargs: GeM(**kwargs),
    "ggem": _build_ggem,
    "attn": lambda dim, heads, **kwargs: AttentionPool(dim, heads, **kwargs),
}


def build_pooler(name: str, dim: int, heads: int, **kwargs: Any) -> nn.Module:
    """Build the pooler called ``name`` for tokens of ``dim`` channels.

    ``heads`` is the number of attention heads of the tower: GGeM's default
    group count and the attention pooler's default head count. ``kwargs`` go to
    the pooler (``groups``, ``p_init``, ``eps`` for ggem; ``p_init``, ``eps``
    for gem; ``mlp_ratio`` for attn).
    """
    if name not in _BUILDERS:
        raise UserError(f"unknown pooling {name!r}; valid choices: {', '.join(POOLER_NAMES)}")
    try:
        return _BUILDERS[name](dim, heads, **kwargs)
    except TypeError as error:
        raise UserError(f"invalid options for pooling {name!r}: {kwargs} ({error})") from error
