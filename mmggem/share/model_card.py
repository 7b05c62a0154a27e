"""The model card (``README.md``) of an exported model: Hub metadata and what the model is.

The metadata block is huggingface_hub's :class:`~huggingface_hub.ModelCardData` (``library_name``,
``tags``, ``license``, ``pipeline_tag`` and a ``model-index`` of evaluation results, which the Hub
shows as the model's results); the text says how the model pools its tokens, the learned
exponent of every GGeM group, what it was trained on and for how long, its evaluation results
and how to load it.

Evaluation results come from the run itself: the ``eval/<dataset>/<metric>`` values its
``results.jsonl`` logged at the model's step, and any ``mmggem eval`` result JSON (in a folder
given by the caller) whose ``pretrained`` is this very model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from ..checkpoint.runs import RUN_CONFIG, ModelSource
from ..evaluate.results import ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, read_result
from ..model.open_clip_view import open_clip_builds
from ..train.records import read_records
from ..train.tracking import RESULTS_FILE

HUB_TASKS = {ZEROSHOT_CLASSIFICATION: "zero-shot-image-classification", ZEROSHOT_RETRIEVAL: "zero-shot-retrieval"}
"""CLIP_benchmark task -> the task type recorded in the Hub's model-index."""


@dataclass(frozen=True)
class Evaluation:
    """One metric of the model on one set."""

    dataset: str
    task: str
    metric: str
    value: float
    source: str


def run_evaluations(source: ModelSource) -> list[Evaluation]:
    """The ``eval/<dataset>/<metric>`` values the run logged at the model's step."""
    if source.run_dir is None or not (source.run_dir / RESULTS_FILE).is_file():
        return []
    found: dict[tuple[str, str], float] = {}
    for record in read_records(source.run_dir):
        if record.get("step") == source.step:
            found.update({tuple(key.split("/")[1:]): value for key, value in record.items()
                          if key.startswith("eval/") and key.count("/") == 2})
    log = f"{source.run_dir.name}/{RESULTS_FILE}, step {source.step}"
    return [Evaluation(dataset, _task_of(metric), metric, float(value), log)
            for (dataset, metric), value in sorted(found.items())]


def _task_of(metric: str) -> str:
    return ZEROSHOT_RETRIEVAL if "retrieval_recall@" in metric else ZEROSHOT_CLASSIFICATION


def result_file_evaluations(source: ModelSource, results_dir: Path) -> list[Evaluation]:
    """The metrics of every ``mmggem eval`` result JSON in ``results_dir`` computed on this model."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        record = read_result(path)
        if record["pretrained"] == str(source.path):
            found += [Evaluation(str(record["dataset"]), record["task"], metric, float(value), path.name)
                      for metric, value in sorted(record["metrics"].items())]
    return found


def model_card(model: nn.Module, source: ModelSource, evaluations: list[Evaluation], license: str,
               repo_id: str | None = None) -> ModelCard:
    """The card of ``model`` exported from ``source`` (to be pushed to ``repo_id``, if given)."""
    from ..train.step_metrics import pool_exponents

    spec = model.mmggem_spec
    exponents = pool_exponents(model)
    trained = training_summary(source)
    name = source.label
    in_open_clip = open_clip_builds(spec.model_cfg, spec.pooling, spec.text_source or None)
    data = ModelCardData(
        library_name="open_clip" if in_open_clip else "mmggem",  # the library that loads it, as the Hub shows it
        license=license,
        pipeline_tag="zero-shot-image-classification",
        tags=["mmggem", "clip", *(["open_clip"] if in_open_clip else []), f"pooling-{spec.pooling}", spec.name],
        model_name=name if evaluations else None,
        eval_results=[EvalResult(task_type=HUB_TASKS[e.task], dataset_type=e.dataset, dataset_name=e.dataset,
                                 metric_type=e.metric, metric_value=e.value)
                      for e in evaluations] or None,
    )
    body = [f"# {name}", "",
            f"A CLIP model trained with mmggem: architecture `{spec.name}`, "
            f"image tokens pooled by `{spec.pooling}`.", "", "## Pooling", ""]
    if exponents is None:
        body.append(f"`{spec.pooling}` has no learned exponent.")
    else:
        body += [f"The learned exponent p of each of the {len(exponents)} group(s), as used in forward "
                 "(clamped to >= 1; 1 is the mean of the tokens, larger moves towards their maximum):", "",
                 "| group | p |", "|---|---|", *(f"| {g} | {p:.4f} |" for g, p in enumerate(exponents.tolist()))]
    body += ["", "## Training", ""]
    body += [f"- {label}: {trained[key]}" for key, label in
             [("data", "training data"), ("steps", "optimizer steps"), ("samples_seen", "samples seen"),
              ("batch_size", "batch size per process"), ("processes", "processes")] if trained.get(key) is not None]
    if not trained:
        body.append("Not recorded (the model was exported from a folder outside a training run).")
    body += ["", "## Evaluation", ""]
    if evaluations:
        body += ["| dataset | task | metric | value | source |", "|---|---|---|---|---|",
                 *(f"| {e.dataset} | {e.task} | {e.metric} | {e.value:.4f} | {e.source} |" for e in evaluations)]
    else:
        body.append("No evaluation results were found in the run.")
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    body += ["", "## Loading", "", "```python", "import mmggem", "",
             f'model, preprocess, tokenizer = mmggem.load("{where}")', "```", "",
             "The weights (`open_clip_model.safetensors`) and config (`open_clip_config.json`) follow open_clip's "
             f"`local-dir` layout; open_clip itself builds the same model only for the poolings it has (`cls`, "
             f"`avg`), and this model pools with `{spec.pooling}`."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def training_summary(source: ModelSource) -> dict[str, Any]:
    """What the card says of the training: the run's config, and the trainer state of the checkpoint at the
    model's step (``final/`` equals the run's last checkpoint)."""
    if source.run_dir is None:
        return {}
    from ..checkpoint.restore import read_json
    from ..checkpoint.store import STATE_FILE, step_dir
    from ..config.run import load_config

    cfg = load_config(source.run_dir / RUN_CONFIG)
    state_file = step_dir(source.run_dir, source.step) / STATE_FILE
    state = read_json(state_file) if state_file.is_file() else {}
    return {"data": f"`{cfg.data.train}`", "steps": source.step, "samples_seen": state.get("samples_seen"),
            "batch_size": cfg.train.batch_size, "processes": state.get("world_size")}
