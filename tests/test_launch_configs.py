"""Every accelerate config shipped in launch/accelerate/ runs for real: real processes on the CPU.

The GPU configs run here as shipped except for what a CPU lacks: ACCELERATE_USE_CPU=true, and
2 processes instead of 8 (or 16). Their bf16 autocast stays on (slow on this CPU, fine for 3 steps).
The multi-node config runs as two machines on localhost, one process each: training, a
checkpoint, and a resume that continues exactly.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ACCELERATE, cpu_env, free_port, launch_config
from test_train import assert_same_run, losses, ok, train_args

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "launch" / "accelerate"


def test_every_shipped_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        ["1gpu.yaml", "8gpu_ddp.yaml", "cpu_2proc.yaml", "fsdp.yaml", "multinode_ddp.yaml"])


@pytest.mark.parametrize(("config", "processes"), [("1gpu.yaml", None), ("8gpu_ddp.yaml", 2),
                                                   ("cpu_2proc.yaml", 2)])
def test_single_node_configs_train(train_shards: str, tmp_path: Path, config: str, processes: int | None) -> None:
    out = tmp_path / "run"
    ok(launch_config(CONFIGS / config, *train_args(train_shards, out, "train.steps=3"), processes=processes))
    assert len(losses(out)) == 3 and (out / "final" / "open_clip_model.safetensors").is_file()
    world = processes or 1
    state = (out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    assert f'"world_size": {world}' in state


def test_multinode_config_runs_as_two_machines_checkpoints_and_resumes(train_shards: str, tmp_path: Path) -> None:
    def two_machines(out: Path, *overrides: str) -> None:
        port = str(free_port())
        args = train_args(train_shards, out, "train.steps=6", "train.precision=no", *overrides)
        machines = [subprocess.Popen(
            [ACCELERATE, "launch", "--config_file", str(CONFIGS / "multinode_ddp.yaml"), "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "--mixed_precision", "no", "-m", "mmggem", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env()) for rank in range(2)]
        for machine in machines:
            output, _ = machine.communicate(timeout=300)
            assert machine.returncode == 0, output[-3000:]

    reference = tmp_path / "whole"
    two_machines(reference)
    split = tmp_path / "split"
    two_machines(split, "train.stop_at_step=3")
    assert (split / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    assert '"world_size": 2' in (split / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    two_machines(split, "train.resume=latest")
    assert_same_run(reference, split)
