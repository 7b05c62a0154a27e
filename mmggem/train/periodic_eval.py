"""The trainer's evaluation: metrics, the validation loss and pictures, logged at each evaluation.

For every set in ``eval.datasets``: ``eval/<set>/<metric>`` (CLIP_benchmark's numbers). For the
retrieval sets: ``val/<set>/loss``, the training loss on the set's image-caption pairs (each
image with its first caption), and ``val/loss``, their mean. On the main process, for trackers:
the evaluation table, retrieval examples of the first retrieval set, the confusion matrix of every
classification set with at most 100 classes, and the GGeM exponents so far on one chart.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch
from accelerate import Accelerator

from ..evaluate import evaluate_dataset
from ..evaluate.pictures import (MAX_CONFUSION_CLASSES, confusion_picture, retrieval_examples, retrieval_picture,
                                 retrieval_rows)
from ..evaluate.results import ZEROSHOT_RETRIEVAL, EvalResult
from ..model.clip import image_transform
from .fsdp import plain_model
from .records import p_trajectory, read_records
from .tracking import RunLog


def run_evaluation(cfg: Any, model: torch.nn.Module, accelerator: Accelerator, tokenizer: Any,
                   loss_fn: torch.nn.Module, run_log: RunLog, step: int,
                   build: Callable[[], torch.nn.Module]) -> list[EvalResult]:
    """Evaluate on every set in ``cfg.eval.datasets``, sharded over all processes (collective), and log it."""
    unwrapped = plain_model(accelerator, model, build)
    preprocess = image_transform(unwrapped, is_train=False)
    results = [
        evaluate_dataset(unwrapped, dataset, preprocess, tokenizer, batch_size=cfg.eval.batch_size,
                         num_workers=cfg.eval.workers, accelerator=accelerator,
                         amp=accelerator.mixed_precision != "no",
                         progress=False, trim_text=cfg.model.trim_text)
        for dataset in cfg.eval.datasets
    ]
    rows = [[r.dataset, metric, value] for r in results for metric, value in r.metrics.items()]
    metrics = {f"eval/{dataset}/{metric}": value for dataset, metric, value in rows}
    losses = {f"val/{r.dataset}/loss": validation_loss(unwrapped, loss_fn, r.details, accelerator)
              for r in results if r.task == ZEROSHOT_RETRIEVAL}
    if losses:
        metrics.update({**losses, "val/loss": statistics.fmean(losses.values())})
    run_log.log(metrics, step)
    run_log.log_table("eval/table", rows, ["dataset", "metric", "value"], step)
    if run_log.has_trackers():
        log_pictures(results, run_log, step)
    return results


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, details: dict[str, Any],
                    accelerator: Accelerator) -> float:
    """The training loss on a retrieval set's pairs, each image with its first caption (collective).

    Every process holds all features; each passes an equal block of pairs to the loss, which scores
    them against those of every process, so the value is the loss of one batch holding the whole set
    (less at most ``processes - 1`` pairs when the set does not split evenly).
    """
    text_image = details["text_image"]
    rows = torch.arange(len(details["image_features"]))
    firsts = torch.searchsorted(text_image, rows).clamp(max=len(text_image) - 1)
    captioned = text_image[firsts] == rows
    images, texts = details["image_features"][captioned], details["text_features"][firsts[captioned]]
    block = len(images) // accelerator.num_processes
    mine = slice(accelerator.process_index * block, (accelerator.process_index + 1) * block)
    device = accelerator.device
    scalars = [model.logit_scale.detach().exp()]
    if getattr(model, "logit_bias", None) is not None:
        scalars.append(model.logit_bias.detach())
    loss = loss_fn(images[mine].float().to(device), texts[mine].float().to(device),
                   *(s.float().reshape(()) for s in scalars))
    return float(accelerator.reduce(loss.reshape(1), reduction="mean").item())


def log_pictures(results: list[EvalResult], run_log: RunLog, step: int) -> None:
    """Retrieval examples, confusion matrices and the exponents chart (main process, trackers only)."""
    retrieval = [r for r in results if r.task == ZEROSHOT_RETRIEVAL]
    if retrieval:
        details = retrieval[0].details
        examples = retrieval_examples(details)
        if examples:
            rows = retrieval_rows(examples, details["samples"])
            columns = ["caption", *(f"top {i + 1}" for i in range(len(rows[0]) - 2)), "right image"]
            run_log.log_table(f"pictures/{retrieval[0].dataset}/retrieval_table", rows, columns, step)
            run_log.log_image(f"pictures/{retrieval[0].dataset}/retrieval",
                              retrieval_picture(examples, details["samples"]), step)
    for result in results:
        classnames = result.details.get("classnames")
        if classnames and len(classnames) <= MAX_CONFUSION_CLASSES:
            run_log.log_image(f"pictures/{result.dataset}/confusion_matrix",
                              confusion_picture(result.details["predicted"], result.details["target"], classnames),
                              step)
    try:
        trajectory = p_trajectory(read_records(run_log.path.parent))
    except (ValueError, FileNotFoundError):
        return  # no learnable exponent, or nothing logged yet
    run_log.log_line_series("pictures/pool_p", trajectory.steps.tolist(),
                            {f"group {g}": trajectory.p[:, g].tolist() for g in range(trajectory.groups)}, step)
