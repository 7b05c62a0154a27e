"""Where metrics go: ``OUTPUT_DIR/results.jsonl`` always, wandb and TensorBoard when asked.

Both trackers run through accelerate (``log.wandb``, ``log.tensorboard``) and get the
same keys as ``results.jsonl``. ``log.wandb=offline`` needs no network and no key;
TensorBoard writes ``OUTPUT_DIR/tensorboard``. A resumed run continues the same wandb
run (its id is kept in ``OUTPUT_DIR/wandb_run_id``) and the same TensorBoard folder,
whose events past the checkpoint are purged as ``results.jsonl``'s records are.

A tracker failure, at start or later, is reported once and turns that tracker off for
the rest of the run: it never stops training. Only the main process writes.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, TensorBoardTracker

from ..errors import UserError
from ..fileio import write_text_atomic

RESULTS_FILE = "results.jsonl"
WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"
log = logging.getLogger(__name__)


def record_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each record of the results file ``path`` with its line as written, in file order.

    A line that is not a JSON object is an error naming the file and line, except a last one: an
    append cut short (a kill or a full disk mid-write) leaves it partial, and it is dropped with a
    warning (a resume logs its step again).
    """
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.strip("\0 \t\r\n"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                log.warning("%s, line %d: a record cut short (%s), dropped", path, number, error)
                break
            raise UserError(f"{path}, line {number}: not a JSON object ({error})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: not a JSON object")
        found.append((line if line.endswith("\n") else line + "\n", record))
    return found


def require_tensorboard() -> None:
    """Import the tensorboard package, which torch's SummaryWriter needs, or say how to install it."""
    try:
        importlib.import_module("tensorboard")
    except ImportError as error:
        raise UserError(f"log.tensorboard=true, but the tensorboard package does not import ({error}): pip "
                        "install tensorboard (or the repository's extra: pip install -e '.[tensorboard]')") from None


def trackers(wandb_mode: str, tensorboard: bool, output_dir: Path) -> list[str | GeneralTracker] | None:
    """accelerate's ``log_with`` for the run: ``"wandb"`` and a TensorBoard tracker on ``OUTPUT_DIR/tensorboard``
    (None for neither: accelerate warns about an empty list)."""
    chosen: list[str | GeneralTracker] = ["wandb"] if wandb_mode != "off" else []
    if tensorboard:
        require_tensorboard()
        chosen.append(TensorBoardTracker(TENSORBOARD_DIR, output_dir))
    return chosen or None


def start_trackers(accelerator: Accelerator, log_cfg: Any, output_dir: Path, config: dict[str, Any],
                   resume_step: int) -> None:
    """Start the trackers ``accelerator`` was built with, continuing the run of ``output_dir`` if any.

    ``log_cfg`` is the config's ``log`` section: wandb gets its mode, project, entity, group, tags,
    notes and run name (default: the output folder's name). TensorBoard, resumed at
    ``resume_step`` > 0, purges what the earlier run logged after that step.
    """
    if not accelerator.log_with:
        return
    wandb_kwargs: dict[str, Any] = {}
    if log_cfg.wandb != "off":
        os.environ["WANDB_MODE"] = log_cfg.wandb
        id_file = output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        wandb_kwargs = {"name": log_cfg.run_name or output_dir.name, "dir": str(output_dir), "id": run_id,
                        "resume": "allow", "group": log_cfg.group or None, "tags": list(log_cfg.tags) or None,
                        "notes": log_cfg.notes or None, "entity": log_cfg.entity or None}
    for tracker in accelerator.log_with:
        if isinstance(tracker, TensorBoardTracker) and resume_step > 0:
            tracker.init_kwargs["purge_step"] = resume_step + 1
    started = _start_each(accelerator, log_cfg.project, {"wandb": wandb_kwargs})
    for tracker in accelerator.trackers:
        _store_config(tracker, config)
    if "wandb" in started and accelerator.is_main_process:
        (output_dir / WANDB_ID_FILE).write_text(wandb_kwargs["id"] + "\n")


def _start_each(accelerator: Accelerator, project: str, init_kwargs: dict[str, dict[str, Any]]) -> list[str]:
    """Start each tracker of ``accelerator.log_with`` on its own, so that one failing to start is reported
    once and left out while the others run (accelerate starts them all in one call, where one failure
    stops the rest). Returns the names of those started (none on the other processes)."""
    chosen, kept, started = list(accelerator.log_with), [], []
    for tracker in chosen:
        accelerator.log_with, accelerator.trackers = [tracker], []
        try:
            accelerator.init_trackers(project, init_kwargs=init_kwargs)
        except Exception as error:  # noqa: BLE001 - any tracker failure must leave training running
            name = tracker.name if isinstance(tracker, GeneralTracker) else str(tracker)  # LoggerType's str: its name
            log.warning("%s could not start (%s): it is off for this run; results.jsonl and the other trackers "
                        "continue", name, error)
            continue
        kept.append(tracker)
        started += accelerator.trackers
    accelerator.log_with, accelerator.trackers = kept, started
    return [tracker.name for tracker in started]


def _store_config(tracker: GeneralTracker, config: dict[str, Any]) -> None:
    """The resolved config: wandb's run config, TensorBoard's text ``config`` (its hparams need flat values)."""
    if tracker.name == "wandb":
        tracker.store_init_configuration(config)
    elif tracker.name == "tensorboard" and tracker.writer is not None:
        tracker.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)


