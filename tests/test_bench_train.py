"""The trainer benchmarks of launch/ (bench_train, bench_mfu, bench_ggem_*, benchlib): what needs no long runs."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "bench"


@pytest.fixture(scope="module")
def launch():
    """The launch/ scripts as modules, imported the way they import each other (from their folder)."""
    sys.path.insert(0, str(LAUNCH))
    names = ("benchlib", "bench_mfu", "bench_train", "bench_ggem_step")
    yield type("Launch", (), {name: importlib.import_module(name) for name in names})
    sys.path.remove(str(LAUNCH))
    for name in names:
        del sys.modules[name]


def run_args(launch, *extra: str):
    return launch.bench_train.parse_args(["--peer-python", "PEER", "--shards", "unused", *extra])


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
def test_table_peak_matches_device_names(launch, name, chip, bf16):
    assert launch.bench_mfu.table_peak(name, "bf16") == (chip, pytest.approx(bf16))


def test_table_peak_unknown_device_is_none(launch):
    assert launch.bench_mfu.table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_vit_b16_flops_per_sample(launch, tmp_path):
    """ViT-B/16 at 224 px: 17.6 GMAC = 35.1 GFLOP image forward, 6.0 text; forward and backward about 3x."""
    args = run_args(launch, "--model", "ViT-B-16", "--batch-size", "2")
    flops = launch.bench_mfu.count_train_flops(args, tmp_path) / args.batch_size
    assert flops == pytest.approx(123.0e9, rel=0.01)


def test_flops_scale_with_the_batch(launch, tmp_path):
    args = {batch: run_args(launch, "--batch-size", str(batch)) for batch in (2, 8)}
    small, large = (launch.bench_mfu.count_train_flops(args[b], tmp_path / str(b)) for b in (2, 8))
    assert large == pytest.approx(4 * small, rel=1e-3)  # but for the loss's batch x batch logits


def test_matmul_rate_is_the_flops_of_the_best_round(launch, monkeypatch):
    """Rounds that take 0.4, 0.2 and 0.3 s on the clock: the rate is 2 n^3 x products over the best, 0.2 s."""
    ticks = iter([0.0, 0.4, 1.0, 1.2, 2.0, 2.3])
    monkeypatch.setattr(launch.benchlib.time, "perf_counter", lambda: next(ticks))
    rate = launch.bench_mfu.matmul_rate("cpu", "fp32", 64, rounds=3, per_round=2)
    assert rate == pytest.approx(2 * 64 ** 3 * 2 / 0.2)


def test_cpu_matmul_rate_is_a_real_machine_rate(launch):
    """Between 1 GFLOP/s (any CPU of the last decade, even loaded) and 100 TFLOP/s (no CPU reaches it)."""
    assert 1e9 < launch.bench_mfu.matmul_rate("cpu", "fp32", 256, rounds=2) < 1e14


def test_cuda_bf16_command_lines(launch, tmp_path):
    args = launch.bench_train.parse_args(["--peer-python", "PEER", "--device", "cuda", "--model", "ViT-B-16",
                                          "--precision", "bf16", "--batch-size", "256", "--workers", "8",
                                          "--shards", "S/{0..1}.tar"])
    command = launch.bench_train.open_clip_command(args, tmp_path / "ViT-B-16.json", tmp_path / "logs")
    assert command[0] == "PEER"
    flags = dict(zip(command[4::2], command[5::2]))
    assert (flags["--precision"], flags["--device"], flags["--batch-size"], flags["--workers"]) == (
        "amp_bf16", "cuda", "256", "8")
    assert flags["--save-frequency"] == "0"
    train = launch.benchlib.mmggem_config(args, tmp_path, "cls")["train"]
    assert (train["precision"], train["batch_size"]) == ("bf16", 256)
    assert launch.benchlib.child_env(2, "cuda").get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert launch.benchlib.child_env(2, "cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_peer_python_is_an_argument(launch, capsys):
    with pytest.raises(SystemExit):
        launch.bench_train.parse_args(["--shards", "unused"])
    assert "--peer-python" in capsys.readouterr().err


def test_open_clip_knows_the_model_config(launch):
    assert launch.benchlib.model_image_size("ViT-B-16") == 224
    assert launch.benchlib.model_image_size("ViT-Ti-4-32") == 32


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "datasheet dense bf16 peak of the H100 SXM"),
    ("NVIDIA GeForce RTX 4090", "an 8192-square bf16 matrix product measured on the GPU"),
])
def test_cuda_peak_says_where_it_comes_from(launch, monkeypatch, name, expected):
    """The table's figure where the GPU's name is in it, else the measured matrix product; no GPU needed."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(launch.bench_mfu, "matmul_rate", lambda *_, **__: 700e12)
    peak = launch.bench_mfu.cuda_peak("bf16")
    assert peak.source.startswith(expected)
    assert peak.flops == pytest.approx(989.4e12 if "H100" in name else 700e12)
    assert "700.0 TFLOP/s" in peak.source


