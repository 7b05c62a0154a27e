"""`mmggem demo`: data, training, evaluation and a table in one command."""
import json
from pathlib import Path

from conftest import records, run_cli

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
    lines = stdout.splitlines()  # one table per task, values in %
    classification = lines.index("zero-shot classification, %")
    assert lines[classification + 2].split() == ["zeroshot", "1500", "0", "fp32", *(
        f"{100 * zeroshot['metrics'][k]:.1f}" for k in ("acc1", "acc5", "mean_per_class_recall"))]
    retrieval_table = lines.index("zero-shot retrieval, recall@k in % (T2I: text to image, I2T: image to text)")
    assert lines[retrieval_table + 1].split()[4:] == ["T2I@1", "T2I@5", "T2I@10", "I2T@1", "I2T@5", "I2T@10"]
    assert lines[retrieval_table + 2].split()[:4] == ["retrieval", "1500", "0", "fp32"]
    assert retrieval["metrics"]["image_retrieval_recall@10"] > 10 / 1500
    assert records(demo_run / "run")[-1]["eval/zeroshot/acc1"] == zeroshot["metrics"]["acc1"]
    model, _, _ = mmggem.load(demo_run / "run" / "final")
    assert model.visual.pooler.p.shape == (6,)


def test_demo_rerun_reuses_the_built_data(demo_run: Path, tmp_path: Path) -> None:
    shards = sorted((demo_run / "data" / "train").glob("*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = run_cli("demo", "--output-dir", str(demo_run), "train.steps=25", "log.progress=false", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"reusing demo data in {demo_run / 'data'}" in again.stdout
    assert [p.stat().st_mtime_ns for p in shards] == stamps
