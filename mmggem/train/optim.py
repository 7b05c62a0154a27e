"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay follows open_clip's rule (no decay on anything with fewer than
two dimensions, on names containing ``bn``, ``ln``, ``bias`` (the SigLIP
``logit_bias`` included) or ``logit_scale``), and also spares the positional
and class embeddings and the pooling exponents ``p`` of GeM/GGeM, which train
with a larger learning rate (the GeM reference code of Radenović et al. 2018
uses 10x and no decay; GGeM, arXiv 2212.04114, has one ``p`` per group).

The optimizer built here projects those exponents back to their lower bound
after every step (:func:`mmggem.model.pooling.project_exponents`), so the bound
never cuts their gradient.

Each group carries ``lr_mult`` and its ``lr`` is set to ``lr * lr_mult`` at
build time, so :func:`cosine_schedule`'s factor gives every group
``lr * lr_mult * factor``.

The schedule always follows the current config: a checkpoint restores its position
only (:class:`WarmupCosineLR`), so a run resumed with a larger ``train.steps`` follows
the longer cosine, as open_clip's trainer recomputes its schedule from its arguments
at resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate import PartialState
from torch import nn

from ..model.pooling import project_exponents

__all__ = ["WarmupCosine", "WarmupCosineLR", "build_optimizer", "cosine_schedule", "param_groups"]

_NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")
_NO_DECAY_SUFFIXES = ("positional_embedding", "class_embedding")


def _is_pool_p(name: str) -> bool:
    """The exponent ``p`` of a pooler, e.g. ``visual.pooler.p`` (or ``module.visual.pooler.p``)."""
    return name == "pooler.p" or name.endswith(".pooler.p")


def _decays(name: str, p: nn.Parameter) -> bool:
    """open_clip's rule plus the embeddings: matrices decay, everything else does not."""
    return not (
        p.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES) or name.endswith(_NO_DECAY_SUFFIXES)
    )


def param_groups(model: nn.Module, weight_decay: float, pool_p_lr_mult: float = 10.0) -> list[dict]:
    """Split the trainable parameters of ``model`` into AdamW groups.

    Returns up to three non-empty groups, each with ``name``, ``params``,
    ``weight_decay`` and ``lr_mult``: ``"decay"`` (``weight_decay``, x1),
    ``"no_decay"`` (0, x1) and ``"pool_p"`` (0, x``pool_p_lr_mult``). Every
    parameter with ``requires_grad`` is in exactly one group; frozen ones are
    left out.
    """
    groups = {
        "decay": {"name": "decay", "params": [], "weight_decay": weight_decay, "lr_mult": 1.0},
        "no_decay": {"name": "no_decay", "params": [], "weight_decay": 0.0, "lr_mult": 1.0},
        "pool_p": {"name": "pool_p", "params": [], "weight_decay": 0.0, "lr_mult": pool_p_lr_mult},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "pool_p" if _is_pool_p(name) else "decay" if _decays(name, p) else "no_decay"
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    pool_p_lr_mult: float = 10.0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, each group's ``lr`` set to ``lr * lr_mult``.

    The defaults are CLIP's (Radford et al. 2021, Sec. 2.5: beta2 0.98, eps 1e-6). The fused
    implementation updates each parameter in one pass over memory; on a CPU it takes about half
    the time of the default loop (the 49k x 128 token embedding of a small text tower dominates).
    """
    groups = param_groups(model, weight_decay, pool_p_lr_mult)
    for group in groups:
        group["lr"] = lr * group["lr_mult"]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    optimizer.register_step_post_hook(lambda *_: project_exponents(model))
    optimizer.register_load_state_dict_post_hook(_follows_config(optimizer))
    return optimizer


_SCHEDULED = ("params", "lr", "initial_lr")  # the parameters, and what the learning-rate schedule sets


def _follows_config(optimizer: torch.optim.Optimizer) -> Callable[[torch.optim.Optimizer], None]:
    """A hook that, after a checkpoint's optimizer state is loaded, puts back each group's settings
    (weight decay, betas, eps, lr multiplier) as the current config built them, naming each change.

    ``Optimizer.load_state_dict`` restores the saved groups' settings with the moments, so a resume
    with another ``train.weight_decay`` or ``train.betas`` would otherwise keep the old ones silently.
    """
    configured = [{k: v for k, v in group.items() if k not in _SCHEDULED} for group in optimizer.param_groups]

    def follow(loaded: torch.optim.Optimizer) -> None:
        changed: set[str] = set()
        for group, settings in zip(loaded.param_groups, configured):
            changed.update(f"{key} {group.get(key)!r} -> {value!r}" for key, value in settings.items()
                           if _plain(group.get(key)) != _plain(value))
            group.update(settings)
        if changed:
            PartialState().print(f"the optimizer follows the config: {', '.join(sorted(changed))}")

    return follow


def _plain(value: Any) -> Any:
    """A setting as compared: a state loaded through another route may hold a tuple as a list."""
    return tuple(value) if isinstance(value, list) else value


@dataclass
class WarmupCosine:
    """Learning-rate factor at optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup_steps`` (as open_clip: the first step
    already trains), then a half cosine from 1 down to ``min_lr_ratio`` at
    ``total_steps``, and ``min_lr_ratio`` after that. A dataclass rather than a
    closure so that ``LambdaLR.state_dict()`` saves its fields too, which a resume
    compares with the current ones (:func:`mmggem.checkpoint.restore.restore_scheduler`).
    """

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} and total_steps={self.total_steps}: "
                "need 0 <= warmup_steps < total_steps"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: need 0 <= min_lr_ratio <= 1")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """torch's ``LambdaLR`` over one :class:`WarmupCosine`, whose saved state restores its position only.

    ``LambdaLR.load_state_dict`` would copy the saved schedule's settings (its base learning
    rates and the :class:`WarmupCosine` fields) over the ones this scheduler was built with; here
    they stay those of the current config, and only the step count comes from the state.
    Every group's learning rate is then set to this schedule's value at that step, also after
    the optimizer's own state is loaded (which holds the saving schedule's learning rates), so
    the two may be restored in either order.
    """

    _SETTINGS = ("base_lrs", "lr_lambdas")  # what the config decides; everything else is the position

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> None:
        super().__init__(optimizer, schedule)
        optimizer.register_load_state_dict_post_hook(lambda _: self.follow_schedule())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the position (``last_epoch``, the step count) from ``state_dict``, keep this schedule."""
        missing = [key for key in ("last_epoch", "_step_count") if key not in state_dict]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        position = {key: value for key, value in state_dict.items() if key not in self._SETTINGS}
        super().load_state_dict({**position, "lr_lambdas": [None] * len(self.lr_lambdas)})
        self.follow_schedule()

    def follow_schedule(self) -> None:
        """Set every group's learning rate to this schedule's value at the current position (as ``step``
        computes it, so an unchanged schedule gives the very same numbers)."""
        lrs = [base_lr * factor(self.last_epoch) for factor, base_lr in zip(self.lr_lambdas, self.base_lrs)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> WarmupCosineLR:
    """Warmup + cosine schedule (:class:`WarmupCosine`) for every group of ``optimizer``.

    Call ``scheduler.step()`` once after each ``optimizer.step()``. Its
    ``state_dict()`` (the step count, base lrs and the schedule's fields) restores
    the position with ``load_state_dict`` on a freshly built one: exactly the same
    learning rates when that one has the same settings, the new schedule's otherwise
    (:class:`WarmupCosineLR`).
    """
    return WarmupCosineLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))
