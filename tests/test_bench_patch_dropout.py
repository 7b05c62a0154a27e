"""launch/bench/bench_patch_dropout.py: one comparison row on the demo model, a few steps on a tiny batch."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from accelerate import Accelerator

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "bench" / "bench_patch_dropout.py"


def test_compare_times_both_models_and_prints_one_row() -> None:
    spec = importlib.util.spec_from_file_location("bench_patch_dropout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.compare(Accelerator(cpu=True), "ViT-Ti-4-28", 0.5, batch_size=4, pairs=1)
    assert re.fullmatch(r"\| ViT-Ti-4-28 \| 4 \| \d+ ms \| \d+ ms \| \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) \|", row), row
