"""FSDP2 training on 2 real CPU processes (gloo), through the shipped launch/accelerate/fsdp.yaml.

The parameters really are sharded (the trainer reports DTensors and each process holds about
half of the elements; the checkpoint holds one shard file per process); the run equals a DDP run
of the same steps (losses, evaluation and final weights within 1e-5); stop and resume give the
uninterrupted run; final/ is a plain model that mmggem.load reads; and the sharded checkpoint,
evaluated directly or exported, is that same model.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import evaluations, launch_config, ok, two_process_args
from safetensors.torch import load_file
from test_evaluate_runs import assert_close_metrics, evaluate, logged_evaluation
from test_train import assert_same_run, losses

import mmggem
from mmggem.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def fsdp_cli(*args: str) -> subprocess.CompletedProcess:
    """The shipped config as is (bf16); ``train.precision=no`` wins, for a comparison with fp32 DDP."""
    return launch_config(ROOT / "launch" / "accelerate" / "fsdp.yaml", *args, "train.precision=no", processes=2)


@pytest.fixture(scope="module")
def fsdp_run(train_shards: str, small_eval_sets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, subprocess.CompletedProcess]:
    """One 6-step FSDP run on 2 processes (a sharded checkpoint at step 6) with the arguments of conftest's
    ``two_process_run`` (the DDP run it must equal), and how its launch ended."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    return out, ok(fsdp_cli(*two_process_args(train_shards, small_eval_sets[0], out)))


def test_fsdp_shards_trains_like_ddp_resumes_and_exports(train_shards: str, small_eval_sets: tuple[Path, Path],
                                                         fsdp_run: tuple[Path, subprocess.CompletedProcess],
                                                         two_process_run: Path, tmp_path: Path) -> None:
    zeroshot, _ = small_eval_sets
    args = lambda out, *more: two_process_args(train_shards, zeroshot, out, *more)  # noqa: E731
    whole, result = fsdp_run
    assert "precision: train.precision=no wins over the launcher's bf16" in result.stdout
    summary = re.search(r"model: ([\d,]+) parameter elements; FSDP2: (\d+) of (\d+) parameters are DTensors sharded "
                        r"over 2 processes, process 0 holds ([\d,]+) elements", result.stdout)
    assert summary, result.stdout[-2000:]
    total, local = int(summary[1].replace(",", "")), int(summary[4].replace(",", ""))
    assert summary[2] == summary[3] and 0.4 * total < local < 0.6 * total
    shards = sorted(p.name for p in (whole / "checkpoints" / "step_00000006").glob("pytorch_model_fsdp_0/*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]

    assert_same_run(two_process_run, whole, atol=1e-5)
    ddp_eval, fsdp_eval = evaluations(two_process_run), evaluations(whole)
    assert set(ddp_eval) == set(fsdp_eval) and {step for step, _ in ddp_eval} == {3, 6} and len(ddp_eval) >= 6
    assert all(abs(ddp_eval[key] - fsdp_eval[key]) <= 1e-5 for key in ddp_eval)

    split = tmp_path / "split"
    ok(fsdp_cli(*args(split, "train.stop_at_step=4")))
    ok(fsdp_cli(*args(split, "train.resume=latest")))
    assert_same_run(whole, split, atol=1e-6)
    assert len(losses(split)) == 6

    model, _, tokenizer = mmggem.load(whole / "final")
    assert model.logit_scale.shape == () and model.visual.pooler.p.shape == (6,)
    assert model.encode_text(tokenizer(["a photo of colour 1"])).shape == (1, 128)


def test_a_sharded_checkpoint_evaluates_and_exports_as_the_model_it_is(
    fsdp_run: tuple[Path, subprocess.CompletedProcess], small_eval_sets: tuple[Path, Path], tmp_path: Path
) -> None:
    """The shards of step 6, read in one process, are final/ (which the trainer gathered from the live model)."""
    zeroshot, _ = small_eval_sets
    run, _ = fsdp_run
    checkpoint = run / "checkpoints" / "step_00000006"
    out = tmp_path / "exported"
    assert cli_main(["export", str(checkpoint), str(out)]) == 0
    exported = load_file(str(out / "open_clip_model.safetensors"))
    final = load_file(str(run / "final" / "open_clip_model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)

    for name, model in (("direct", checkpoint), ("export", out)):
        (tmp_path / name).mkdir()
        assert evaluate(model, zeroshot, tmp_path / name) == 0
    [direct], [export] = (list((tmp_path / name).iterdir()) for name in ("direct", "export"))
    metrics = json.loads(direct.read_text())["metrics"]
    assert json.loads(export.read_text())["metrics"] == metrics
    assert_close_metrics(metrics, logged_evaluation(run, 6))
