"""Counting the reads of tensor values by the host, per training step.

Every ``.item()``, ``float(t)``, ``bool(t)``, ``torch.equal`` and device-to-host copy passes
through the dispatcher as one of the ops below; a ``TorchDispatchMode`` sees them all, in the
trainer, in torch and in accelerate alike. On a CPU every tensor lives on the host, so only the
value reads (``_local_scalar_dense`` and friends) are visible there; on CUDA the copies to the
host are counted too.

``Tensor.tolist()`` and ``Tensor.numpy()`` of a CPU tensor reach no dispatcher op at all (on
CUDA, ``tolist`` copies to the host first), so while counting, those two methods are wrapped
to record each call as well: a per-step ``.tolist()`` of a device counter is seen on the CPU
too, not only by the GPU check.

Used by ``train_reads_worker.py`` (the 2-process and 1-process tests) and the GPU self-check.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
UNDISPATCHED_READS = ("tolist", "numpy")  # Tensor methods that read values without a dispatcher op on CPU


def _device(value: Any) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


def copies_to_host(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether this op copied data from an accelerator into host memory."""
    cpu = torch.device("cpu")
    if func is aten._to_copy.default:
        return _device(args[0]) not in (None, cpu) and _device(out) == cpu
    if func is aten.copy_.default:
        return _device(args[0]) == cpu and _device(args[1]) not in (None, cpu)
    return False


class HostReads(TorchDispatchMode):
    """Records each host read as (step, op name); ``step`` is advanced by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.reads: list[tuple[int, str]] = []
        self._originals: dict[str, Callable[..., Any]] = {}

    def _counted(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.reads.append((self.step, f"Tensor.{name}"))
            return method(tensor, *args, **kwargs)
        return counted

    def __enter__(self) -> "HostReads":
        for name in UNDISPATCHED_READS:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, self._originals[name]))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)
        self._originals.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in VALUE_READS or copies_to_host(func, args, kwargs, out):
            self.reads.append((self.step, str(func)))
        return out

    def per_step(self, steps: int) -> dict[int, list[str]]:
        """Reads by step (step k holds what ran from the start of step k to the start of step k + 1)."""
        table: dict[int, list[str]] = {step: [] for step in range(steps + 1)}
        for step, op in self.reads:
            table[step].append(op)
        return table
