"""The GPU self-check: what only a CUDA device can show. Run with ``python -m pytest -m gpu``.

Deselected from the default run (``-m "not gpu"`` in pyproject.toml) and skipped, never passed,
where torch sees no CUDA device. Each test drives the public CLI or API on the GPU, as a user would.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs
from conftest import ACCELERATE, PYTHON, ok, records, train_args
from test_nonfinite import fp16_state, run, updates  # noqa: F401 - fp16_state is a fixture
from test_evaluate_parity import assert_same_metrics, classification_set, clip_benchmark_metrics, tiny_model
from test_train import assert_same_run, final_weights, losses

import mmggem
from mmggem.data.device import DeviceNormalizer, split_transform, to_device
from mmggem.data.loader import TrainLoader
from mmggem.evaluate import evaluate_dataset
from mmggem.model.clip import get_tokenizer, image_transform

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parent.parent


def gpu_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("ACCELERATE_USE_CPU", "CUDA_VISIBLE_DEVICES")}
    return {**env, "CUDA_VISIBLE_DEVICES": "0", "WANDB_SILENT": "true", **extra}


def gpu_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mmggem", *args], capture_output=True, text=True, env=gpu_env(**env),
                          timeout=600)


def test_bf16_training_stays_close_to_fp32(train_shards: str, tmp_path: Path) -> None:
    ok(gpu_cli(*train_args(train_shards, tmp_path / "fp32", "train.steps=6", "train.tf32=false")))
    ok(gpu_cli(*train_args(train_shards, tmp_path / "bf16", "train.steps=6", "train.precision=bf16")))
    fp32, bf16 = torch.tensor(losses(tmp_path / "fp32")), torch.tensor(losses(tmp_path / "bf16"))
    assert torch.isfinite(bf16).all() and len(bf16) == 6
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)
    model, _, _ = mmggem.load(tmp_path / "bf16" / "final")
    assert type(model.visual.pooler).__name__ == "GGeM"


def test_compiled_training_matches_eager(train_shards: str, tmp_path: Path) -> None:
    ok(gpu_cli(*train_args(train_shards, tmp_path / "eager", "train.steps=4", "train.tf32=false")))
    ok(gpu_cli(*train_args(train_shards, tmp_path / "compiled", "train.steps=4", "train.tf32=false",
                           "model.compile=true")))
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", atol=1e-3)


def test_batches_are_pinned_copied_without_blocking_and_normalised_on_the_gpu(train_shards: str) -> None:
    model = mmggem.create_model("ViT-Ti-4-28", pooling="ggem")
    full = image_transform(model, is_train=True)
    uint8, normalization = split_transform(full)
    loader = TrainLoader(train_shards, transform=uint8, tokenizer=get_tokenizer(model), batch_size=8, num_workers=1,
                         seed=0, resampled=True, shuffle_buffer=10, rank=0, world_size=1, pin_memory=True)
    images, tokens = next(iter(loader))
    assert images.dtype == torch.uint8 and images.is_pinned() and tokens.is_pinned()
    cuda = torch.device("cuda")
    on_gpu, tokens_on_gpu = to_device(images, tokens, cuda, DeviceNormalizer(normalization, cuda))
    on_cpu, _ = to_device(images, tokens, torch.device("cpu"), DeviceNormalizer(normalization, "cpu"))
    assert on_gpu.device.type == "cuda" and tokens_on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_steps_between_log_steps_read_nothing_from_the_gpu(train_shards: str, tmp_path: Path, precision: str) -> None:
    worker = Path(__file__).with_name("train_reads_worker.py")
    command = [PYTHON, str(worker), str(tmp_path / "reads.json"), str(ROOT / "configs" / "demo.yaml"),
               *train_args(train_shards, tmp_path / "run", "train.steps=9", "log.every=4",
                           f"train.precision={precision}")[2:]]
    ok(subprocess.run(command, capture_output=True, text=True, env=gpu_env(), cwd=worker.parent, timeout=600))
    reads = {int(k): v for k, v in json.loads((tmp_path / "reads.rank0.json").read_text())["reads"].items()}
    quiet = [step for step in range(1, 9) if step % 4]
    assert {step: reads[step] for step in quiet} == {step: [] for step in quiet}
    assert reads[4] and reads[8]  # the log steps do read (the counter sees device-to-host copies)
    logged = records(tmp_path / "run")
    assert logged[0]["run/precision"] == precision
    assert all(("train/scaler_skips" in record) == (precision == "fp16") for record in logged)


def test_fp16_overflows_on_the_gpu_are_scaler_skips_not_divergence(fp16_state: None) -> None:
    """accelerate's own CUDA GradScaler and fp16 autocast, the scale started high enough to overflow."""
    accelerator = Accelerator(kwargs_handlers=[GradScalerKwargs(init_scale=2.0 ** 24, growth_interval=10_000)])
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is not None
    losses, nonfinite, optimizer = run(accelerator, 40)
    counts = nonfinite.read()
    skips = round(math.log2(2.0 ** 24 / accelerator.scaler.get_scale()))
    assert counts.scaler_skips == skips and 5 <= skips < 40
    assert (counts.total, counts.longest_streak) == (0, 0) and updates(optimizer) == 40 - skips
    assert torch.isfinite(losses).all()


def test_fsdp_config_trains_on_one_gpu(train_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    command = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "accelerate" / "fsdp.yaml"),
               "--num_processes", "1", "-m", "mmggem", *train_args(train_shards, out, "train.steps=4")]
    ok(subprocess.run(command, capture_output=True, text=True, env=gpu_env(), timeout=600))
    assert len(losses(out)) == 4 and final_weights(out)
    model, _, _ = mmggem.load(out / "final")
    assert model.visual.pooler.p.shape == (6,)


def test_bf16_evaluation_equals_clip_benchmark_on_the_gpu(tmp_path: Path) -> None:
    model, preprocess, tokenizer = tiny_model(0)
    model = model.cuda()
    root = classification_set(tmp_path / "shapes", seed=0)
    ours = evaluate_dataset(model, root, preprocess, tokenizer, batch_size=16, num_workers=0, device="cuda",
                            amp=True, progress=False)
    reference = clip_benchmark_metrics(model, root, preprocess, tokenizer, batch_size=16, amp=True, device="cuda")
    assert_same_metrics(ours.metrics, reference)
