"""`mmggem export`: an intermediate checkpoint becomes a Hub-ready folder that loads and evaluates as itself.

The card is read back with huggingface_hub's own ModelCard; the push goes through huggingface_hub
to an endpoint that refuses the connection, as a machine without network would, and the folder,
placed in huggingface_hub's cache layout, loads as ``hf-hub:ORG/NAME``.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import hub_cache, run_cli
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_evaluate_runs import NAME, assert_close_metrics, evaluate, logged_evaluation

import mmggem
from mmggem.cli import main as cli_main


def test_an_intermediate_checkpoint_exports_loads_and_evaluates_as_itself(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path
) -> None:
    zeroshot, _ = small_eval_sets
    checkpoint = checkpointed_run / "checkpoints" / "step_00000002"
    direct, exported = tmp_path / "direct", tmp_path / "exported"
    direct.mkdir()
    exported.mkdir()
    assert evaluate(checkpoint, zeroshot, direct) == 0
    out = tmp_path / "tiny-ggem"
    assert cli_main(["export", str(checkpoint), str(out), "--results", str(direct), "--license", "mit"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                      "open_clip_model.safetensors"]

    model, _, _ = mmggem.load(out)
    saved = load_file(str(checkpoint / "model.safetensors"))  # accelerate's own file of the checkpoint
    weights = model.state_dict()
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    final = load_file(str(checkpointed_run / "final" / "open_clip_model.safetensors"))
    assert not torch.equal(final["visual.pooler.p"], saved["visual.pooler.p"])  # step 2 is not the final model

    assert evaluate(out, zeroshot, exported) == 0
    [direct_file] = direct.iterdir()
    [exported_file] = exported.iterdir()
    assert exported_file.name == f"zeroshot_tiny-ggem_{NAME}_en_zeroshot_classification.json"
    metrics = json.loads(direct_file.read_text())["metrics"]
    assert json.loads(exported_file.read_text())["metrics"] == metrics
    assert_close_metrics(metrics, logged_evaluation(checkpointed_run, 2))

    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.license, card.data.pipeline_tag) == (
        "mmggem", "mit", "zero-shot-image-classification")  # GGeM: open_clip cannot load it
    assert {"mmggem", "pooling-ggem", NAME} <= set(card.data.tags)
    logged = logged_evaluation(checkpointed_run, 2)
    found = [(r.task_type, r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results]
    expected = [("zero-shot-image-classification", "zeroshot", metric, value) for metric, value in sorted(logged.items())]
    expected += [("zero-shot-image-classification", "zeroshot", metric, value) for metric, value in sorted(metrics.items())]
    assert found == expected  # what the run logged at step 2, then the result file of this checkpoint
    assert f"| {direct_file.name} |" in card.text
    p = model.visual.pooler.p.detach().clamp(min=1.0).tolist()
    assert re.findall(r"^\| (\d+) \| ([\d.]+) \|$", card.text, re.M) == [(str(g), f"{v:.4f}") for g, v in enumerate(p)]
    assert "- optimizer steps: 2\n- samples seen: 16\n- batch size per process: 8\n- processes: 1" in card.text


def test_push_without_network_fails_in_one_line_and_leaves_the_folder(checkpointed_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "pushed"
    result = run_cli("export", str(checkpointed_run), str(out), "--push-to-hub", "someone/tiny-ggem",
                     HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_used")  # port 9: connection refused
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout == f"exported {checkpointed_run} to {out}\n"
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("mmggem export: error: could not push") and "someone/tiny-ggem" in line
    assert line.endswith(f"the exported folder is left in place: push it later with `hf upload someone/tiny-ggem {out}`")
    model, _, _ = mmggem.load(out)
    final = load_file(str(checkpointed_run / "final" / "open_clip_model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    assert 'mmggem.load("hf-hub:someone/tiny-ggem")' in ModelCard.load(out / "README.md").text

    # pushed later, then downloaded: the folder in huggingface_hub's cache layout loads by its hf-hub: name
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_cache(tmp_path / "cache", "someone/tiny-ggem", out)
    hub_model, _, _ = mmggem.load("hf-hub:someone/tiny-ggem", cache_dir=tmp_path / "cache")
    assert all(torch.equal(hub_model.state_dict()[k], final[k]) for k in final)


def test_export_refuses_a_folder_that_is_not_empty(checkpointed_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert cli_main(["export", str(checkpointed_run), str(tmp_path)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_export_names_the_line_of_a_damaged_results_log(checkpointed_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A damaged line inside the log is named; a last line cut short by a crash is dropped with a warning
    (a resume would drop it too), and the export goes on without it."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    intact = (run / "results.jsonl").read_text()
    lines = intact.splitlines()
    (run / "results.jsonl").write_text("\n".join([*lines[:-1], '{"step": 4, "eval/', lines[-1]]) + "\n")
    assert cli_main(["export", str(run), str(tmp_path / "out")]) == 1
    assert f"{run / 'results.jsonl'}, line {len(lines)}: not a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (run / "results.jsonl").write_text(intact + '{"step": 4, "eval/')  # a crash in the middle of an append
    with caplog.at_level(logging.WARNING):
        assert cli_main(["export", str(run), str(tmp_path / "out")]) == 0
    assert f"{run / 'results.jsonl'}, line {len(lines) + 1}: a record cut short" in caplog.text


def test_a_checkpoint_changed_after_it_was_written_is_refused_by_export_and_eval(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One bit of the weights flipped where safetensors still reads them: without the manifest check
    the export and the evaluation would be of a silently different model."""
    zeroshot, _ = small_eval_sets
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_00000002"
    shutil.copytree(checkpointed_run / "checkpoints" / checkpoint.name, checkpoint)
    shutil.copy(checkpointed_run / "config.yaml", run / "config.yaml")
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    damaged, original = load_file(str(weights)), load_file(str(checkpointed_run / "checkpoints" / checkpoint.name /
                                                                weights.name))
    assert damaged.keys() == original.keys()  # still a readable file of the same tensors, one of them changed
    assert sum(not torch.equal(damaged[key], original[key]) for key in original) == 1
    expected = f"error: {weights.resolve()}: content differs from the manifest"

    assert cli_main(["export", str(checkpoint), str(tmp_path / "exported")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mmggem export: {expected}") and line.endswith("changed after it was written")
    assert not (tmp_path / "exported").exists()
    assert evaluate(checkpoint, zeroshot, tmp_path / "results") == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mmggem eval: {expected}")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("pooling", "library"), [("avg", "open_clip"), ("cls", "open_clip"), ("ggem", "mmggem"),
                                                  ("gem", "mmggem")])
