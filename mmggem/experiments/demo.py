"""`mmggem demo`: the whole system on the embedded Fashion-MNIST subset, in one command.

Builds the demo shards (reused when already built), trains the tiny GGeM CLIP of
``recipes/demo.yaml`` (on the GPU when there is one, else the CPU), evaluates
zero-shot classification and retrieval on the held-out split, writes the
CLIP_benchmark-schema results and prints one table per task.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config.run import load_config
from ..data.fashion_mnist import write_demo
from ..data.formats import SIZES_FILE
from ..evaluate.results import format_tables, write_json
from ..train.loop import TrainOutcome, train

DEMO_RECIPE = Path(__file__).parent.parent / "recipes" / "demo.yaml"


@dataclass
class DemoOutcome:
    training: TrainOutcome
    records: list[dict]
    results_dir: Path


def prepare_data(data_dir: Path) -> str:
    """Build the demo shards into ``data_dir`` unless they are there; return the training shard pattern."""
    sizes_file = data_dir / "train" / SIZES_FILE
    if sizes_file.is_file():
        print(f"reusing demo data in {data_dir}")
    else:
        for report in write_demo(data_dir, overwrite=True):
            print(report.summary())
    shards = sorted(json.loads(sizes_file.read_text()))
    stems = [Path(name).stem for name in shards]
    return str(data_dir / "train" / f"{{{stems[0]}..{stems[-1]}}}.tar")


def run_demo(output_dir: Path, overrides: list[str]) -> DemoOutcome:
    """Build data, train, evaluate, write ``output_dir/eval/*.json``; return what happened."""
    data_dir = output_dir / "data"
    pattern = prepare_data(data_dir)
    cfg = load_config(DEMO_RECIPE, [
        f"output_dir={output_dir / 'run'}",
        f"data.train={pattern}",
        f"eval.datasets=[{data_dir / 'zeroshot'}, {data_dir / 'retrieval'}]",
        "train.resume=latest",
        *overrides,
    ])
    outcome = train(cfg)
    results_dir = output_dir / "eval"
    records = []
    for result in outcome.evaluations:
        record = result.record(model=f"{cfg.model.name} ({cfg.model.pooling})", pretrained=str(outcome.final))
        write_json(record, results_dir / f"{result.dataset}.json")
        records.append(record)
    if records:
        print(format_tables(records))
        print(f"results: {results_dir}; model: {outcome.final}; log: {Path(cfg.output_dir) / 'results.jsonl'}")
    return DemoOutcome(outcome, records, results_dir)
