"""Evaluation split over a real 2-process gloo group gives exactly the numbers of one process.

This file, run as a script under ``accelerate launch --multi_gpu --num_processes 2``
with ``ACCELERATE_USE_CPU=true`` (a real 2-process CPU group), is each process. It runs
both paths in one launch (a launch costs seconds on a small machine):

- the trainer's path: ``evaluate_dataset(..., accelerator=...)`` on a model the
  accelerator has wrapped in DDP, in train mode;
- the command line, ``mmggem eval zeroshot`` on two sets at once (``mmggem.cli.main``,
  what ``accelerate launch -m mmggem.cli eval ...`` runs).

The sets have odd sizes and an image that fails to decode, so the processes' blocks
differ in size and the skipped sample must be counted once.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import mmggem
from conftest import ACCELERATE, cpu_env, free_port
from mmggem.cli import main as cli_main
from mmggem.evaluate import evaluate_dataset
from test_evaluate_parity import (
    CLASSNAMES, TEMPLATES, classification_samples, retrieval_samples, tiny_model, write_set,
)

CORRUPT = b"these bytes are not an image"


def launch_two_processes(*args: str) -> subprocess.CompletedProcess:
    """Run the script ``args`` as 2 CPU processes (as conftest's ``accelerate_cli``); fail with their output."""
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def sets_with_a_corrupt_image(root: Path) -> dict[str, Path]:
    """A 7-class set (2 shards, 41 samples, one undecodable), a 3-class set (17) and a retrieval set (21, one bad)."""
    seven = classification_samples(41, 7, seed=5)
    seven[12]["png" if "png" in seven[12] else "jpg"] = CORRUPT
    retrieval = retrieval_samples(21, seed=6)
    retrieval[3]["png"] = CORRUPT
    return {
        "seven": write_set(root / "seven", [seven[:30], seven[30:]], dataset_type="classification",
                           classnames=CLASSNAMES, templates=TEMPLATES),
        "three": write_set(root / "three", [classification_samples(17, 3, seed=7)], dataset_type="classification",
                           classnames=CLASSNAMES[:3], templates=TEMPLATES),
        "captions": write_set(root / "captions", [retrieval[:10], retrieval[10:]], dataset_type="retrieval"),
    }


def zeroshot_command(checkpoint: Path, sets: dict[str, Path], output: Path) -> list[str]:
    """``mmggem eval zeroshot`` on the two classification sets at once, in full precision."""
    return ["eval", "zeroshot", "--checkpoint", str(checkpoint), "--dataset", str(sets["seven"]), str(sets["three"]),
            "--output", str(output / "{dataset}.json"), "--batch-size", "8", "--num-workers", "1", "--no-amp",
            "--quiet"]


def test_two_processes_give_the_numbers_of_one(tmp_path: Path) -> None:
    sets = sets_with_a_corrupt_image(tmp_path / "sets")
    model, preprocess, tokenizer = tiny_model(8)
    checkpoint = mmggem.save_model(model, tmp_path / "model")
    result = launch_two_processes(__file__, str(checkpoint), str(tmp_path / "two"), *map(str, sets.values()))

    # the command line: one result file per set, written and announced by the main process alone
    assert cli_main(zeroshot_command(checkpoint, sets, tmp_path / "one")) == 0
    assert result.stdout.count("wrote") == 2
    assert sorted(p.name for p in (tmp_path / "two" / "cli").iterdir()) == ["seven.json", "three.json"]
    for name in ("seven", "three"):
        two = json.loads((tmp_path / "two" / "cli" / f"{name}.json").read_text())
        assert two == json.loads((tmp_path / "one" / f"{name}.json").read_text())
        assert (two["dataset"], two["task"], two["model"]) == (name, "zeroshot_classification", "ViT-Ti-4-28")
    seven = json.loads((tmp_path / "two" / "cli" / "seven.json").read_text())
    assert seven["num_samples"] == 40 and seven["skipped"] == {"corrupt_image": 1}
    assert set(seven["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}

    # the trainer's path: every process returns the one-process result, the model goes back to train mode
    for name in ("seven", "captions"):
        alone = evaluate_dataset(model, sets[name], preprocess, tokenizer, batch_size=8, num_workers=0, amp=False,
                                 progress=False)
        for rank in (0, 1):
            got = json.loads((tmp_path / "two" / f"{name}.rank{rank}.json").read_text())
            assert got == {"metrics": alone.metrics, "num_samples": alone.num_samples, "skipped": alone.skipped,
                           "task": alone.task, "wrapped": True, "training_after": True}
    assert alone.task == "zeroshot_retrieval" and alone.skipped == {"corrupt_image": 1}


def run_worker(checkpoint: str, out: str, seven: str, three: str, captions: str) -> None:
    """One of the two processes: the trainer's path with a DDP-wrapped model in train mode, then the CLI."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator()
    model, preprocess, tokenizer = mmggem.load(checkpoint)
    model.train()
    prepared = accelerator.prepare(model)
    for root in (seven, captions):
        result = evaluate_dataset(prepared, root, preprocess, tokenizer, batch_size=8, num_workers=1,
                                  accelerator=accelerator, amp=False, progress=False)
        record = {"metrics": result.metrics, "num_samples": result.num_samples, "skipped": result.skipped,
                  "task": result.task, "wrapped": prepared is not model, "training_after": prepared.training}
        path = Path(out) / f"{Path(root).name}.rank{accelerator.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    sets = {"seven": Path(seven), "three": Path(three)}
    if cli_main(zeroshot_command(Path(checkpoint), sets, Path(out) / "cli")) != 0:
        raise SystemExit("mmggem eval zeroshot failed")


if __name__ == "__main__":
    run_worker(*sys.argv[1:])