class RunLog:
    """Appends one JSON object per logged step to results.jsonl and forwards it, and pictures, to the trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = output_dir / RESULTS_FILE
        self.notes: dict[str, Any] = {}

    def note(self, facts: dict[str, Any]) -> None:
        """Facts of the run (not metrics, e.g. ``run/precision``) for the next record of results.jsonl;
        wandb has them in its run config."""
        self.notes.update(facts)

    def _tracker(self, name: str) -> Any | None:
        """The library object of tracker ``name`` (wandb's run, TensorBoard's SummaryWriter) on the main process."""
        if not self.accelerator.is_main_process:
            return None
        found = [t for t in self.accelerator.trackers if t.name == name]
        return found[0].tracker if found else None

    def _guard(self, name: str, action: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - see the module docstring
            log.warning("%s failed to %s (%s): %s is off for the rest of the run", name, action, error, name)
            self.accelerator.trackers = [t for t in self.accelerator.trackers if t.name != name]

    def has_trackers(self) -> bool:
        """Whether this process writes to any tracker besides results.jsonl (the main process, if one runs)."""
        return self.accelerator.is_main_process and bool(self.accelerator.trackers)

    def rewind(self, step: int) -> None:
        """Drop records after ``step``: on resume, what was logged past the checkpoint is logged again."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line, record in record_lines(self.path) if record.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Scalars (and strings) under the same keys in results.jsonl, wandb and TensorBoard."""
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics, **self.notes}) + "\n")
        self.notes = {}
        for tracker in list(self.accelerator.trackers):
            self._guard(tracker.name, "log", lambda: tracker.log(metrics, step=step))

    def log_histogram(self, key: str, values: torch.Tensor, step: int) -> None:
        values = values.detach().float().cpu().numpy()
        run, writer = self._tracker("wandb"), self._tracker("tensorboard")
        if run is not None:
            import wandb

            self._guard("wandb", "log a histogram", lambda: run.log({key: wandb.Histogram(values)}, step=step))
        if writer is not None:
            self._guard("tensorboard", "log a histogram", lambda: writer.add_histogram(key, values, step))

    def log_table(self, key: str, rows: list[list[Any]], columns: list[str], step: int) -> None:
        """A wandb Table (cells may be :class:`numpy.ndarray` images); a Markdown table of the text in TensorBoard."""
        run, writer = self._tracker("wandb"), self._tracker("tensorboard")
        if run is not None:
            import wandb

            cells = [[wandb.Image(c) if isinstance(c, np.ndarray) else c for c in row] for row in rows]
            self._guard("wandb", "log a table", lambda: run.log({key: wandb.Table(columns=columns, data=cells)},
                                                                step=step))
        if writer is not None:
            text = [[c for c in row if not isinstance(c, np.ndarray)] for row in rows]
            header = [c for c, cell in zip(columns, rows[0]) if not isinstance(cell, np.ndarray)] if rows else []
            markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                                  *("| " + " | ".join(str(c) for c in row) + " |" for row in text)])
            self._guard("tensorboard", "log a table", lambda: writer.add_text(key, markdown, step))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An ``[H, W, 3]`` uint8 picture: a wandb Image and a TensorBoard image under ``key``."""
        run, writer = self._tracker("wandb"), self._tracker("tensorboard")
        if run is not None:
            import wandb

            self._guard("wandb", "log an image", lambda: run.log({key: wandb.Image(image)}, step=step))
        if writer is not None:
            self._guard("tensorboard", "log an image",
                        lambda: (writer.add_image(key, image, step, dataformats="HWC"), writer.flush()))

    def log_line_series(self, key: str, steps: list[int], series: dict[str, list[float]], step: int) -> None:
        """One wandb chart with a line per series (TensorBoard draws its own from :meth:`multiline_layout`)."""
        run = self._tracker("wandb")
        if run is not None:
            import wandb

            chart = lambda: wandb.plot.line_series(xs=steps, ys=list(series.values()), keys=list(series),  # noqa: E731
                                                   title=key, xname="step")
            self._guard("wandb", "log a chart", lambda: run.log({key: chart()}, step=step))

    def multiline_layout(self, title: str, pattern: str) -> None:
        """A TensorBoard custom-scalars chart drawing every scalar whose key matches ``pattern`` on one plot."""
        writer = self._tracker("tensorboard")
        if writer is not None:
            self._guard("tensorboard", "write its layout", lambda: writer.add_custom_scalars(
                {"mmggem": {title: ["Multiline", [pattern]]}}))

    def finish(self) -> None:
        if self.accelerator.trackers:
            for tracker in list(self.accelerator.trackers):
                self._guard(tracker.name, "finish", tracker.finish)
