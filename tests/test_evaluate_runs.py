"""`mmggem eval` on a run's models: a run folder, any checkpoint, every checkpoint; one result file per model.

Through the command line as typed, on a real 4-step run (tests/conftest.py ``checkpointed_run``)
whose trainer evaluated the same set at steps 2 and 4: a checkpoint evaluated afterwards gives
the numbers the trainer logged at its step.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmggem.cli import main as cli_main

NAME = "ViT-Ti-4-28"


def evaluate(checkpoint: Path | str, dataset: Path, output: Path, *more: str) -> int:
    """`mmggem eval zeroshot --checkpoint CHECKPOINT --dataset DATASET --output OUTPUT ...`."""
    return cli_main(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--dataset", str(dataset),
                     "--output", str(output), "--num-workers", "1", "--quiet", *more])


def logged_evaluation(run: Path, step: int, dataset: str = "zeroshot") -> dict[str, float]:
    """The ``eval/DATASET/...`` metrics the trainer logged at ``step``."""
    prefix = f"eval/{dataset}/"
    return {key[len(prefix):]: value for line in (run / "results.jsonl").read_text().splitlines()
            for key, value in json.loads(line).items() if json.loads(line)["step"] == step and key.startswith(prefix)}


def assert_close_metrics(found: dict[str, float], expected: dict[str, float]) -> None:
    assert found.keys() == expected.keys() and found
    assert all(abs(found[key] - expected[key]) <= 1e-6 for key in expected), (found, expected)


def test_two_runs_into_one_folder_give_two_files_and_rows_and_a_collision_is_refused(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    zeroshot, _ = small_eval_sets
    second = tmp_path / "second"
    shutil.copytree(checkpointed_run, second)  # another run whose final/ folder has the same base name
    results = tmp_path / "results"
    results.mkdir()
    assert evaluate(checkpointed_run, zeroshot, results) == 0  # a run folder: its final model
    assert evaluate(second / "final", zeroshot, results) == 0
    files = {run: results / f"zeroshot_{run}_{NAME}_en_zeroshot_classification.json" for run in ("first", "second")}
    assert sorted(results.iterdir()) == sorted(files.values())
    records = {run: json.loads(path.read_text()) for run, path in files.items()}
    assert [(r["run"], r["step"], r["pretrained"]) for r in records.values()] == [
        ("first", 4, str(checkpointed_run.resolve() / "final")), ("second", 4, str(second.resolve() / "final"))]

    capsys.readouterr()
    assert cli_main(["eval", "summary", str(results), "--output", str(tmp_path / "summary.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(row["run"] for row in rows) == ["first", "second"]
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert table[0] == "acc1 in % by training step (zeroshot_classification)"
    assert [line.split()[:2] for line in table[1:]] == [["run", "dataset"], ["first", "zeroshot"],
                                                        ["second", "zeroshot"]]

    before = files["second"].read_bytes()
    assert evaluate(checkpointed_run / "final", zeroshot, files["second"]) == 1  # another model's file
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"mmggem eval: error: {files['second']} holds the zeroshot_classification result of "
                            f"{NAME} {second.resolve() / 'final'}; not writing the result of {NAME} "
                            f"{checkpointed_run.resolve() / 'final'} over it")
    assert files["second"].read_bytes() == before
    assert evaluate(second, zeroshot, files["second"], "--batch-size", "50") == 0  # the same model: replaced
    assert json.loads(files["second"].read_text())["metrics"] == records["second"]["metrics"]


def test_every_checkpoint_evaluates_as_the_trainer_did_and_summarises_against_step(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    zeroshot, _ = small_eval_sets
    results = tmp_path / "results"
    results.mkdir()
    assert evaluate(checkpointed_run, zeroshot, results, "--all-checkpoints") == 0
    records = {}
    for step in (2, 4):
        path = results / f"zeroshot_first_step_{step:08d}_{NAME}_en_zeroshot_classification.json"
        records[step] = json.loads(path.read_text())
        assert (records[step]["run"], records[step]["step"]) == ("first", step)
        assert_close_metrics(records[step]["metrics"], logged_evaluation(checkpointed_run, step))
    assert len(list(results.iterdir())) == 2
    assert records[2]["metrics"] != records[4]["metrics"]  # two different models

    capsys.readouterr()
    assert cli_main(["eval", "summary", str(results), "--output", str(tmp_path / "summary.csv")]) == 0
    out = capsys.readouterr().out
    header, row = out.split("\n\n")[0].splitlines()[1:]
    assert header.split() == ["run", "dataset", "2", "4"]
    assert row.split() == ["first", "zeroshot", *(f"{100 * records[s]['metrics']['acc1']:.1f}" for s in (2, 4))]
    assert f"wrote {tmp_path / 'summary.png'} (metric against training step)" in out
    with Image.open(tmp_path / "summary.png") as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_a_run_without_final_and_a_checkpoint_without_its_run_are_explained(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    zeroshot, _ = small_eval_sets
    unfinished = tmp_path / "unfinished"
    shutil.copytree(checkpointed_run, unfinished, ignore=shutil.ignore_patterns("final"))
    assert evaluate(unfinished, zeroshot, tmp_path) == 1
    assert capsys.readouterr().err.strip() == (
        f"mmggem eval: error: run {unfinished} has no final/ model (training has not finished); its checkpoints: "
        "step_00000002, step_00000004: pass one of them, or --all-checkpoints")
    stray = tmp_path / "stray"
    shutil.copytree(checkpointed_run / "checkpoints" / "step_00000002", stray)
    assert evaluate(stray, zeroshot, tmp_path) == 1
    assert f"{stray} is a training checkpoint, but its run's {tmp_path.parent / 'config.yaml'} is missing" in \
        capsys.readouterr().err
    damaged = unfinished / "checkpoints" / "step_00000002" / "trainer_state.json"
    damaged.write_text('{"step": ')  # cut short
    assert evaluate(damaged.parent, zeroshot, tmp_path) == 1
    assert f"error: {damaged.resolve()}: not readable JSON" in capsys.readouterr().err
    assert evaluate(checkpointed_run, zeroshot, tmp_path / "one.json", "--all-checkpoints") == 2
    assert "would give every checkpoint the same file" in capsys.readouterr().err
    assert evaluate(f"{checkpointed_run}/final", zeroshot, tmp_path, "--all-checkpoints") == 1
    assert capsys.readouterr().err.strip() == (
        f"mmggem eval: error: {checkpointed_run.resolve() / 'final'} is not a run folder: "
        f"{checkpointed_run.resolve() / 'final' / 'config.yaml'} is missing")


def test_the_runs_of_an_ablation_are_labelled_by_arm_and_seed(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An ablation writes OUT/<arm>/seed_<s>/: every arm's checkpoints go into one results folder, and the
    exported model cards are titled by arm and seed."""
    from huggingface_hub import ModelCard

    zeroshot, _ = small_eval_sets
    arms = ("ggem", "avg")
    for arm in arms:
        shutil.copytree(checkpointed_run, tmp_path / "ablation" / arm / "seed_0")
    results = tmp_path / "results"
    results.mkdir()
    for arm in arms:
        assert evaluate(tmp_path / "ablation" / arm / "seed_0", zeroshot, results, "--all-checkpoints") == 0
    found = {(r["run"], r["step"]) for r in map(json.loads, (p.read_text() for p in results.iterdir()))}
    assert found == {(f"{arm}/seed_0", step) for arm in arms for step in (2, 4)}
    assert sorted(p.name for p in results.iterdir()) == sorted(
        f"zeroshot_{arm}_seed_0_step_{step:08d}_{NAME}_en_zeroshot_classification.json" for arm in arms for step in (2, 4))
    capsys.readouterr()
    assert cli_main(["eval", "summary", str(results), "--output", str(tmp_path / "summary.csv")]) == 0
    assert sorted(row["run"] for row in csv.DictReader((tmp_path / "summary.csv").open())) == [
        "avg/seed_0", "avg/seed_0", "ggem/seed_0", "ggem/seed_0"]
    for arm in arms:
        assert cli_main(["export", str(tmp_path / "ablation" / arm / "seed_0"), str(tmp_path / f"card_{arm}")]) == 0
        card = ModelCard.load(tmp_path / f"card_{arm}" / "README.md")
        assert card.text.lstrip().startswith(f"# {arm}/seed_0\n") and card.data.model_name == f"{arm}/seed_0"