def test_the_card_names_open_clip_only_for_models_open_clip_loads(pooling: str, library: str, tmp_path: Path) -> None:
    import open_clip

    from mmggem.share.model_card import model_card
    from mmggem.checkpoint.runs import ModelSource

    folder = mmggem.save_model(mmggem.create_model(NAME, pooling=pooling), tmp_path / pooling)
    card = model_card(mmggem.load(folder)[0], ModelSource(folder), [], "mit")
    assert card.data.library_name == library
    assert ("open_clip" in card.data.tags) == (library == "open_clip")
    if library == "open_clip":
        open_clip.create_model(f"local-dir:{folder}")
    else:
        with pytest.raises(TypeError, match="needs mmggem"):
            open_clip.create_model(f"local-dir:{folder}")


def test_eval_and_export_of_a_checkpoint_without_a_manifest_warn_as_resume_does(
    checkpointed_run: Path, small_eval_sets: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from mmggem.checkpoint.store import unverified_message

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_00000002"
    shutil.copytree(checkpointed_run / "checkpoints" / checkpoint.name, checkpoint)
    shutil.copy(checkpointed_run / "config.yaml", run / "config.yaml")
    (checkpoint / "manifest.json").unlink()  # as written before manifests existed
    warning = f"WARNING: {unverified_message(checkpoint.resolve())}"
    assert warning == (f"WARNING: {checkpoint.resolve()} has no manifest.json (written before mmggem verified "
                       "checkpoints): its files are not checked")
    capsys.readouterr()
    assert cli_main(["export", str(checkpoint), str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().err.splitlines() == [warning]
    assert evaluate(checkpoint, small_eval_sets[0], tmp_path / "results.json") == 0
    assert capsys.readouterr().err.splitlines() == [warning]


def test_export_of_an_unfinished_run_names_its_checkpoints_and_no_option_it_lacks(
    checkpointed_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(checkpointed_run, unfinished, ignore=shutil.ignore_patterns("final"))
    assert cli_main(["export", str(unfinished), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"mmggem export: error: run {unfinished} has no final/ model (training has not finished); its checkpoints: "
        "step_00000002, step_00000004: pass one of them")
