"""`mmggem ablate` running its runs: which GPU a child gets, waiting for the other processes, which runs
already there it reuses, and the arms it refuses."""
from __future__ import annotations

import dataclasses
import json
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, ok, run_cli, spawn_ranks

from mmggem.config.run import load_config, save_config
from mmggem.experiments.ablation import Arm, _run_environment, plan_runs, run_all, train_overrides

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
SHARED = ["data.train=shards/{000..003}.tar", "train.steps=3", "train.threads=1"]
"""The shared overrides of the ablations below (no run is trained: the shards need not exist)."""


def test_a_child_run_gets_its_process_entry_of_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Under SLURM's --gpus-per-node or accelerate's --gpu_ids every process sees the same list: process 1's
    runs must go to the list's second GPU, not all to its first."""
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    env = _run_environment(1)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(env)
    assert _run_environment(3)["CUDA_VISIBLE_DEVICES"] == "5"  # modulo the list, as accelerate picks its device
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")
    assert _run_environment(0)["CUDA_VISIBLE_DEVICES"] == "GPU-aa"
    assert _run_environment(None)["CUDA_VISIBLE_DEVICES"] == "GPU-aa, GPU-bb"  # no GPU of its own: as it is
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _run_environment(1)["CUDA_VISIBLE_DEVICES"] == "1"

    # and the child process gets it: a stand-in interpreter prints its environment into the run's train.log
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES RANK=${RANK:-unset}"\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    runs = plan_runs(tmp_path / "out", [Arm("avg", "avg"), Arm("gem", "gem")], 1)
    run_all(DEMO, runs, SHARED, parallel=1, rank=1, world_size=2, device_index=1)
    assert (tmp_path / "out" / "gem" / "seed_0" / "train.log").read_text() == "CUDA_VISIBLE_DEVICES=5 RANK=unset\n"
    assert not (tmp_path / "out" / "avg").exists()  # process 0's share


RANK_DRIVER = textwrap.dedent("""
    import json, sys, time
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=6)  # torch's 30 minutes for gloo, as seconds

    import mmggem.experiments.ablation as ablation
    from mmggem.cli import main

    def slow_run(config, run, overrides, device_index, tags=()):
        if not run.finished:  # hours of training, as 12 seconds
            time.sleep(12)
            (run.output_dir / "final").mkdir(parents=True)
            (run.output_dir / "results.jsonl").write_text(json.dumps({"eval/set/image_retrieval_recall@1": 0.5}))
            (run.output_dir / "final" / "open_clip_config.json").write_text("{}")
        return 0

    ablation.train_run = slow_run
    sys.exit(main(sys.argv[1:]))
""")


def test_processes_that_finish_early_do_not_time_out_waiting_for_the_others(tmp_path: Path) -> None:
    """Process 0 reuses its run and is done at once, process 1 trains for longer than the process group's
    timeout (torch's, shortened to seconds): process 0 waits for it, writes the tables, and both exit 0."""
    out = tmp_path / "ablation"
    reused = out / "avg" / "seed_0"
    (reused / "final").mkdir(parents=True)
    (reused / "final" / "open_clip_config.json").write_text("{}")
    (reused / "results.jsonl").write_text(json.dumps({"eval/set/image_retrieval_recall@1": 0.25}))
    ranks = spawn_ranks("ablate", str(DEMO), "--poolings", "avg,gem", "--seeds", "1", "--output-dir", str(out),
                        "--metrics", "image_retrieval_recall@1", *SHARED, command=(PYTHON, "-c", RANK_DRIVER))
    codes = [rank.wait(timeout=120) for rank in ranks]
    logs = [rank.stdout.read() for rank in ranks]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert f"waiting for process(es) 1 to finish their runs (each writes {out}/.ranks/rank_<i>.done)" in logs[0]
    assert "| avg |" in (out / "ablation.md").read_text() and "| gem |" in (out / "ablation.md").read_text()
    assert not (out / ".ranks").exists()  # the marks go once every process's share is done


def write_run(out: Path, arm: Arm, seed: int, *changes: str, finished: bool = True, checkpoint: bool = False,
              drop: tuple[str, ...] = ()) -> Path:
    """A run of ``arm`` in OUT as `mmggem train` leaves it, its config.yaml saved as the trainer saves it
    (precision: the launcher's in effect) from the planned overrides and ``changes``; ``drop`` removes
    ``section.key`` entries, as a config written by an older mmggem lacks newer keys."""
    run = plan_runs(out, [arm], seed + 1)[-1]
    cfg = load_config(DEMO, [*train_overrides(run, SHARED), *changes])
    run.output_dir.mkdir(parents=True)
    save_config(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="no")),
                run.output_dir / "config.yaml")
    saved = yaml.safe_load((run.output_dir / "config.yaml").read_text())
    for key in drop:
        section, name = key.split(".")
        del saved[section][name]
    (run.output_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    if finished:
        (run.output_dir / "final").mkdir()
        (run.output_dir / "final" / "open_clip_config.json").write_text("{}")
    if checkpoint:
        (run.output_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
        (run.output_dir / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("{}")
    return run.output_dir


def test_runs_trained_with_another_config_are_refused_by_folder_key_and_values(tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    avg, gem, ggem = Arm("avg", "avg"), Arm("gem", "gem"), Arm("ggem", "ggem")
    # differs only on operational keys, and on keys the older config lacks: reused
    write_run(out, avg, 0, "train.threads=2", "train.checkpoint_every=7", "data.workers=0", "log.every=3",
              "eval.batch_size=9", drop=("data.stall_warn_s", "model.trim_text"))
    write_run(out, gem, 0, "train.steps=5", "train.lr=0.01")  # another budget
    write_run(out, ggem, 0, "train.batch_size=4", finished=False, checkpoint=True)  # cut short, another batch
    write_run(out, avg, 1, "train.steps=5", finished=False)  # started, no checkpoint: trained afresh anyway

    def ablate(*args: str) -> str:
        result = run_cli("ablate", str(DEMO), "--poolings", "avg,gem,ggem", "--seeds", "2", "--output-dir", str(out),
                         *SHARED, *args)
        return ok(result, 2 if "--dry-run" in args else 1).stdout + result.stderr

    dry = ablate("--dry-run")
    states = {line.split()[0] + line.split()[2]: line for line in dry.splitlines() if "seed_" in line}
    assert "finished (reused)" in states["avg0"] and "new" in states["avg1"]
    assert "finished, refused: differs on train.steps, train.lr" in states["gem0"]
    assert "cut short at step_00000002, refused: differs on train.batch_size" in states["ggem0"]
    planned = load_config(DEMO, SHARED).train
    message = (f"2 run(s) already there were trained with another config than planned, so reusing them would mix "
               f"budgets or models in one table: {out}/gem/seed_0 (train.steps: 5 there, 3 planned, "
               f"train.lr: 0.01 there, {planned.lr!r} planned); {out}/ggem/seed_0 (train.batch_size: 4 there, "
               f"{planned.batch_size} planned). "
               "Give this config another --output-dir, or move those run folders away to train them again")
    assert message in dry
    assert message in ablate()  # a real start refuses before training anything
    assert not list(out.glob("*/seed_*/train.log"))


def test_an_empty_arm_list_is_a_usage_error(tmp_path: Path) -> None:
    for stage in ("--dry-run", "--report"):
        result = run_cli("ablate", str(DEMO), "--poolings", "", "--output-dir", str(tmp_path), stage, *SHARED)
        assert result.returncode == 2 and "--poolings '' names no pooling and no --variant is given" in result.stderr
        assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
