"""Checkpoints you can trust: damage is named in one line, `latest` falls back past it, no code runs.

One short run (stopped at step 4 of 6, checkpoints at steps 2 and 4) is shared by every case;
each case damages a copy of it and resumes through the CLI as a user would. A resume that
falls back is checked for exactness against the shared run's own losses.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import records, run_cli
from test_train import assert_same_run, ok, train_args

from mmggem.checkpoint.manifest import MANIFEST, CheckpointDamaged, verify_manifest


@pytest.fixture(scope="module")
def stopped_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stopped") / "run"
    ok(run_cli(*train_args(train_shards, out, "train.steps=6", "train.checkpoint_every=2",
                           "train.keep_checkpoints=2", "train.stop_at_step=4")))
    return out


@pytest.fixture(scope="module")
def full_run(train_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 6 steps of the shared run without a stop: what every resume must reproduce, loss, learning rate
    and final weights (checkpointing every step changes nothing it computes)."""
    out = tmp_path_factory.mktemp("full") / "run"
    ok(run_cli(*train_args(train_shards, out, "train.steps=6", "train.checkpoint_every=1",
                           "train.keep_checkpoints=3")))
    return out


def assert_continues_as(resumed: Path, full: Path, resumed_at: int) -> None:
    """Every step after ``resumed_at`` (at least 2, so that a learning rate restored wrong changes a loss)
    logged the loss and learning rate of the uninterrupted run, and the final weights are its."""
    after = {r["step"]: (r["train/loss"], r["train/lr"]) for r in records(resumed) if r["step"] > resumed_at}
    expected = {r["step"]: (r["train/loss"], r["train/lr"]) for r in records(full) if r["step"] > resumed_at}
    assert len(after) >= 2 and after == expected
    assert_same_run(full, resumed, atol=0)


