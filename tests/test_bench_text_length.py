"""The text-length benchmarks under launch/, run on the demo model with a few tiny steps."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import open_clip
import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "bench"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # bench_train's dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_cc3m_like_captions_average_twelve_tokens() -> None:
    bench = load("bench_text_length")
    tokens = open_clip.get_tokenizer("ViT-B-16")(bench.cc3m_like_captions(4000))
    lengths = (tokens != 0).sum(dim=1).float()
    assert lengths.mean().item() == pytest.approx(12, abs=0.3)
    assert 20 < lengths.quantile(0.99).item() < 35  # CC3M's long tail


def test_step_time_and_flops_padded_against_trimmed(capsys: pytest.CaptureFixture) -> None:
    load("bench_text_length").main(["--model", "ViT-Ti-4-28", "--batch-size", "4", "--pairs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert number(r"trimmed to (\d+)", out) < number(r"padded to (\d+)", out) == 32
    assert number(r"trimmed (\d+\.\d) G", out) < number(r"padded (\d+\.\d) G", out)
    assert number(r"speed-up (\d+\.\d+)x", out) > 0
    assert "embedding gradient" in out and "final LayerNorm, pooled rows" in out


def test_zeroshot_classifier_gives_clip_benchmarks_classifier(capsys: pytest.CaptureFixture) -> None:
    load("bench_zeroshot_classifier").main(["--model", "ViT-Ti-4-28", "--classes", "3", "--repeats", "1",
                                            "--threads", "1"])
    out = capsys.readouterr().out
    assert "3 classes x 80 templates = 240 prompts" in out
    assert number(r"differ by at most (\S+)$", out.strip()) <= 1e-5


def test_trainer_comparison_runs_both_sides_and_prints_the_ratio(capsys: pytest.CaptureFixture,
                                                                 tmp_path: Path) -> None:
    bench = load("bench_train")
    # open_clip_train needs its own environment (webdataset 0.2.86): here mmggem stands in for it, which
    # exercises the script's runs, windows, MFU and ratio; tests/test_bench_train.py checks its command line
    bench.run_open_clip = lambda args, run_dir: bench.run_mmggem(args, run_dir, "cls")
    bench.main(["--peer-python", sys.executable, "--model", "ViT-Ti-4-28", "--steps", "12", "--warmup", "1", "--log-every", "5", "--batch-size", "8",
                "--threads", "1", "--workers", "1", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert number(r"ratio mmggem / open_clip:\s+(\d+\.\d+)", out) > 0 and "open_clip_train (cls):" in out
