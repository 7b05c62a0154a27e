"""`mmggem demo`: data, training, evaluation and a table in one command."""
import json
from pathlib import Path

from conftest import run_cli

import mmggem


def test_demo_trains_evaluates_and_keeps_the_run(demo_run: Path) -> None:
    stdout = (demo_run / "stdout.txt").read_text()
    assert "wrote training shards: 7000 samples" in stdout and "trained 25 steps" in stdout
    zeroshot = json.loads((demo_run / "eval" / "zeroshot.json").read_text())
    retrieval = json.loads((demo_run / "eval" / "retrieval.json").read_text())
    for record in (zeroshot, retrieval):
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
    assert zeroshot["task"] == "zeroshot_classification" and retrieval["task"] == "zeroshot_retrieval"
    assert zeroshot["metrics"]["acc1"] > 0.2  # chance is 0.1 with ten classes
    assert f"{zeroshot['metrics']['acc1']:.4f}" in stdout  # the printed table
    assert retrieval["metrics"]["image_retrieval_recall@10"] > 10 / 1500
    records = [json.loads(line) for line in (demo_run / "run" / "results.jsonl").read_text().splitlines()]
    assert records[-1]["eval/zeroshot/acc1"] == zeroshot["metrics"]["acc1"]
    model, _, _ = mmggem.load(demo_run / "run" / "final")
    assert model.visual.pooler.p.shape == (6,)


def test_demo_rerun_reuses_the_built_data(demo_run: Path, tmp_path: Path) -> None:
    shards = sorted((demo_run / "data" / "train").glob("*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = run_cli("demo", "--output-dir", str(demo_run), "train.steps=25", "log.progress=false", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"reusing demo data in {demo_run / 'data'}" in again.stdout
    assert [p.stat().st_mtime_ns for p in shards] == stamps
