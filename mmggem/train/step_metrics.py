"""What the trainer logs at a log step: ``train/...``, ``perf/...`` and ``data/...`` values.

Every function here reads device values (or is collective) and runs at log steps only,
never in the steps between them (see ``tests/test_train_host_reads.py``).
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from accelerate import Accelerator

from ..data.loader import TrainLoader
from .fsdp import full_tensor


def pool_exponents(model: torch.nn.Module) -> torch.Tensor | None:
    """The learnable exponents of a GeM/GGeM pooler, as a 1-D tensor on the host, or None.

    The stored values are the ones the forward pass uses: the optimizer projects them to ``>= 1``.

    Collective under FSDP (the exponents may be sharded): every process must call it.
    """
    p = getattr(model.visual.pooler, "p", None)
    return None if p is None else full_tensor(p.detach()).float().reshape(-1).cpu()


def step_metrics(model: torch.nn.Module, loss: torch.Tensor, grad_norm: torch.Tensor,
                 optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> dict[str, float]:
    """``train/...`` metrics of the current step, the loss averaged over processes.

    ``train/logit_bias`` is SigLIP's learned bias (models without one log none).
    """
    loss = accelerator.reduce(loss.detach().float().reshape(1).clone(), reduction="mean")
    metrics = {
        "train/loss": float(loss.item()),
        "train/grad_norm": float(grad_norm.item()),
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/logit_scale": float(full_tensor(model.logit_scale.detach()).exp().item()),
    }
    if getattr(model, "logit_bias", None) is not None:
        metrics["train/logit_bias"] = float(full_tensor(model.logit_bias.detach()).reshape(-1)[0].item())
    exponents = pool_exponents(model)
    if exponents is not None:
        metrics.update({f"train/pool_p/group_{g}": float(v) for g, v in enumerate(exponents)})
    return metrics


def skipped_samples(loader: TrainLoader, accelerator: Accelerator) -> int:
    """Samples the loaders of all processes skipped so far, every reason (:mod:`mmggem.data.skips`) together.

    Collective: every process must call it.
    """
    count = torch.tensor([sum(loader.skipped().values())], device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum").item())


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GB (1e9 bytes): CUDA's ``max_memory_allocated`` (tensors only, as
    open_clip and Hugging Face report it), or on a CPU the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1e3 / 1e9


def max_over_processes(value: float, accelerator: Accelerator) -> float:
    """The largest ``value`` of all processes (collective)."""
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return float(gathered.max().item())


@dataclass
class StepTimer:
    """Wall-clock time of the steps since the last log step (or since the run started or resumed), how many
    steps that was, and the part spent waiting for a batch."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    steps: int = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def stepped(self) -> None:
        """One more optimizer step in the window."""
        self.steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of the window."""
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused_at

    def metrics(self, batch_size: int, num_processes: int) -> dict[str, float]:
        """``perf/...`` over the window's steps (at least one) of ``batch_size`` samples per process; restarts it."""
        elapsed, steps = max(time.perf_counter() - self.start, 1e-9), self.steps
        metrics = {
            "perf/step_time_s": elapsed / steps,
            "perf/data_wait_s": self.data_wait,
            "perf/data_wait_fraction": min(self.data_wait / elapsed, 1.0),
            "perf/samples_per_s": steps * batch_size * num_processes / elapsed,
            "perf/samples_per_s_per_device": steps * batch_size / elapsed,
        }
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0
        return metrics
