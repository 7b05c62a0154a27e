"""Checkpoints you can trust: damage is named in one line, `latest` falls back past it, no code runs.

One short run (stopped at step 4 of 6, checkpoints at steps 2 and 4) is shared by every case;
each case damages a copy of it and resumes through the CLI as a user would. A resume that
falls back is checked for exactness against the shared run's own losses.

How checkpoints are kept (a resume from an older one sets the newer ones aside, a save never
prunes itself) and written durably (every file fsynced before the rename, the folder after it;
a step saved again swapped by renames) is tested in-process on a tiny model, through
save_checkpoint and resolve_resume with real files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import records, run_cli
from test_train import assert_same_run, ok, train_args

from mmggem.checkpoint.manifest import MANIFEST, CheckpointDamaged, verify_manifest
from mmggem.checkpoint.store import STATE_FILE, list_checkpoints, resolve_resume, save_checkpoint
from mmggem.fileio import atomic_directory, write_text_atomic


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


def superseded(run: Path, resumed_at: int, suffix: str = "") -> Path:
    """Where a resume from step ``resumed_at`` moves the run's newer checkpoints."""
    return run / "checkpoints" / f"superseded_from_step_{resumed_at:08d}{suffix}"


def moved_warning(run: Path, resumed_at: int, *moved: int, suffix: str = "") -> str:
    names = ", ".join(f"step_{number:08d}" for number in moved)
    return (f"WARNING: resuming from {step(run, resumed_at)} (step {resumed_at}), so the newer checkpoints of "
            f"{run / 'checkpoints'} belong to the line it abandons: moved {names} to "
            f"{superseded(run, resumed_at, suffix)} (kept, not deleted)")


def test_latest_skips_a_damaged_checkpoint_with_a_warning_sets_it_aside_and_resumes_exactly(
        train_shards: str, full_run: Path, run_copy: Path) -> None:
    DAMAGES["garbage"](step(run_copy, 4))  # the RNG state: accelerate alone would resume silently
    result = ok(resume(train_shards, run_copy, "train.stop_at_step=null"))
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"WARNING: skipping a damaged checkpoint ({step(run_copy, 4)}/random_states_0.pkl:"
                                  " content differs from the manifest")
    assert warnings[0].endswith("resuming from step_00000002")
    assert warnings[1].startswith(moved_warning(run_copy, 2, 4))
    assert f"resumed from {step(run_copy, 2)} at step 2" in result.stdout
    assert_continues_as(run_copy, full_run, resumed_at=2)
    assert verify_manifest(step(run_copy, 4))  # the resumed line's own step 4
    with pytest.raises(CheckpointDamaged):  # the damaged one, kept aside
        verify_manifest(superseded(run_copy, 2) / "step_00000004")


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
    skipped, moved = warnings[:-1], warnings[-1]
    assert [w.split(" (")[1].split(":")[0] for w in skipped] == [str(step(run, 4) / "random_states_0.pkl"),
                                                                 str(step(run, 3) / "optimizer.bin")]
    assert all(w.endswith("resuming from step_00000002") for w in skipped)
    assert moved.startswith(moved_warning(run, 2, 3, 4))
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


