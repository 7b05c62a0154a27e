"""One training process whose host reads are counted step by step (see host_reads.py).

Usage: ``python tests/train_reads_worker.py OUT.json CONFIG [key=value ...]``, once per rank
(torch's env:// variables select the rank). Writes ``{"steps": N, "reads": {step: [op, ...]},
"initial_weights": checksum}`` (a checksum of the weights as built, before training)
to ``OUT.json`` with the rank inserted before the suffix (``OUT.rank0.json``).

With ``INJECT_PER_STEP_READ=1`` in the environment, a fault is injected: the non-finite step
counters are read (a ``.tolist()``) after every optimizer step, so a test can show the count sees it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from host_reads import HostReads

from mmggem.train import loop as trainer
from mmggem.config.run import load_config


def main(out: str, config: str, *overrides: str) -> None:
    cfg = load_config(config, overrides)
    counter = HostReads()
    real_train_step, real_model_from_config = trainer.train_step, trainer.model_from_config
    built: list[float] = []

    def recorded_model_from_config(*args, **kwargs):
        model = real_model_from_config(*args, **kwargs)
        built.append(sum(float(p.double().sum()) + float(p.double().square().sum()) for p in model.parameters()))
        return model

    def counted_train_step(*args, **kwargs):
        counter.step += 1
        return real_train_step(*args, **kwargs)

    trainer.train_step, trainer.model_from_config = counted_train_step, recorded_model_from_config
    if os.environ.get("INJECT_PER_STEP_READ") == "1":
        real_optimizer_step = trainer.optimizer_step

        def reading_optimizer_step(accelerator, model, optimizer, nonfinite, *args, **kwargs):
            grad_norm = real_optimizer_step(accelerator, model, optimizer, nonfinite, *args, **kwargs)
            nonfinite.read()
            return grad_norm

        trainer.optimizer_step = reading_optimizer_step
    with counter:
        trainer.train(cfg)
    rank = os.environ.get("RANK", "0")
    path = Path(out)
    path.with_suffix(f".rank{rank}{path.suffix}").write_text(
        json.dumps({"steps": cfg.train.steps, "reads": counter.per_step(cfg.train.steps), "initial_weights": built[0]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
