"""`hf-hub:` names and open_clip tags through huggingface_hub's cache, offline: mmggem models with their
pooling, plain open_clip repos and tagged baselines, in `mmggem.load`, `model.pretrained` and `mmggem eval`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
from conftest import hub_cache, run_cli
from test_evaluate_parity import NAME, assert_same_metrics, classification_set, spread_model
from test_open_clip_view import trained_like
from test_train import final_weights, ok, train_args

import mmggem
from mmggem.cli import main as cli_main
from mmggem.errors import MissingPathError
from mmggem.model.clip import CONFIG_FILE


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (the constant it sets from the environment at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_an_mmggem_repo_loads_with_its_pooling_in_load_and_as_pretrained(tmp_path: Path, offline: None) -> None:
    model = trained_like("ggem")
    hub_cache(tmp_path / "cache", "someone/ggem-tiny", mmggem.save_model(model, tmp_path / "model"))
    loaded = mmggem.load("hf-hub:someone/ggem-tiny", cache_dir=tmp_path / "cache")[0]
    assert loaded.mmggem_spec.pooling == "ggem"
    assert_same_weights(loaded, model)
    started = mmggem.create_model(NAME, pooling="ggem", pretrained="hf-hub:someone/ggem-tiny",
                                  cache_dir=tmp_path / "cache")
    assert_same_weights(started, model)  # the learned p of every group included


def test_a_run_starts_from_an_mmggem_repo_with_its_learned_pooler(train_shards: str, tmp_path: Path) -> None:
    model = trained_like("ggem")
    hub_cache(tmp_path / "cache", "someone/ggem-start", mmggem.save_model(model, tmp_path / "model"))
    out = tmp_path / "run"
    ok(run_cli(*train_args(train_shards, out, "model.pooling=ggem", "model.pretrained=hf-hub:someone/ggem-start",
                           f"model.cache_dir={tmp_path / 'cache'}", "model.lock_image=true", "model.lock_text=true",
                           "model.lock_pooler=true", "train.steps=1"), HF_HUB_OFFLINE="1"))
    after, before = final_weights(out), model.state_dict()
    assert torch.equal(after["visual.pooler.p"], before["visual.pooler.p"])  # the repo's p, not a fresh one
    assert torch.equal(after["visual.conv1.weight"], before["visual.conv1.weight"])


def test_a_repo_missing_from_the_cache_names_the_repo_and_the_cache(tmp_path: Path, offline: None) -> None:
    with pytest.raises(MissingPathError) as error:
        mmggem.load("hf-hub:someone/absent", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "hf-hub:someone/absent" in message and str(tmp_path / "cache") in message
    assert "hf download someone/absent" in message


def evaluate(tmp_path: Path, root: Path, label: str, *args: str) -> dict:
    output = tmp_path / f"{label}.json"
    assert cli_main(["eval", "zeroshot", *args, "--dataset", str(root), "--output", str(output),
                     "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8", "--num-workers", "1",
                     "--quiet"]) == 0
    return json.loads(output.read_text())


def test_eval_of_hub_repos_and_hub_baselines_equals_eval_of_the_folder(tmp_path: Path, offline: None) -> None:
    model = trained_like("cls")
    spread_model(model, mmggem.model.clip.get_tokenizer(model), 4)
    folder = mmggem.save_model(model, tmp_path / "model")
    hub_cache(tmp_path / "cache", "someone/mmggem-cls", folder)
    plain = shutil.copytree(folder, tmp_path / "plain")  # an open_clip model repo: no mmggem section
    config = json.loads((plain / CONFIG_FILE).read_text())
    del config["mmggem"]
    (plain / CONFIG_FILE).write_text(json.dumps(config))
    hub_cache(tmp_path / "cache", "someone/open-clip-tiny", plain)
    root = classification_set(tmp_path / "shapes", n=21, seed=4)

    reference = evaluate(tmp_path, root, "folder", "--checkpoint", str(folder))
    runs = {
        "mmggem": ["--checkpoint", "hf-hub:someone/mmggem-cls"],
        "open_clip": ["--checkpoint", "hf-hub:someone/open-clip-tiny"],
        "baseline": ["--checkpoint", f"open_clip:{NAME}", "--pretrained", "hf-hub:someone/open-clip-tiny"],
    }
    records = {label: evaluate(tmp_path, root, label, *args) for label, args in runs.items()}
    assert [(r["model"], r["pretrained"]) for r in records.values()] == [
        (NAME, "hf-hub:someone/mmggem-cls"), ("hf-hub:someone/open-clip-tiny", "hf-hub:someone/open-clip-tiny"),
        (NAME, "hf-hub:someone/open-clip-tiny")]
    assert reference["metrics"]["acc1"] not in (0.0, 1.0)  # the predictions depend on the weights
    for record in records.values():
        assert_same_metrics(record["metrics"], reference["metrics"])


def test_an_open_clip_baseline_by_tag_evaluates_from_the_filled_cache(tmp_path: Path, offline: None) -> None:
    tag, repo = "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # open_clip's source of that tag
    torch.manual_seed(0)
    weights = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()},
              str(weights))
    cached = hub_cache(tmp_path / "cache", repo, weights) / weights.name
    root = classification_set(tmp_path / "shapes", n=12, seed=5)
    by_tag = evaluate(tmp_path, root, "tag", "--checkpoint", "open_clip:ViT-B-32", "--pretrained", tag)
    by_file = evaluate(tmp_path, root, "file", "--checkpoint", "open_clip:ViT-B-32", "--pretrained", str(cached))
    assert (by_tag["model"], by_tag["pretrained"]) == ("ViT-B-32", tag)
    assert_same_metrics(by_tag["metrics"], by_file["metrics"])