@pytest.fixture(scope="module")
def accelerator() -> Iterator[Accelerator]:
    """A CPU Accelerator holding a tiny model and its optimizer: real accelerate state to save."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    yield accelerator
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def save(accelerator: Accelerator, run: Path, number: int, keep: int = 3, marker: str = "") -> Path:
    """save_checkpoint of step ``number`` as the trainer calls it; ``marker`` tells two saves of a step apart."""
    return save_checkpoint(accelerator, run, number, {"marker": marker}, {"position": number}, {"last_epoch": number},
                           keep)


def steps_of(run: Path) -> list[int]:
    return [int(path.name.removeprefix("step_")) for path in list_checkpoints(run)]


def warnings_in(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]


def test_a_resume_from_an_older_checkpoint_sets_the_newer_ones_aside_and_its_saves_stay(
        accelerator: Accelerator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    for number in (200, 300, 400):
        save(accelerator, run, number)
    assert resolve_resume(accelerator, run, str(step(run, 200))) == step(run, 200)
    [warning] = warnings_in(capsys)
    assert warning.startswith(moved_warning(run, 200, 300, 400))
    assert sorted(p.name for p in superseded(run, 200).iterdir()) == ["step_00000300", "step_00000400"]
    assert all(verify_manifest(path) for path in superseded(run, 200).iterdir())
    written = save(accelerator, run, 250, keep=2)
    assert written == step(run, 250) and verify_manifest(written)
    assert steps_of(run) == [200, 250]
    assert resolve_resume(accelerator, run, "latest") == step(run, 250)
    save(accelerator, run, 300)  # the resumed line goes on; resumed from 200 again, its 300 goes aside too
    assert resolve_resume(accelerator, run, str(step(run, 200))) == step(run, 200)
    [warning] = warnings_in(capsys)
    assert warning.startswith(moved_warning(run, 200, 250, 300, suffix="_2"))
    assert sorted(p.name for p in superseded(run, 200, "_2").iterdir()) == ["step_00000250", "step_00000300"]
    assert steps_of(run) == [200]


def test_latest_past_a_damaged_newest_keeps_what_the_resumed_run_saves(
        accelerator: Accelerator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """keep=1: a save of the resumed line must prune the checkpoint it resumed from, not itself."""
    run = tmp_path / "run"
    for number in (200, 300):
        save(accelerator, run, number, keep=2)
    DAMAGES["garbage"](step(run, 300))
    assert resolve_resume(accelerator, run, "latest") == step(run, 200)
    skipped, moved = warnings_in(capsys)
    assert skipped.endswith("resuming from step_00000200") and moved.startswith(moved_warning(run, 200, 300))
    assert save(accelerator, run, 250, keep=1).is_dir()
    assert steps_of(run) == [250]
    assert resolve_resume(accelerator, run, "latest") == step(run, 250)
    assert (superseded(run, 200) / "step_00000300" / STATE_FILE).is_file()


def test_a_resume_from_another_runs_checkpoint_moves_nothing_of_that_run(
        accelerator: Accelerator, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other, run = tmp_path / "other", tmp_path / "run"
    for number in (200, 300):
        save(accelerator, other, number)
    save(accelerator, run, 300)
    assert resolve_resume(accelerator, run, str(step(other, 200))) == step(other, 200)
    assert steps_of(other) == [200, 300] and not superseded(other, 200).exists()
    assert steps_of(run) == [] and (superseded(run, 200) / "step_00000300" / STATE_FILE).is_file()
    [warning] = warnings_in(capsys)
    assert f"resuming from {step(other, 200)} (step 200), so the newer checkpoints of {run / 'checkpoints'}" in warning


def test_a_save_below_the_newest_checkpoint_stays_and_prunes_only_older_ones(
        accelerator: Accelerator, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for number in (100, 200, 400):
        save(accelerator, run, number)
    written = save(accelerator, run, 300, keep=1)
    assert written == step(run, 300) and verify_manifest(written)
    assert steps_of(run) == [300, 400]


@pytest.fixture
def disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every fsync (the path its descriptor names), rename and folder removal, in order, as they happen."""
    events: list[tuple[str, ...]] = []
    fsync, rename, replace, rmtree = os.fsync, os.rename, os.replace, shutil.rmtree

    def record(name: str, operation: Callable, *paths: object) -> Callable:
        events.append((name, *map(str, paths)))
        return operation

    monkeypatch.setattr(os, "fsync", lambda fd: record("fsync", fsync, os.readlink(f"/proc/self/fd/{fd}"))(fd))
    monkeypatch.setattr(os, "rename", lambda src, dst: record("rename", rename, src, dst)(src, dst))
    monkeypatch.setattr(os, "replace", lambda src, dst: record("rename", replace, src, dst)(src, dst))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: record("rmtree", rmtree, path)(path, *a, **k))
    return events


def assert_durable(events: list[tuple[str, ...]], staged: Path, final: Path) -> None:
    """Every file and folder now under ``final`` was fsynced under its staging name ``staged`` before the
    rename, and ``final``'s parent folder after it."""
    renamed = events.index(("rename", str(staged), str(final)))
    synced = {event[1] for event in events[:renamed] if event[0] == "fsync"}
    real = Path(os.path.realpath(staged))
    expected = {str(real)} | ({str(real / p.relative_to(final)) for p in final.rglob("*")} if final.is_dir() else set())
    assert expected - synced == set(), f"not fsynced before the rename; fsynced: {sorted(synced)}"
    assert ("fsync", os.path.realpath(final.parent)) in events[renamed + 1:]