def test_windows_of_an_mmggem_run_cover_its_steps(launch, demo_run):
    """The one log parser on a real results.jsonl (the demo fixture: 25 steps, a record every 5)."""
    log = demo_run / "run" / "results.jsonl"
    records = [r for r in map(json.loads, log.read_text().splitlines()) if "perf/samples_per_s" in r]
    batch = yaml.safe_load((demo_run / "run" / "config.yaml").read_text())["train"]["batch_size"]
    windows = launch.benchlib.read_windows(log, batch)
    assert [(w.first, w.last) for w in windows] == [(s - 4, s) for s in range(5, 26, 5)] == \
        [(r["step"] - 4, r["step"]) for r in records]
    rates = [r["perf/samples_per_s"] for r in records[1:]]
    assert min(rates) <= launch.benchlib.steady_rate(windows, 5, batch) <= max(rates)


def test_windows_of_an_open_clip_train_log(launch, tmp_path):
    """open_clip_train's progress line (its train.py format, samples seen then the window's mean step time)."""
    def line(seen: int, step_seconds: float) -> str:
        return (f"2026-01-01,00:00:00 | INFO | Train Epoch: 0 [{seen:>5}/6400 ({100 * seen / 6400:.0f}%)] "
                f"Data (t): 0.010 Batch (t): {step_seconds:.3f}, {64 / step_seconds:#g}/s, "
                f"{64 / step_seconds:#g}/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 4.1 (4.1) Loss: 4.1")
    log = tmp_path / "out.log"
    log.write_text("\n".join([line(64, 0.9), "a line in between", line(704, 0.5), line(1344, 0.7)]))
    windows = launch.benchlib.read_windows(log, 64)
    assert [(w.first, w.last, round(w.seconds, 6)) for w in windows] == [(1, 1, 0.9), (2, 11, 5.0), (12, 21, 7.0)]
    assert launch.benchlib.steady_rate(windows, 1, 64) == pytest.approx(20 * 64 / 12.0)


def test_synthetic_shards_are_counted_as_the_loader_counts_them(launch, tmp_path):
    args = run_args(launch, "--steps", "12", "--warmup", "1", "--batch-size", "2", "--model", "ViT-Ti-4-28")
    args.shards = None
    launch.benchlib.prepare_shards(args, tmp_path)
    assert launch.benchlib.shard_samples(args.shards) == (12 + 10 + 1) * 2
    args.steps = 40
    with pytest.raises(SystemExit, match="holds 46 samples; 40 steps of 2 need 80"):
        launch.benchlib.prepare_shards(args, tmp_path)


def test_paired_steps_run_the_trainers_optimizer_step(launch, tmp_path):
    """One ABBA pair of whole training steps: each model's weights move, each timing is a real duration."""
    args = run_args(launch, "--model", "ViT-Ti-4-28", "--batch-size", "2", "--threads", "1")
    runners = launch.bench_ggem_step.step_runners(args, tmp_path)
    times = launch.bench_ggem_step.paired_step_times(runners, "cpu", pairs=1)
    assert set(times) == {"avg", "ggem"} and all(len(t) == 1 and t[0] > 0 for t in times.values())
    model = runners["ggem"].__defaults__[0]
    before = [p.detach().clone() for p in model.parameters()]
    runners["ggem"]()
    assert any(not (a == b.detach()).all() for a, b in zip(before, model.parameters()))
