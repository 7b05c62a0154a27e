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
is GeM and G = C is a per-channel GeM.

Two choices are mmggem's own, since the paper's public text (its abstract) does
not fix them:

- Negative activations are clamped to ``eps`` as GeM does (``negatives="clamp"``,
  the default), or kept with their sign (``negatives="signed"``): the signed
  power mean ``y = s * |m|^(1/p)`` of ``m = 1/N * sum_n sign(x) max(|x|, eps)^p``,
  with ``s = sign(m)`` and zeros counted as positive, which is the plain mean at
  p = 1 and tends to the entry of largest magnitude, sign included, as p grows.
- The exponents are bounded below by 1 by projection: the optimizer step is
  followed by ``p.clamp_(min=1)`` (:func:`project_exponents`, hooked on by
  :func:`mmggem.train.optim.build_optimizer`). The forward pass itself never cuts the
  gradient, so an exponent sitting at 1 rises as soon as its gradient asks.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from timm.layers import AttentionPoolLatent
from torch import nn

from ..errors import UserError

POOLER_NAMES = ("cls", "avg", "max", "gem", "ggem", "attn")
NEGATIVES = ("clamp", "signed")
P_MIN = 1.0  # the lower bound of every learnable exponent


def _check_options(p_init: float, negatives: str) -> None:
    if not p_init > 0:
        raise UserError(f"p_init must be a positive number (p starts at max(p_init, {P_MIN})), got {p_init!r}")
    if negatives not in NEGATIVES:
        raise UserError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")


def _bounded(p: torch.Tensor) -> torch.Tensor:
    """``max(p, P_MIN)`` in value with the gradient of ``p`` itself.

    After :func:`project_exponents` p is never below the bound, so this only
    guards exponents written by hand; unlike ``clamp`` it passes the gradient
    at ``p == P_MIN``, where ``clamp``'s is zero.
    """
    return p + (p.clamp(min=P_MIN) - p).detach()


class _Exponent(nn.Module):
    """Shared by GeM and GGeM: the parameter ``p``, its bound, and old checkpoints.

    A checkpoint from before the projection may hold exponents below 1, which
    the forward pass of that time clamped to 1; loading clamps them the same
    way, so the loaded model computes what the saved one did and logs its real p.
    """

    def _init_exponent(self, shape: tuple[int, ...], p_init: float, eps: float, negatives: str) -> None:
        """``p`` starts at ``max(p_init, P_MIN)``: a ``p_init`` below the bound, which configs and saved
        models from before the projection may hold, starts where their forward pass put it."""
        _check_options(p_init, negatives)
        self.p = nn.Parameter(torch.full(shape, max(float(p_init), P_MIN)))
        self.eps = eps
        self.negatives = negatives

    def project_(self) -> None:
        """Put ``p`` back within its bound (in place; a DTensor shard works the same)."""
        with torch.no_grad():
            self.p.clamp_(min=P_MIN)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "p"
        if key in state_dict:
            state_dict[key] = state_dict[key].clamp(min=P_MIN)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, negatives={self.negatives}"


def project_exponents(model: nn.Module) -> None:
    """Project the exponent of every GeM/GGeM pooler in ``model`` back to ``p >= P_MIN``."""
    for module in model.modules():
        if isinstance(module, _Exponent):
            module.project_()


def power_mean(x: torch.Tensor, p: torch.Tensor, eps: float, negatives: str) -> torch.Tensor:
    """The generalized (power) mean over tokens of ``x`` ``[B, N, G, C/G]``, exponent ``p`` ``[1, 1, G, 1]``.

    Returns ``[B, G, C/G]``. Shared by :class:`GeM` (G = 1) and :class:`GGeM`. Evaluated in log space,
    ``(mean_n x^p)^(1/p) = exp((logsumexp_n(p * log x) - log N) / p)``: the same quantity, but neither
    ``x^p`` of a token at ``eps`` underflows to 0 nor that of a large activation overflows to inf
    for a large p. ``negatives="signed"`` sums the positive and negative tokens apart in log space
    (:func:`_signed_power_mean`).
    """
    if negatives == "signed":
        return _signed_power_mean(x, p, eps)
    log_mean = torch.logsumexp(p * x.clamp(min=eps).log(), dim=1) - math.log(x.shape[1])
    return torch.exp(log_mean / p.squeeze(1))


