"""One training process whose host reads are counted step by step (see host_reads.py).

Usage: ``python tests/train_reads_worker.py OUT.json CONFIG [key=value ...]``, once per rank
(torch's env:// variables select the rank). Writes ``{"steps": N, "reads": {step: [op, ...]}}``
to ``OUT.json`` with the rank inserted before the suffix (``OUT.rank0.json``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from host_reads import HostReads

from mmggem import train as trainer
from mmggem.config import load_config


def main(out: str, config: str, *overrides: str) -> None:
    cfg = load_config(config, overrides)
    counter = HostReads()
    real_train_step = trainer.train_step

    def counted_train_step(*args, **kwargs):
        counter.step += 1
        return real_train_step(*args, **kwargs)

    trainer.train_step = counted_train_step
    with counter:
        trainer.train(cfg)
    rank = os.environ.get("RANK", "0")
    path = Path(out)
    path.with_suffix(f".rank{rank}{path.suffix}").write_text(
        json.dumps({"steps": cfg.train.steps, "reads": counter.per_step(cfg.train.steps)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
