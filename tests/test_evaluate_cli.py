"""`mmggem eval`: open_clip baselines through the same code, result files, the table, the summary CSV."""
from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch

from mmggem.cli import main as cli_main
from mmggem.evaluate import evaluate_dataset
from test_evaluate_parity import (
    NAME, assert_same_metrics, classification_set, clip_benchmark_metrics, retrieval_set, spread_model,
)


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, object, object]:
    """A random open_clip ViT-Ti-4-28 saved as a plain state dict, and the model itself."""
    torch.manual_seed(21)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME)
    tokenizer = open_clip.get_tokenizer(NAME)
    spread_model(model.eval(), tokenizer, 21)
    path = tmp_path_factory.mktemp("open_clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model, preprocess, tokenizer


def test_open_clip_checkpoint_in_fp32_by_default_on_a_cpu_and_with_autocast_when_forced(
    tmp_path: Path, open_clip_checkpoint: tuple, capsys: pytest.CaptureFixture
) -> None:
    """On a CPU the default is fp32 (CLIP_benchmark with --no_amp); --amp gives CLIP_benchmark's default (bf16)."""
    weights, model, preprocess, tokenizer = open_clip_checkpoint
    root = classification_set(tmp_path / "shapes", n=21, seed=21)
    code = cli_main(["eval", "zeroshot", "--checkpoint", f"open_clip:{NAME}", "--pretrained", str(weights),
                     "--dataset", str(root), "--output", f"{tmp_path / 'results'}/", "--batch-size", "8",
                     "--num-workers", "1", "--quiet"])
    assert code == 0
    path = tmp_path / "results" / f"shapes_tiny.pt_{NAME}_en_zeroshot_classification.json"  # CLIP_benchmark's naming
    record = json.loads(path.read_text())
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language", "num_samples", "skipped",
                            "precision"]
    assert (record["dataset"], record["model"], record["pretrained"]) == ("shapes", NAME, str(weights))
    assert (record["task"], record["language"], record["num_samples"], record["skipped"], record["precision"]) == (
        "zeroshot_classification", "en", 21, {}, "fp32")
    assert_same_metrics(record["metrics"], clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=8,
                                                                  amp=False))
    out = capsys.readouterr().out
    assert f"shapes: wrote {path}" in out
    title, header, row = out.strip().splitlines()[-3:]  # one table: this task's metrics only, in %
    assert title == "zero-shot classification, %"
    assert header.split() == ["dataset", "samples", "skipped", "precision", "acc1", "acc5", "mean_per_class_recall"]
    assert row.split() == ["shapes", "21", "0", "fp32",
                           *(f"{100 * record['metrics'][k]:.1f}" for k in ("acc1", "acc5", "mean_per_class_recall"))]

    forced = tmp_path / "forced.json"
    assert cli_main(["eval", "zeroshot", "--checkpoint", f"open_clip:{NAME}", "--pretrained", str(weights),
                     "--dataset", str(root), "--output", str(forced), "--batch-size", "8", "--num-workers", "1",
                     "--quiet", "--amp", "--no-trim-text"]) == 0
    record = json.loads(forced.read_text())
    assert record["precision"] == "amp_bf16"
    assert_same_metrics(record["metrics"], clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=8,
                                                                  amp=True))


@pytest.mark.gpu  # part of the GPU self-check (python -m pytest -m gpu), deselected otherwise
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_is_the_default_on_cuda(tmp_path: Path, open_clip_checkpoint: tuple) -> None:
    _, model, preprocess, tokenizer = open_clip_checkpoint
    root = classification_set(tmp_path / "shapes", n=9, seed=3)
    result = evaluate_dataset(copy.deepcopy(model).cuda(), root, preprocess, tokenizer, device="cuda",
                              num_workers=0, progress=False)
    assert result.precision == "amp_fp16"


def test_retrieval_results_over_several_sets_and_their_summary_csv(
    tmp_path: Path, open_clip_checkpoint: tuple, capsys: pytest.CaptureFixture
) -> None:
    weights, model, preprocess, tokenizer = open_clip_checkpoint
    first, second = retrieval_set(tmp_path / "caps_a", n=9, seed=1), retrieval_set(tmp_path / "caps_b", n=7, seed=2)
    pattern = str(tmp_path / "results" / "{dataset}-{model}-{task}.json")
    code = cli_main(["eval", "retrieval", "--checkpoint", f"open_clip:{NAME}", "--pretrained", str(weights),
                     "--dataset", str(first), str(second), "--output", pattern, "--recall-k", "1", "3",
                     "--no-amp", "--num-workers", "0", "--quiet"])
    assert code == 0
    records = {}
    for root in (first, second):
        records[root.name] = json.loads((tmp_path / "results" / f"{root.name}-{NAME}-zeroshot_retrieval.json").read_text())
        reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=64, amp=False,
                                           recall_k=(1, 3))
        assert_same_metrics(records[root.name]["metrics"], reference)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-4:-2] == ["zero-shot retrieval, recall@k in % (T2I: text to image, I2T: image to text)",
                              "dataset  samples  skipped  precision  T2I@1  T2I@3  I2T@1  I2T@3"]
    for line, name in zip(printed[-2:], ("caps_a", "caps_b")):
        metrics = records[name]["metrics"]
        assert line.split() == [name, str(records[name]["num_samples"]), "0", "fp32", *(
            f"{100 * metrics[f'{way}_retrieval_recall@{k}']:.1f}" for way in ("image", "text") for k in (1, 3))]

    assert cli_main(["eval", "summary", str(tmp_path / "results"), "--output", str(tmp_path / "summary.csv")]) == 0
    assert f"wrote {tmp_path / 'summary.csv'} (2 results)" in capsys.readouterr().out
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["dataset"] for row in rows] == ["caps_a", "caps_b"]
    for row in rows:
        record = records[row["dataset"]]
        assert row["model_fullname"] == f"{NAME} {weights}" and row["skipped"] == "0"
        assert {key: float(row[key]) for key in record["metrics"]} == record["metrics"]
    assert list(rows[0])[:9] == ["dataset", "model", "pretrained", "task", "language", "num_samples", "skipped",
                                 "precision", "model_fullname"]
    assert [row["precision"] for row in rows] == ["fp32", "fp32"]


def test_summary_names_a_file_that_is_not_a_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "results").mkdir()
    assert cli_main(["eval", "summary", str(tmp_path / "results")]) == 1
    assert "no *.json result files" in capsys.readouterr().err
    (tmp_path / "results" / "a.json").write_text(json.dumps({"dataset": "x", "metrics": {}}))
    assert cli_main(["eval", "summary", str(tmp_path / "results"), "--output", str(tmp_path / "s.csv")]) == 1
    assert "a.json: not a CLIP_benchmark result, missing model, pretrained, task, language" in capsys.readouterr().err
    (tmp_path / "results" / "a.json").write_text("{not json")
    assert cli_main(["eval", "summary", str(tmp_path / "results"), "--output", str(tmp_path / "s.csv")]) == 1
    assert "a.json: not a JSON result file" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
