"""Training end to end, in real processes: exact resume, stops, signals, kills, logging."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (ONE_PROCESS_ARGS, ONE_PROCESS_STEPS, PYTHON, accelerate_cli, cpu_env, evaluations, ok,
                      records, run_cli, spawn_ranks, train_args, two_process_args)
from accelerate.utils import RNG_STATE_NAME
from safetensors.torch import load_file

import mmggem
from mmggem.checkpoint.restore import load_torch_file
from mmggem.config.run import load_config
from mmggem.train.optim import WarmupCosine
from mmggem.train.stopping import EXIT_REQUEUE

ROOT = Path(__file__).resolve().parent.parent


def losses(output_dir: Path) -> list[float]:
    return [record["train/loss"] for record in records(output_dir) if "train/loss" in record]


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "final" / "open_clip_model.safetensors"))


def assert_same_run(first: Path, second: Path, atol: float = 1e-5) -> None:
    assert len(losses(first)) == len(losses(second))
    torch.testing.assert_close(torch.tensor(losses(second)), torch.tensor(losses(first)), rtol=0, atol=atol)
    a, b = final_weights(first), final_weights(second)
    assert a.keys() == b.keys()
    assert max((a[key] - b[key]).abs().max().item() for key in a) <= atol


def test_one_process_run_logs_checkpoints_and_exports(
        one_process_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = one_process_run
    assert f"model saved to {out / 'final'}" in result.stdout
    logged = records(out)
    assert [r["step"] for r in logged] == list(range(1, ONE_PROCESS_STEPS + 1))
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/logit_scale", "perf/samples_per_s",
                "perf/data_wait_s", "data/skipped_samples", *(f"train/pool_p/group_{g}" for g in range(6))):
        assert all(key in r for r in logged), key
    assert logged[-1]["train/pool_p/group_0"] != 3.0  # the exponents learn
    last = ONE_PROCESS_STEPS - ONE_PROCESS_STEPS % 3  # checkpoints every 3 steps, the last 2 kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{last - 3:08d}", f"step_{last:08d}"]
    assert (out / "config.yaml").read_text().count("pooling: ggem") == 1
    # no launcher and train.precision unset: fp32, said at start and recorded
    assert "precision: no (fp32; set by the default)" in result.stdout
    assert "precision: 'no'" in (out / "config.yaml").read_text() and logged[0]["run/precision"] == "no"
    model, _, tokenizer = mmggem.load(out / "final")
    assert model.encode_text(tokenizer(["a photo of colour 2"])).shape == (1, 128)
    # log.wandb=offline needs no network: wandb's own offline run file, and the id a resume continues
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (out / "wandb_run_id").is_file()


def one_process(shards: str, output_dir: Path, *overrides: str) -> list[str]:
    """The arguments of ``one_process_run`` (checkpointing aside) for another output folder."""
    return train_args(shards, output_dir, f"train.steps={ONE_PROCESS_STEPS}", *overrides)


def test_stop_at_step_then_resume_equals_one_run(train_shards: str, one_process_run: tuple[Path, object],
                                                 tmp_path: Path) -> None:
    split = tmp_path / "split"
    stopped = ok(run_cli(*one_process(train_shards, split, "train.stop_at_step=4")))
    assert "stopped at step 4 (stop_at_step)" in stopped.stdout
    assert not (split / "final").exists() and len(losses(split)) == 4
    ok(run_cli(*one_process(train_shards, split, "train.resume=latest")))
    assert_same_run(one_process_run[0], split)
    # the main process's CPU generator too is where the uninterrupted run's is (the loader draws nothing from it)
    last = Path("checkpoints") / f"step_{ONE_PROCESS_STEPS:08d}"
    assert torch.equal(cpu_rng_state(split / last), cpu_rng_state(one_process_run[0] / last))


def cpu_rng_state(checkpoint: Path) -> torch.Tensor:
    """torch's global CPU generator state of rank 0 when ``checkpoint`` was saved."""
    return load_torch_file(checkpoint / f"{RNG_STATE_NAME}_0.pkl")["torch_manual_seed"]


