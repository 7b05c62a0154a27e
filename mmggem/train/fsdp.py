"""FSDP2 through accelerate, on GPUs and on CPU processes alike, and plain models out of it.

accelerate runs FSDP2 (torch's ``fully_shard``: parameters become DTensors sharded over the
processes) when launched with an FSDP config. Two things it leaves to the trainer:

- On CPU processes (gloo) accelerate 1.15 silently drops FSDP and trains with DDP
  (``AcceleratorState`` keeps an FSDP plugin only for GPU-like devices). The rest of its FSDP2
  path (prepare, clip_grad_norm_, save_state/load_state with sharded checkpoints,
  get_state_dict) works on gloo unchanged. :func:`enable_fsdp_on_cpu` makes the state say FSDP
  again, so the test suite and CPU users run the very code path a GPU run takes.
- ``fully_shard`` refuses 0-dim parameters, and CLIP's ``logit_scale`` (SigLIP's ``logit_bias``)
  is one: :func:`vectorize_scalar_parameters` gives them shape ``[1]`` before sharding;
  :func:`plain_model` restores the original shapes.

Evaluation and export work on a plain copy of the model on every process
(:func:`plain_model`): the sharded model's ``encode_image``/``encode_text`` skip the root's
unsharding hooks, and its collectives would hang when processes evaluate unequal numbers of
batches, which sharded evaluation does.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from ..errors import UsageError

__all__ = ["enable_fsdp_on_cpu", "full_tensor", "is_fsdp", "plain_model", "sharding_summary",
           "vectorize_scalar_parameters"]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``tensor``'s whole value: DTensors (FSDP2 shards, partial norms) are gathered.

    Collective for a DTensor: every process must call it.
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_fsdp(accelerator: Accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP (its parameters are then DTensors)."""
    return accelerator.distributed_type == DistributedType.FSDP


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn accelerate's silent CPU fallback from FSDP to DDP back into FSDP2 (call before ``prepare``).

    Acts only when the launch asked for FSDP (``ACCELERATE_USE_FSDP``, set by ``accelerate launch``
    from an FSDP config) and accelerate settled on ``MULTI_CPU``; it then does for the CPU what
    ``AcceleratorState`` does for GPUs: keep the plugin (read from the launcher's ``FSDP_*``
    variables) and set the distributed type to FSDP.
    """
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UsageError(f"FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (FSDP_VERSION), "
                         f"got {plugin.fsdp_version}")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # accelerate's own AcceleratorState.__init__ ends with this line (private state, so pyproject.toml bounds
    # accelerate to the tested versions; tests/test_fsdp_switch.py checks the switch on the installed one)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def vectorize_scalar_parameters(model: nn.Module) -> list[str]:
    """Give every 0-dim parameter shape ``[1]`` (``fully_shard`` refuses scalars); returns their names.

    Call before the optimizer is built: it replaces the Parameter objects.
    """
    names = []
    for name, parameter in list(model.named_parameters()):
        if parameter.dim() == 0:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attribute, nn.Parameter(parameter.detach().reshape(1),
                                                   requires_grad=parameter.requires_grad))
            names.append(name)
    return names


def plain_model(accelerator: Accelerator, model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """The model without wrappers, with its current weights, on every process.

    Without FSDP: accelerate's unwrapped module itself (torch.compile's wrapper removed too, so
    state_dict keys are plain). Under FSDP: a new model from ``build()`` loaded with the full
    (gathered) weights on this process's device, original parameter shapes restored; a collective
    call. ``build`` runs under a forked RNG, so building the copy does not move the training's
    random stream.
    """
    if not is_fsdp(accelerator):
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.random.fork_rng(devices=[]):
        copy = build()
    shapes = {name: value.shape for name, value in copy.state_dict().items()}
    copy.load_state_dict({name: value.reshape(shapes[name]) for name, value in weights.items()})
    return copy.to(accelerator.device)


def sharding_summary(accelerator: Accelerator, model: nn.Module) -> str:
    """One line on how the parameters are distributed (printed at the start of training)."""
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    if not is_fsdp(accelerator):
        return f"model: {total:,} parameter elements, a full copy on each of {accelerator.num_processes} process(es)"
    sharded = sum(hasattr(p, "to_local") for p in parameters)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in parameters)
    return (f"model: {total:,} parameter elements; FSDP2: {sharded} of {len(parameters)} parameters are DTensors "
            f"sharded over {accelerator.num_processes} processes, process {accelerator.process_index} holds "
            f"{local:,} elements")