def test_every_file_of_a_checkpoint_is_on_disk_before_its_rename_and_pruning_waits_for_it(
        accelerator: Accelerator, tmp_path: Path, disk_events: list[tuple[str, ...]]) -> None:
    run = tmp_path / "run"
    save(accelerator, run, 1, keep=1)
    disk_events.clear()
    final = save(accelerator, run, 2, keep=1)
    assert {p.name for p in final.iterdir()} >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert_durable(disk_events, final.with_name(".step_00000002.partial"), final)
    synced_root = disk_events.index(("fsync", os.path.realpath(final.parent)))
    assert synced_root < disk_events.index(("rmtree", str(step(run, 1)))), "the old one pruned before the new is durable"
    assert steps_of(run) == [2]


def test_files_and_folders_written_atomically_are_durable(tmp_path: Path,
                                                          disk_events: list[tuple[str, ...]]) -> None:
    write_text_atomic(tmp_path / "record.json", "{}\n")
    [(_, staged, _)] = [event for event in disk_events if event[0] == "rename"]
    assert_durable(disk_events, Path(staged), tmp_path / "record.json")
    disk_events.clear()
    with atomic_directory(tmp_path / "export") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"0" * 100)
        (staging / "config.json").write_text("{}")
    assert_durable(disk_events, staging, tmp_path / "export")


def test_files_written_atomically_get_the_permissions_open_would_give(tmp_path: Path) -> None:
    """A temporary file is its owner's only: renamed into place as it is, a run's config.yaml or an ablation's
    tables would be unreadable to the team sharing the folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    write_text_atomic(tmp_path / "config.yaml", "seed: 0\n")
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "config.yaml").chmod(0o640)
    write_text_atomic(tmp_path / "config.yaml", "seed: 1\n")
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o640, "an existing file's permissions were lost"
    with atomic_directory(tmp_path / "export") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask


class Killed(BaseException):
    """What a SIGKILL at that instant would leave: nothing after it runs, no cleanup either."""


def test_saving_a_step_again_never_deletes_it_before_its_successor_is_in_place(
        accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    first = save(accelerator, run, 2, marker="first")
    rename = os.rename

    def killed_before_the_new_one_is_renamed_into_place(src: Path, dst: Path) -> None:
        if Path(dst) == first:
            raise Killed
        rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_the_new_one_is_renamed_into_place)
    with pytest.raises(Killed):
        save(accelerator, run, 2, marker="second")
    monkeypatch.setattr(os, "rename", rename)
    kept = [p for p in (run / "checkpoints").iterdir() if (p / STATE_FILE).is_file()
            and json.loads((p / STATE_FILE).read_text())["marker"] == "first"]
    assert len(kept) == 1 and verify_manifest(kept[0]), "the saved checkpoint was deleted before the rename"
    assert resolve_resume(accelerator, run, "latest") == first, "the resume did not put the hidden checkpoint back"
    assert json.loads((first / STATE_FILE).read_text())["marker"] == "first" and verify_manifest(first)
    assert f"restored {first} from {kept[0]}" in warnings_in(capsys)[0]
    assert save(accelerator, run, 2, marker="third") == first and verify_manifest(first)
    assert json.loads((first / STATE_FILE).read_text())["marker"] == "third"


def test_a_kill_after_a_step_is_saved_again_leaves_an_old_copy_the_next_resume_removes(
        accelerator: Accelerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    save(accelerator, run, 2, marker="first")
    rmtree = shutil.rmtree

    def killed_before_the_old_copy_is_removed(path: Path, *args: object, **kwargs: object) -> None:
        if ".old-" in Path(path).name:
            raise Killed
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_before_the_old_copy_is_removed)
    with pytest.raises(Killed):
        save(accelerator, run, 2, marker="second")
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert len(list((run / "checkpoints").iterdir())) == 2, "the kill left no old copy to remove"
    assert resolve_resume(accelerator, run, "latest") == step(run, 2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert json.loads((step(run, 2) / STATE_FILE).read_text())["marker"] == "second"
    assert "removed" in warnings_in(capsys)[0]


def test_a_resume_into_another_model_is_refused_and_the_run_config_kept(train_shards: str, run_copy: Path) -> None:
    """The LayerNorm after the pool has the same parameters as before it: the weights would load and the
    run would go on training another model under the old run's name."""
    saved = (run_copy / "config.yaml").read_text()
    result = ok(resume(train_shards, run_copy, "model.final_ln_after_pool=true"), code=1)
    [line] = result.stderr.strip().splitlines()
    assert line == (f"mmggem train: error: {step(run_copy, 4)} was trained as another model "
                    f"(model.final_ln_after_pool False -> True; its run config: {run_copy / 'config.yaml'}): "
                    "resume it with its run's model settings, or give the new run its own output_dir")
    assert (run_copy / "config.yaml").read_text() == saved
