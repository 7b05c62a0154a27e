"""mmggem.train.fsdp.enable_fsdp_on_cpu against the installed accelerate, in one real gloo process.

The switch writes accelerate's own state (``AcceleratorState`` and the private
``PartialState._shared_state``) as accelerate 1.15 does for GPUs, so pyproject.toml bounds accelerate
to the versions it was tested with. On another version this test says which of the two things the
switch rests on no longer holds: accelerate falls back from FSDP to DDP on CPU processes, and after
the switch ``prepare`` shards the model with FSDP2.
"""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import cpu_env, free_port

from mmggem.errors import UsageError
from mmggem.train.fsdp import enable_fsdp_on_cpu

WORKER = r"""
import accelerate, torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from mmggem.train.fsdp import enable_fsdp_on_cpu

version = accelerate.__version__
accelerator = Accelerator(cpu=True)
assert accelerator.distributed_type == DistributedType.MULTI_CPU, (
    f"accelerate {version} no longer falls back from FSDP to DDP on CPU processes (distributed type "
    f"{accelerator.distributed_type}): enable_fsdp_on_cpu may be needless or wrong; review mmggem/train/fsdp.py")
enable_fsdp_on_cpu(accelerator)
assert accelerator.distributed_type == PartialState().distributed_type == DistributedType.FSDP, (
    f"accelerate {version}: after enable_fsdp_on_cpu the state says {accelerator.distributed_type} / "
    f"{PartialState().distributed_type}, not FSDP")
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
kinds = {type(p).__name__ for p in model.parameters()}
assert kinds == {"DTensor"}, f"accelerate {version}: prepare after enable_fsdp_on_cpu gave {kinds}, not FSDP2 shards"
print("sharded with FSDP2 on accelerate", version)
"""


def test_the_cpu_fsdp_switch_still_makes_accelerate_shard_with_fsdp2() -> None:
    env = cpu_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1",
                  LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded with FSDP2 on accelerate" in result.stdout


def test_cpu_fsdp_names_the_version_it_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    accelerator = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no"))
    with pytest.raises(UsageError, match=r"fsdp_version: 2 in the accelerate config \(FSDP_VERSION\), got 1"):
        enable_fsdp_on_cpu(accelerator)