@pytest.fixture(scope="module")
def continued_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished 3-step run continued to 6 steps (train.resume=latest, train.steps=6), logged every 2 steps;
    the output folder and what the continuation printed."""
    out = tmp_path_factory.mktemp("continued") / "run"
    ok(run_cli(*train_args(train_shards, out, "train.steps=3", "log.every=2")))
    continued = ok(run_cli(*train_args(train_shards, out, "train.steps=6", "log.every=2", "train.resume=latest")))
    return out, continued.stdout


def test_a_run_continued_to_more_steps_follows_the_longer_schedule(continued_run: tuple[Path, str]) -> None:
    out, printed = continued_run
    assert "the schedule follows the config: total steps 3 -> 6\n" in printed
    train = load_config(ROOT / "configs" / "demo.yaml").train
    schedule = WarmupCosine(2, 6, train.min_lr_ratio)  # train_args' warmup
    logged = {r["step"]: r["train/lr"] for r in records(out) if "train/lr" in r}  # the rate of the step after
    assert [logged[step] for step in (4, 6)] == pytest.approx([train.lr * schedule(step) for step in (4, 6)])


def test_perf_metrics_time_the_steps_since_the_last_log_or_the_resume(continued_run: tuple[Path, str]) -> None:
    """Logged at steps 2, 3 (the first run's end), 4 (one step after the resume) and 6. The window's step
    count is what the perf/ values imply: data_wait_s / data_wait_fraction is the window's time, and
    step_time_s that time per step."""
    out, _ = continued_run
    window_steps = {r["step"]: round(r["perf/data_wait_s"] / r["perf/data_wait_fraction"] / r["perf/step_time_s"])
                    for r in records(out) if "perf/step_time_s" in r}
    assert window_steps == {2: 2, 3: 1, 4: 1, 6: 2}


def test_two_processes_stop_and_resume_equal_one_run(train_shards: str, small_eval_sets: tuple[Path, Path],
                                                     two_process_run: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    ok(accelerate_cli(*two_process_args(train_shards, small_eval_sets[0], split, "train.stop_at_step=3")))
    ok(accelerate_cli(*two_process_args(train_shards, small_eval_sets[0], split, "train.resume=latest")))
    assert_same_run(two_process_run, split)
    state = json.loads((split / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 6 * 8 * 2
    # the evaluations of step 3 (before the stop) and step 6 (after the resume) are the uninterrupted run's
    whole, resumed = evaluations(two_process_run), evaluations(split)
    assert set(resumed) == set(whole) and {step for step, _ in whole} == {3, 6}
    assert all(abs(resumed[key] - whole[key]) <= 1e-5 for key in whole)


PLAIN = ("train.steps=4", "data.workers=0")


@pytest.fixture(scope="module")
def plain_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 eager steps without accumulation, loading in the main process: what accumulated and compiled runs equal."""
    out = tmp_path_factory.mktemp("plain") / "run"
    ok(run_cli(*train_args(train_shards, out, *PLAIN)))
    return out


def test_accumulation_scores_against_the_whole_step(train_shards: str, plain_run: Path, tmp_path: Path) -> None:
    ok(run_cli(*train_args(train_shards, tmp_path / "accum", *PLAIN, "train.accum_steps=2")))
    assert_same_run(plain_run, tmp_path / "accum", atol=2e-5)


def test_compiled_model_trains_like_eager(train_shards: str, plain_run: Path, tmp_path: Path) -> None:
    inductor_cache = tmp_path / "inductor"
    compiled = train_args(train_shards, tmp_path / "compiled", *PLAIN, "model.compile=true")
    ok(run_cli(*compiled, TORCHINDUCTOR_CACHE_DIR=str(inductor_cache)))
    assert any(path.is_file() for path in inductor_cache.rglob("*")), "model.compile=true compiled nothing"
    assert_same_run(plain_run, tmp_path / "compiled", atol=1e-4)
    model, _, _ = mmggem.load(tmp_path / "compiled" / "final")
    assert type(model.visual.pooler).__name__ == "GGeM"


def wait_for_steps(output_dir: Path, steps: int, processes: list[subprocess.Popen]) -> None:
    results = output_dir / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if results.is_file() and len(results.read_text().splitlines()) >= steps:
            return
        assert all(p.poll() is None for p in processes), "training ended before it was signalled"
        time.sleep(0.05)
    raise AssertionError(f"{results} did not reach {steps} steps")


def test_a_signal_to_one_rank_stops_both_at_the_same_step(train_shards: str, tmp_path: Path) -> None:
    args = lambda out, *more: train_args(train_shards, out, "train.steps=30", *more)  # noqa: E731
    whole = spawn_ranks(*args(tmp_path / "whole"))
    assert [p.wait(timeout=300) for p in whole] == [0, 0], whole[0].stdout.read()[-2000:]
    out = tmp_path / "signalled"
    ranks = spawn_ranks(*args(out))
    wait_for_steps(out, 3, ranks)
    ranks[1].send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=120) for p in ranks]
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], ranks[0].stdout.read()[-2000:]
    stopped_at = len(losses(out))
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    resumed = spawn_ranks(*args(out, "train.resume=latest"))
    assert [p.wait(timeout=300) for p in resumed] == [0, 0]
    assert_same_run(tmp_path / "whole", out)


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(
        train_shards: str, one_process_run: tuple[Path, object], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    args = one_process(train_shards, out, "train.checkpoint_every=1", "train.keep_checkpoints=3")
    process = subprocess.Popen([PYTHON, "-m", "mmggem.cli", *args], env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and len(list(checkpoints.glob("step_*"))) >= 2
               and list(checkpoints.glob(".step_*.partial"))):
        assert process.poll() is None and time.monotonic() < deadline
    process.kill()
    process.wait()
    complete = sorted(checkpoints.glob("step_*"))
    assert complete and all((c / "trainer_state.json").is_file() for c in complete)
    ok(run_cli(*one_process(train_shards, out, "train.resume=latest")))
    assert_same_run(one_process_run[0], out)


def test_time_limit_checkpoints_and_exits_for_requeue(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "limited"
    result = run_cli(*train_args(train_shards, out, "train.steps=100000", "train.time_limit=1s"))
    assert result.returncode == EXIT_REQUEUE and "(time_limit)" in result.stdout
    step = len(losses(out))
    assert (out / "checkpoints" / f"step_{step:08d}").is_dir() and step < 100000


def test_existing_run_is_never_overwritten(train_shards: str, one_process_run: tuple[Path, object]) -> None:
    out = one_process_run[0]
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    again = run_cli(*train_args(train_shards, out, *ONE_PROCESS_ARGS))
    assert again.returncode == 1 and "set train.resume=latest" in again.stderr
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before


def test_config_errors_fail_before_training(train_shards: str, tmp_path: Path) -> None:
    result = run_cli(*train_args(train_shards, tmp_path / "x", "train.optimiser=sgd"))
    assert result.returncode == 2 and "unknown key train.optimiser" in result.stderr
    assert not (tmp_path / "x").exists()


def test_non_finite_losses_are_skipped_then_stop_the_run(train_shards: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mmggem.train import loop as trainer

    real_build_loss = trainer.build_loss
    calls = {"n": 0}

    def flaky_loss(name: str, **kwargs):  # steps 3 and 5.. produce NaN
        loss = real_build_loss(name, **kwargs)

        def forward(*args):
            calls["n"] += 1
            value = loss(*args)
            return value * float("nan") if calls["n"] == 3 or calls["n"] >= 5 else value
        return forward

    monkeypatch.setattr(trainer, "build_loss", flaky_loss)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "demo.yaml", train_args(train_shards, out, "train.steps=20",
                                                                 "train.checkpoint_every=2",
                                                                 "train.max_bad_steps=3", "data.workers=0")[2:])
    with pytest.raises(trainer.TrainingDiverged, match=r"3 steps in a row .* last good checkpoint: .*step_00000004"):
        trainer.train(cfg)
    logged = records(out)
    # steps 1-6 are logged, the sixth (the third bad one in a row) included; nothing after it
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["train/bad_steps"] for r in logged] == [0, 0, 1, 1, 2, 3]
    assert (out / "checkpoints" / "step_00000004").is_dir()


LAUNCH = {1: run_cli, 2: accelerate_cli}


@pytest.mark.parametrize(("processes", "resampled"), [((2, 1), "false"), ((1, 2), "true")],
                         ids=["2to1-epoch", "1to2-resampled"])
def test_resume_on_another_number_of_processes_continues_the_epoch_approximately(
        train_shards: str, two_process_run: Path, tmp_path: Path, processes: tuple[int, int], resampled: str) -> None:
    """The trainer's side of an elastic resume, each way and in each data mode once.

    What the rest of the epoch holds, in both modes, is unit-tested in one process in test_data_elastic.py;
    here the checkpoint of one process count resumes on the other, warns once and continues step,
    epoch and schedule.
    """
    args = lambda out, *more: train_args(train_shards, out, "train.steps=6", f"data.resampled={resampled}",  # noqa: E731
                                         *more)
    first, second = (LAUNCH[count] for count in processes)
    out = tmp_path / "run"
    ok(first(*args(out, "train.stop_at_step=3")))
    resumed = ok(second(*args(out, "train.resume=latest")))
    assert resumed.stdout.count("WARNING: resuming approximately") == 1, resumed.stdout[-2000:]
    assert "restored exactly" in resumed.stdout and "epoch 0 continues" in resumed.stdout
    logged = records(out)
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, 7))
    assert [r for r in logged if "data/resumed_approximately" in r][0]["step"] == 3
    assert all(r["train/epoch"] == 0 for r in logged if "train/loss" in r)  # the epoch was not restarted
    # the schedule and step continue exactly where the checkpoint left them: the uninterrupted 6-step run's
    later_lr = lambda run: [r["train/lr"] for r in records(run) if r["step"] > 3 and "train/lr" in r]  # noqa: E731
    assert later_lr(out) == later_lr(two_process_run) and len(later_lr(out)) == 3
    mmggem.load(out / "final")


def test_a_changed_shard_list_is_named_and_can_be_accepted(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok(run_cli(*train_args(train_shards, out, "train.steps=6", "train.stop_at_step=3")))
    fewer = train_shards.replace("{000000..000003}", "{000000..000002}")
    refused = run_cli(*train_args(fewer, out, "train.steps=6", "train.resume=latest"))
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "now 3" in refused.stderr and "then 4" in refused.stderr and "000003.tar" in refused.stderr
    assert "data.accept_changed_shards=true" in refused.stderr
    accepted = ok(run_cli(*train_args(fewer, out, "train.steps=6", "train.resume=latest",
                                      "data.accept_changed_shards=true")))
    assert "WARNING: resuming approximately" in accepted.stdout and (out / "final").is_dir()
