"""launch/bench_train.py: the parts that need no trainer runs (FLOP count, peak table, command lines)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_train"]


@pytest.mark.parametrize("name, chip, bf16", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12),
    ("NVIDIA H200", "H200 SXM", 989.4e12),
    ("NVIDIA GH200 480GB", "GH200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA A10G", "A10G", 70e12),
    ("NVIDIA A10", "A10", 125e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA L40S", "L40S", 366e12),
])
def test_table_peak_matches_device_names(bench, name, chip, bf16):
    assert bench.table_peak(name, "bf16") == (chip, pytest.approx(bf16))


def test_table_peak_unknown_device_is_none(bench):
    assert bench.table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_vit_b16_flops_per_sample(bench, tmp_path):
    """ViT-B/16 at 224 px: 17.6 GMAC = 35.1 GFLOP image forward, 6.0 text; forward and backward about 3x."""
    args = bench.parse_args(["--model", "ViT-B-16", "--batch-size", "2", "--shards", "unused"])
    flops = bench.count_train_flops(args, tmp_path) / args.batch_size
    assert flops == pytest.approx(123.0e9, rel=0.01)


def test_flops_scale_with_the_batch(bench, tmp_path):
    args = {batch: bench.parse_args(["--batch-size", str(batch), "--shards", "unused"]) for batch in (2, 8)}
    small, large = (bench.count_train_flops(args[b], tmp_path / str(b)) for b in (2, 8))
    assert large == pytest.approx(4 * small, rel=1e-3)  # but for the loss's batch x batch logits


def test_cpu_matmul_rate_is_positive(bench):
    assert bench.matmul_rate("cpu", "fp32", 128, rounds=2) > 0


def test_cuda_bf16_command_lines(bench, tmp_path):
    args = bench.parse_args(["--device", "cuda", "--model", "ViT-B-16", "--precision", "bf16",
                             "--batch-size", "256", "--workers", "8", "--shards", "S/{0..1}.tar"])
    command = bench.open_clip_command(args, tmp_path / "ViT-B-16.json", tmp_path / "logs")
    flags = dict(zip(command[4::2], command[5::2]))
    assert (flags["--precision"], flags["--device"], flags["--batch-size"], flags["--workers"]) == (
        "amp_bf16", "cuda", "256", "8")
    assert flags["--save-frequency"] == "0"
    train = bench.mmggem_config(args, tmp_path, "cls")["train"]
    assert (train["precision"], train["batch_size"]) == ("bf16", 256)
    assert bench.child_env(2, "cuda").get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert bench.child_env(2, "cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_open_clip_knows_the_model_config(bench):
    assert bench.model_image_size("ViT-B-16") == 224
    assert bench.model_image_size("ViT-Ti-4-32") == 32


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "datasheet dense bf16 peak of the H100 SXM"),
    ("NVIDIA GeForce RTX 4090", "an 8192-square bf16 matrix product measured on the GPU"),
])
def test_cuda_peak_says_where_it_comes_from(bench, monkeypatch, name, expected):
    """The table's figure where the GPU's name is in it, else the measured matrix product; no GPU needed."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "matmul_rate", lambda *_, **__: 700e12)
    peak = bench.cuda_peak("bf16")
    assert peak.source.startswith(expected)
    assert peak.flops == pytest.approx(989.4e12 if "H100" in name else 700e12)
    assert "700.0 TFLOP/s" in peak.source
