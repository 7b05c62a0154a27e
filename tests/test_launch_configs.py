"""Every accelerate config shipped in launch/accelerate/ runs for real: real processes on the CPU.

The GPU configs run here as shipped except for what a CPU lacks: ACCELERATE_USE_CPU=true, and
2 processes instead of 8 (or 16). Their bf16 autocast stays on (~25x slower on this CPU, so 2 steps),
and each run records the precision its config names. The multi-node config runs as two machines on
localhost, one process each: training, a checkpoint, and a resume that continues exactly, in fp32
set by ``train.precision=no``, which wins over the config's bf16 with one printed line.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (ACCELERATE, cpu_env, evaluations, free_port, launch_config, ok, records, train_args,
                      two_process_args)
from test_train import assert_same_run, losses

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "launch" / "accelerate"


def test_every_shipped_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        ["1gpu.yaml", "8gpu_ddp.yaml", "cpu_2proc.yaml", "fsdp.yaml", "multinode_ddp.yaml"])


def recorded_precision(out: Path) -> tuple[set[str], str]:
    """The precision a run recorded: in its results.jsonl (once per start) and in its config.yaml."""
    noted = {record["run/precision"] for record in records(out) if "run/precision" in record}
    config = yaml.safe_load((out / "config.yaml").read_text())
    return noted, config["train"]["precision"]


def assert_trained_in_precision(config: str, out: Path, stdout: str, precision: str, steps: int, world: int) -> None:
    """``out``, launched with ``config``, trained ``steps`` steps on ``world`` processes in the config's precision."""
    assert yaml.safe_load((CONFIGS / config).read_text())["mixed_precision"] == precision
    assert f"precision: {precision} (" in stdout and "set by the launcher" in stdout
    assert recorded_precision(out) == ({precision}, precision)
    assert len(losses(out)) == steps and (out / "final" / "open_clip_model.safetensors").is_file()
    state = (out / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text()
    assert f'"world_size": {world}' in state


@pytest.mark.parametrize(("config", "processes", "precision"), [("1gpu.yaml", None, "bf16"),
                                                                ("8gpu_ddp.yaml", 2, "bf16")])
def test_single_node_configs_train_in_their_precision(train_shards: str, tmp_path: Path, config: str,
                                                      processes: int | None, precision: str) -> None:
    out = tmp_path / "run"
    result = ok(launch_config(CONFIGS / config, *train_args(train_shards, out, "train.steps=2"), processes=processes))
    assert_trained_in_precision(config, out, result.stdout, precision, steps=2, world=processes or 1)


def test_the_cpu_config_trains_in_its_precision(two_process_run: Path) -> None:
    """cpu_2proc.yaml launches conftest's ``two_process_run``: 6 steps on 2 processes, in fp32."""
    stdout = (two_process_run.parent / "stdout.txt").read_text()
    assert_trained_in_precision("cpu_2proc.yaml", two_process_run, stdout, "no", steps=6, world=2)


def test_an_explicit_precision_wins_over_the_launch_config(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = ok(launch_config(CONFIGS / "cpu_2proc.yaml", *train_args(train_shards, out, "train.steps=1",
                                                                      "train.precision=bf16"), processes=1))
    assert result.stdout.count("precision: train.precision=bf16 wins over the launcher's no") == 1
    assert "precision: bf16 (bf16 autocast; set by train.precision)" in result.stdout
    assert recorded_precision(out) == ({"bf16"}, "bf16")


def test_multinode_config_runs_as_two_machines_checkpoints_and_resumes(
        train_shards: str, small_eval_sets: tuple[Path, Path], two_process_run: Path, tmp_path: Path) -> None:
    """Stopped and resumed as two machines, the run equals conftest's ``two_process_run``: the same
    6 steps (evaluated at steps 3 and 6) on one machine of 2 processes."""
    def two_machines(out: Path, *overrides: str) -> None:  # the config's bf16 reaches the run; train.precision wins
        port = str(free_port())
        args = two_process_args(train_shards, small_eval_sets[0], out, "train.precision=no", *overrides)
        machines = [subprocess.Popen(
            [ACCELERATE, "launch", "--config_file", str(CONFIGS / "multinode_ddp.yaml"), "--num_machines", "2",
             "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "-m", "mmggem", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env()) for rank in range(2)]
        for machine in machines:
            output, _ = machine.communicate(timeout=300)
            assert machine.returncode == 0, output[-3000:]
            assert "precision: train.precision=no wins over the launcher's bf16" in output
        assert recorded_precision(out) == ({"no"}, "no")

    split = tmp_path / "split"
    two_machines(split, "train.stop_at_step=3")
    assert (split / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    assert '"world_size": 2' in (split / "checkpoints" / "step_00000003" / "trainer_state.json").read_text()
    two_machines(split, "train.resume=latest")
    assert_same_run(two_process_run, split)
    whole, resumed = evaluations(two_process_run), evaluations(split)
    assert set(resumed) == set(whole) and {step for step, _ in whole} == {3, 6}
    assert all(abs(resumed[key] - whole[key]) <= 1e-5 for key in whole)
