"""Where metrics go: ``OUTPUT_DIR/results.jsonl`` always, wandb when asked.

wandb runs through accelerate's tracker; ``log.wandb=offline`` needs no network
and no key. A wandb failure, at start or later, is reported once and turns wandb
off for the rest of the run: it never stops training. Only the main process
writes.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .fileio import write_text_atomic

RESULTS_FILE = "results.jsonl"
WANDB_ID_FILE = "wandb_run_id"
log = logging.getLogger(__name__)


def init_wandb(accelerator: Accelerator, mode: str, project: str, run_name: str, output_dir: Path,
               config: dict[str, Any]) -> None:
    """Start the wandb tracker (``mode`` offline or online), resuming the run of ``output_dir`` if any."""
    os.environ["WANDB_MODE"] = mode
    id_file = output_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    try:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {
            "name": run_name or output_dir.name, "dir": str(output_dir), "id": run_id, "resume": "allow"}})
    except Exception as error:  # noqa: BLE001 - any wandb failure must leave training running
        log.warning("wandb could not start (%s): continuing without it", error)
        return
    if accelerator.is_main_process:
        id_file.write_text(run_id + "\n")


class RunLog:
    """Appends one JSON object per logged step to results.jsonl and forwards it to the trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = output_dir / RESULTS_FILE
        self.notes: dict[str, Any] = {}

    def note(self, facts: dict[str, Any]) -> None:
        """Facts of the run (not metrics, e.g. ``run/precision``) for the next record of results.jsonl;
        wandb has them in its run config."""
        self.notes.update(facts)

    def _wandb_run(self) -> Any | None:
        trackers = [t for t in self.accelerator.trackers if t.name == "wandb"]
        return trackers[0].tracker if trackers else None

    def _guard(self, action: str, call: Any) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - see the module docstring
            log.warning("wandb failed to %s (%s): wandb is off for the rest of the run", action, error)
            self.accelerator.trackers = [t for t in self.accelerator.trackers if t.name != "wandb"]

    def rewind(self, step: int) -> None:
        """Drop records after ``step``: on resume, what was logged past the checkpoint is logged again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics, **self.notes}) + "\n")
        self.notes = {}
        if self._wandb_run() is not None:
            self._guard("log", lambda: self.accelerator.log(metrics, step=step))

    def log_histogram(self, key: str, values: torch.Tensor, step: int) -> None:
        run = self._wandb_run() if self.accelerator.is_main_process else None
        if run is not None:
            import wandb

            self._guard("log a histogram", lambda: run.log({key: wandb.Histogram(values.detach().cpu().numpy())},
                                                           step=step))

    def log_table(self, key: str, rows: list[list[Any]], columns: list[str], step: int) -> None:
        run = self._wandb_run() if self.accelerator.is_main_process else None
        if run is not None:
            import wandb

            self._guard("log a table", lambda: run.log({key: wandb.Table(columns=columns, data=rows)}, step=step))

    def finish(self) -> None:
        if self._wandb_run() is not None:
            self._guard("finish", self.accelerator.end_training)