def _signed_power_mean(x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
    """The signed power mean of ``x`` ``[B, N, G, C/G]`` over N, in log space.

    ``sum_n sign(x)|x|^p = e^L * d`` with L the larger of the two log-sums
    (positive and negative tokens) and ``d = e^(L+ - L) - e^(L- - L)`` in
    [-1, 1]; then ``y = sign(d) * exp((L - log N + log|d|) / p)``. ``log|d|`` is
    floored at ``p log eps`` (``|d| >= eps^p`` relative to the larger sum, taken in log
    space because ``eps^p`` is 0 in float32 from p = 7.5) so that an exact
    cancellation gives about 0 with a finite gradient.
    """
    log_abs = p * x.abs().clamp(min=eps).log()
    none = torch.full_like(log_abs, -math.inf)
    log_pos = torch.logsumexp(torch.where(x >= 0, log_abs, none), dim=1)
    log_neg = torch.logsumexp(torch.where(x >= 0, none, log_abs), dim=1)
    largest = torch.maximum(log_pos, log_neg)
    diff = torch.exp(log_pos - largest) - torch.exp(log_neg - largest)
    p = p.squeeze(1)
    log_diff = diff.abs().clamp(min=torch.finfo(diff.dtype).tiny).log()  # finite, so its gradient is too
    log_mean = largest - math.log(x.shape[1]) + torch.maximum(log_diff, p.detach() * math.log(eps))
    return diff.sign() * torch.exp(log_mean / p)


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


class GeM(_Exponent):
    """Generalized mean (GeM) with one learnable exponent shared by all channels.

    Radenović, Tolias and Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation"
    (TPAMI 2018), Eq. 2: ``y_c = (1/N * sum_n x_{n,c}^p)^(1/p)`` over the N tokens, with
    ``x`` clamped to ``eps`` (or its signed form, module docstring). Evaluated in log space by
    :func:`power_mean`, the same code as :class:`GGeM` (GeM is GGeM with one group), so that a
    large p neither underflows tokens at ``eps`` to 0 (a nan gradient) nor overflows large
    activations to inf; in float32 whatever autocast is active, cast back to the input dtype.
    """

    uses_class_token = False

    def __init__(self, p_init: float = 3.0, eps: float = 1e-6, negatives: str = "clamp") -> None:
        super().__init__()
        self._init_exponent((), p_init, eps, negatives)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            p = _bounded(self.p.float()).view(1, 1, 1, 1)
            pooled = power_mean(tokens.float().unsqueeze(2), p, self.eps, self.negatives)
        return pooled.squeeze(1).to(tokens.dtype)


class GGeM(_Exponent):
    """Group Generalized Mean pooling (Ko et al., arXiv 2212.04114).

    Channels are split into ``groups`` contiguous groups of ``dim // groups``
    channels; group g pools its channels with its own exponent ``p[g]``
    (see the module docstring for the equation). The exponents live in the
    parameter ``p`` of shape ``[groups]``, bounded below by 1 (module docstring).

    The mean of powers is evaluated in log space by :func:`power_mean` (shared
    with :class:`GeM`), always in float32 whatever autocast is active, then cast back.
    """

    uses_class_token = False

    def __init__(self, dim: int, groups: int, p_init: float = 3.0, eps: float = 1e-6,
                 negatives: str = "clamp") -> None:
        super().__init__()
        if groups < 1 or dim % groups != 0:
            divisors = [g for g in range(1, dim + 1) if dim % g == 0]
            raise UserError(
                f"GGeM needs dim divisible by groups: dim={dim}, groups={groups}; valid groups: {divisors}"
            )
        self.dim = dim
        self.groups = groups
        self._init_exponent((groups,), p_init, eps, negatives)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, dim = tokens.shape
        if dim != self.dim:
            raise ValueError(f"GGeM built for {self.dim} channels got tokens with {dim}")
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            p = _bounded(self.p.float()).view(1, 1, self.groups, 1)
            pooled = power_mean(tokens.float().view(batch, num_tokens, self.groups, -1), p, self.eps, self.negatives)
        return pooled.reshape(batch, dim).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, {super().extra_repr()}"


class AttentionPool(AttentionPoolLatent):
    """Attentional pooling with one learned query (SigLIP's MAP head), as timm builds it.

    A learned latent query attends over the patch tokens (multi-head attention), and
    the result passes through a residual LayerNorm + MLP block, as in
    Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023). timm's
    ``AttentionPoolLatent`` computes exactly this with a LayerNorm as its ``norm_layer``.

    Models saved before mmggem used timm here hold torch ``nn.MultiheadAttention`` keys
    (``probe``, ``attn.in_proj_*``, ``attn.out_proj.*``, ``mlp.0/2.*``); they load into
    this module unchanged in meaning (:func:`_from_multihead_attention_keys`).
    """

    uses_class_token = False

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(dim, num_heads=heads, mlp_ratio=mlp_ratio, norm_layer=nn.LayerNorm)
        self.register_load_state_dict_pre_hook(_from_multihead_attention_keys)


_RENAMED = {"probe": "latent", "attn.out_proj.weight": "proj.weight", "attn.out_proj.bias": "proj.bias",
            "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
            "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias"}


def _from_multihead_attention_keys(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                                   *args: Any) -> None:
    """Rewrite an older AttentionPool's keys in place: nn.MultiheadAttention's packed q/k/v split into q and kv."""
    for old, new in _RENAMED.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    for kind in ("weight", "bias"):
        packed = state_dict.pop(f"{prefix}attn.in_proj_{kind}", None)
        if packed is not None:
            dim = packed.shape[0] // 3
            state_dict[f"{prefix}q.{kind}"], state_dict[f"{prefix}kv.{kind}"] = packed[:dim], packed[dim:]


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
    the pooler (``groups``, ``p_init``, ``eps``, ``negatives`` for ggem; ``p_init``,
    ``eps``, ``negatives`` for gem; ``mlp_ratio`` for attn; none for cls, avg and max).
    """
    if name not in _BUILDERS:
        raise UserError(f"unknown pooling {name!r}; valid choices: {', '.join(POOLER_NAMES)}")
    try:
        return _BUILDERS[name](dim, heads, **kwargs)
    except TypeError as error:
        raise UserError(f"invalid options for pooling {name!r}: {kwargs} ({error})") from error


def check_pooler_options(name: str, options: dict[str, Any]) -> None:
    """Raise :class:`UserError` if ``options`` are not valid for the pooler ``name``.

    The pooler is built once on a tiny token width (a multiple of ``groups``), so a misspelt option or a
    bad value fails when the config is read, not after a model is built or, in an ablation, after hours
    of other runs. Whether ``groups`` divides the real width is checked when the model is built.
    """
    groups = options.get("groups", 1)
    with torch.random.fork_rng(devices=[]):  # reading a config must not move the seeded random stream
        build_pooler(name, 8 * groups if isinstance(groups, int) and groups > 0 else 8, 1, **options)