@pytest.fixture
def run_copy(stopped_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run for one case to damage."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def step(run: Path, number: int) -> Path:
    return run / "checkpoints" / f"step_{number:08d}"


def resume(shards: str, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Resume ``run`` through the CLI and stop after one more step (enough to show where it resumed)."""
    return run_cli(*train_args(shards, run, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                               "train.stop_at_step=3", "train.resume=latest", *overrides))


def as_written_before_manifests(checkpoint: Path) -> None:
    """Turn ``checkpoint`` into one written before this change: no manifest, and the scheduler's
    state pickled by torch.save as accelerate's ``custom_checkpoint_0.pkl`` instead of JSON."""
    (checkpoint / MANIFEST).unlink()
    scheduler = checkpoint / "scheduler.json"
    torch.save(json.loads(scheduler.read_text()), checkpoint / "custom_checkpoint_0.pkl")
    scheduler.unlink()


def cut(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


class CodePayload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


DAMAGES = {
    "truncated": lambda ckpt: cut(ckpt / "data_state_rank0.json"),
    "garbage": lambda ckpt: (ckpt / "random_states_0.pkl").write_bytes(
        os.urandom((ckpt / "random_states_0.pkl").stat().st_size)),
    "missing": lambda ckpt: (ckpt / "optimizer.bin").unlink(),
    "from another step": lambda ckpt: shutil.copy(ckpt.parent / "step_00000002" / "model.safetensors", ckpt),
    "added": lambda ckpt: torch.save({"base_lrs": [0.1]}, ckpt / "custom_checkpoint_0.pkl"),
}
NAMED = {"truncated": "data_state_rank0.json: 100 bytes, the manifest says",
         "garbage": "random_states_0.pkl: content differs from the manifest",
         "missing": "optimizer.bin: missing",
         "from another step": "model.safetensors: content differs from the manifest",
         "added": "custom_checkpoint_0.pkl: not in the checkpoint's manifest"}


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_manifest_names_each_kind_of_damage(run_copy: Path, damage: str) -> None:
    checkpoint = step(run_copy, 4)
    assert verify_manifest(checkpoint)
    DAMAGES[damage](checkpoint)
    with pytest.raises(CheckpointDamaged, match=f"^{checkpoint}/{NAMED[damage]}"):
        verify_manifest(checkpoint)


def test_a_damaged_manifest_is_named(run_copy: Path) -> None:
    cut(step(run_copy, 4) / MANIFEST)
    with pytest.raises(CheckpointDamaged, match=f"^{step(run_copy, 4) / MANIFEST}: not a readable manifest"):
        verify_manifest(step(run_copy, 4))


def test_latest_skips_a_damaged_checkpoint_with_one_warning_and_resumes_exactly(
        train_shards: str, full_run: Path, run_copy: Path) -> None:
    DAMAGES["garbage"](step(run_copy, 4))  # the RNG state: accelerate alone would resume silently
    result = ok(resume(train_shards, run_copy, "train.stop_at_step=null"))
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"WARNING: skipping a damaged checkpoint ({step(run_copy, 4)}/random_states_0.pkl:"
                                  " content differs from the manifest")
    assert warnings[0].endswith("resuming from step_00000002")
    assert f"resumed from {step(run_copy, 2)} at step 2" in result.stdout
    assert_continues_as(run_copy, full_run, resumed_at=2)


def test_latest_falls_back_past_the_two_newest_damaged_checkpoints(train_shards: str, full_run: Path,
                                                                    tmp_path: Path) -> None:
    """Three checkpoints kept (steps 2, 3, 4 of a run stopped at 4), the two newest damaged: the resume
    starts from step 2 with one warning for each skipped checkpoint and runs to the end as the full run."""
    run = tmp_path / "run"
    ok(run_cli(*train_args(train_shards, run, "train.steps=6", "train.checkpoint_every=1",
                           "train.keep_checkpoints=3", "train.stop_at_step=4")))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{n:08d}" for n in (2, 3, 4)]
    DAMAGES["garbage"](step(run, 4))
    DAMAGES["missing"](step(run, 3))
    result = ok(run_cli(*train_args(train_shards, run, "train.steps=6", "train.checkpoint_every=1",
                                    "train.keep_checkpoints=3", "train.resume=latest")))
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert [w.split(" (")[1].split(":")[0] for w in warnings] == [str(step(run, 4) / "random_states_0.pkl"),
                                                                  str(step(run, 3) / "optimizer.bin")]
    assert all(w.endswith("resuming from step_00000002") for w in warnings)
    assert f"resumed from {step(run, 2)} at step 2" in result.stdout
    assert_continues_as(run, full_run, resumed_at=2)


def test_an_explicit_checkpoint_that_does_not_verify_is_an_error(train_shards: str, run_copy: Path) -> None:
    DAMAGES["from another step"](step(run_copy, 4))
    result = ok(resume(train_shards, run_copy, f"train.resume={step(run_copy, 4)}"), code=1)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mmggem train: error: {step(run_copy, 4)}/model.safetensors: content differs from the "
                           "manifest")


def test_no_checkpoint_that_verifies_is_an_error(train_shards: str, run_copy: Path) -> None:
    for number in (2, 4):
        DAMAGES["missing"](step(run_copy, number))
    result = ok(resume(train_shards, run_copy), code=1)
    assert "no checkpoint in" in result.stderr and f"the newest: {step(run_copy, 4)}/optimizer.bin: missing" \
        in result.stderr


UNREADABLE = {
    "data_state_rank0.json": (lambda ckpt: cut(ckpt / "data_state_rank0.json"), "not readable JSON"),
    "model.safetensors": (lambda ckpt: cut(ckpt / "model.safetensors", 10_000), "not a readable safetensors file"),
    "optimizer.bin": (lambda ckpt: cut(ckpt / "optimizer.bin", 10_000), "cut short or not a torch file"),
    "random_states_0.pkl": (DAMAGES["garbage"], "cut short or not a torch file"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_an_unreadable_file_of_an_older_checkpoint_is_named_in_one_line(train_shards: str, run_copy: Path,
                                                                       name: str) -> None:
    """Without a manifest nothing is verified up front: each file's read failure is the error."""
    checkpoint = step(run_copy, 4)
    as_written_before_manifests(checkpoint)
    damage, what = UNREADABLE[name]
    damage(checkpoint)
    result = ok(resume(train_shards, run_copy), code=1)
    assert result.stderr.strip().splitlines()[-1].startswith(f"mmggem train: error: {checkpoint / name}: {what}"), \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_an_rng_state_that_cannot_be_restored_is_an_error(train_shards: str, run_copy: Path) -> None:
    checkpoint = step(run_copy, 4)
    as_written_before_manifests(checkpoint)
    torch.save({"step": 4}, checkpoint / "random_states_0.pkl")  # a torch file, but no RNG state in it
    result = ok(resume(train_shards, run_copy), code=1)
    assert result.stderr.strip().endswith(
        f"{checkpoint}/random_states_0.pkl: not an RNG state that can be restored (KeyError: 'random_state')")


def test_a_pickle_carrying_code_is_refused_without_running_it(train_shards: str, run_copy: Path,
                                                            tmp_path: Path) -> None:
    checkpoint, marker = step(run_copy, 4), tmp_path / "the payload ran"
    as_written_before_manifests(checkpoint)
    torch.save({"base_lrs": [CodePayload(marker)]}, checkpoint / "custom_checkpoint_0.pkl")
    result = ok(resume(train_shards, run_copy), code=1)
    assert f"{checkpoint}/custom_checkpoint_0.pkl: refused: it holds objects other than tensors" in result.stderr
    assert "Unsupported global: GLOBAL io.open" in result.stderr
    assert not marker.exists()


def test_a_checkpoint_written_before_manifests_resumes_exactly_with_a_warning(
        train_shards: str, full_run: Path, run_copy: Path) -> None:
    shutil.rmtree(step(run_copy, 4))
    as_written_before_manifests(step(run_copy, 2))
    result = ok(resume(train_shards, run_copy, "train.stop_at_step=null"))
    assert result.stdout.count("WARNING") == 1
    assert f"WARNING: {step(run_copy, 2)} has no manifest.json" in result.stdout
    assert_continues_as(run_copy, full_run, resumed_at=2)  # with the scheduler from the pickle
    assert sorted(p.name for p in step(run_copy, 4).iterdir()) == [
        "data_state_rank0.json", MANIFEST, "model.safetensors", "optimizer.bin", "random_states_0.pkl",
        "scheduler.json", "trainer_state.json"]
