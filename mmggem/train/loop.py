"""The training loop: accelerate, all-process contrastive loss, exact resume.

Read top to bottom: :func:`train` builds the pieces from the typed config and
restores a checkpoint when asked (``_start_run``; the model itself comes from
:mod:`mmggem.config.model`), then ``_Run.loop`` runs :func:`train_step` until
``train.steps`` (or an earlier stop, see :mod:`mmggem.train.stopping`), logging,
checkpointing and evaluating on the way, and finally ``_Run.evaluate_and_export``
evaluates the model and exports ``OUTPUT_DIR/final`` in the format :func:`mmggem.load` reads.

Batches: ``train.batch_size`` images per process and optimizer step, split into
``train.accum_steps`` micro-batches that are each scored against the features of
the whole step on every process (open_clip's ``--accum-freq`` scheme), so the
accumulation changes memory use, not the loss.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..checkpoint.runs import check_resumes_same_model
from ..checkpoint.store import (CheckpointDiskFull, list_checkpoints, load_checkpoint, read_data_states, resolve_resume,
                                save_checkpoint, step_dir)
from ..config.model import model_from_config
from ..config.run import RunConfig, parse_duration, save_config, to_dict
from ..data.device import DeviceNormalizer, split_transform, to_device
from ..data.loader import TrainLoader
from ..evaluate.results import EvalResult
from ..model.clip import get_tokenizer, image_transform, save_model
from ..model.text_length import NOT_TRIMMED, text_trim, trimming
from .fsdp import enable_fsdp_on_cpu, is_fsdp, plain_model, sharding_summary, vectorize_scalar_parameters
from .loss import build_loss, clamp_logit_scale_
from .nonfinite import NonFiniteSteps, optimizer_step
from .optim import build_optimizer, cosine_schedule
from .periodic_eval import run_evaluation
from .precision import check_precision, configure_matmul_precision, describe_precision, resolve_precision
from .records import P_PREFIX
from .step import train_step
from .step_metrics import StepTimer, max_over_processes, peak_memory_gb, pool_exponents, skipped_samples, step_metrics
from .stopping import EXIT_DISK_FULL, EXIT_REQUEUE, StopControl, StopRequested
from .tracking import RunLog, start_trackers, trackers

log = logging.getLogger(__name__)

EXIT_CODE_FILE = "exit_code"
"""``OUTPUT_DIR/exit_code``: the code of a run that stopped early (75 or 74), written by the main process as
its last act and removed when a run starts. Under ``accelerate launch`` the launcher itself exits 1 after
a signal (torch's elastic agent re-raises it), so scripts read the run's own code here
(docs/distributed.md)."""
_EXIT_CODES = {"signal": EXIT_REQUEUE, "time_limit": EXIT_REQUEUE, "disk_full": EXIT_DISK_FULL}


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint beside accelerate's state."""

    step: int = 0
    bad_steps: int = 0
    bad_steps_in_a_row: int = 0
    samples_seen: int = 0
    scaler_skips: int = 0


@dataclass
class TrainOutcome:
    """How a call of :func:`train` ended; ``exit_code`` is what the CLI returns."""

    step: int
    stopped_by: str | None = None
    checkpoint: Path | None = None
    final: Path | None = None
    evaluations: list[EvalResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """75 after a signal or the time limit, 74 after a full disk (resume once space is freed), else 0."""
        return _EXIT_CODES.get(self.stopped_by, 0)


def build_accelerator(cfg: RunConfig) -> Accelerator:
    """accelerate's Accelerator for the run, in the precision :mod:`mmggem.train.precision` resolves; an FSDP
    launch gets FSDP on CPU processes too."""
    mixed_precision, note = resolve_precision(cfg.train.precision)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=trackers(cfg.log.wandb, cfg.log.tensorboard, Path(cfg.output_dir)),
        project_dir=cfg.output_dir,
        dynamo_backend="inductor" if cfg.model.compile else None,
    )
    enable_fsdp_on_cpu(accelerator)
    check_precision(accelerator, is_fsdp(accelerator))
    if note:
        accelerator.print(note)
    accelerator.print(describe_precision(accelerator, cfg.train.precision))
    return accelerator


def parameter_summary(model: torch.nn.Module) -> str:
    """One log line: how many parameters the optimizer trains and how many are locked."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"parameters: {trained:,} trained, {total - trained:,} locked, {total:,} in all"


def batches(loader: TrainLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches: epoch after epoch in epoch mode, one endless epoch when resampled."""
    while True:
        yield from loader


def restore_data_position(loader: TrainLoader, checkpoint: Path, saved_world_size: int, accelerator: Accelerator,
                          cfg: RunConfig) -> bool:
    """Put the loader where the checkpoint's run was; True when exactly, False when approximately.

    Exact needs the same setup (world size, workers, batch size, shards, ...) and reads only this
    process's position; otherwise every saved position is read, the data continues approximately
    and one warning says how (:meth:`TrainLoader.resume_approximately`).
    """
    if saved_world_size == accelerator.num_processes:
        [mine] = read_data_states(checkpoint, [accelerator.process_index])
        if not loader.layout_differences(mine):
            loader.load_state_dict(mine)
            return True
    saved = read_data_states(checkpoint, range(saved_world_size))
    warning = loader.resume_approximately(saved, cfg.data.accept_changed_shards)
    accelerator.print(f"WARNING: {warning}")
    return False


def train(cfg: RunConfig) -> TrainOutcome:
    """Train as ``cfg`` says; collective under ``accelerate launch`` (every process calls it).

    Three steps: build the run (resumed from a checkpoint when asked), train it, and, unless it
    stopped early, evaluate the final model and export it to ``OUTPUT_DIR/final``: with the last step
    saved and ``final/`` written atomically, a signal then stops the process as any program's.
    """
    run = _start_run(cfg)
    try:
        with run.training():
            outcome = run.loop()
        if outcome.stopped_by is None:
            outcome.evaluations, outcome.final = run.evaluate_and_export()
        elif outcome.exit_code and run.accelerator.is_main_process:
            with suppress(OSError):  # a full disk may refuse even this; the process's code says it too
                (Path(cfg.output_dir) / EXIT_CODE_FILE).write_text(f"{outcome.exit_code}\n")
        return outcome
    finally:
        run.run_log.finish()


def _start_run(cfg: RunConfig) -> _Run:
    """Every piece of the run ``cfg`` describes, restored from a checkpoint when ``train.resume`` says so.

    The order fixes the randomness: the model is built under the run's seed (the same initial
    weights on every process), everything after it under a per-process seed.
    """
    output_dir = Path(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    configure_matmul_precision(accelerator.device, cfg.train.tf32)
    resume_from = resolve_resume(accelerator, output_dir, cfg.train.resume)
    check_resumes_same_model(resume_from, cfg.model)  # every process reads the same file: all stop or none
    cfg = replace(cfg, train=replace(cfg.train, precision=accelerator.mixed_precision))  # the one in effect
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / EXIT_CODE_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # the same initial weights on every process (FSDP shards them without a broadcast)
    model = model_from_config(cfg)
    accelerator.print(parameter_summary(model))
    set_seed(cfg.seed, device_specific=True)  # per-process randomness from here on
    if is_fsdp(accelerator):
        vectorize_scalar_parameters(model)
    tokenizer = get_tokenizer(model)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas),
                                cfg.train.adam_eps, cfg.train.pool_p_lr_mult)
    scheduler = cosine_schedule(optimizer, min(cfg.train.warmup_steps, cfg.train.steps - 1), cfg.train.steps,
                                cfg.train.min_lr_ratio)
    train_transform, normalization = split_transform(image_transform(model, is_train=True,
                                                                     augment=cfg.data.augment))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.print(sharding_summary(accelerator, model))
    loss_fn = build_loss(cfg.train.loss, **({"local_loss": cfg.train.local_loss} if cfg.train.loss == "clip" else {}))

    state, saved = TrainState(), None
    if resume_from is not None:
        saved = load_checkpoint(accelerator, resume_from, scheduler)
        state = TrainState(**{k: saved[k] for k in TrainState.__dataclass_fields__ if k in saved})
        accelerator.print(f"resumed from {resume_from} at step {state.step}")

    trim = text_trim(accelerator.unwrap_model(model, keep_torch_compile=False)) if cfg.model.trim_text else None
    if cfg.model.trim_text and trim is None:
        accelerator.print(f"note: {NOT_TRIMMED}")
    stop = StopControl(cfg.train.stop_at_step, parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None)
    loader = TrainLoader(
        cfg.data.train, transform=train_transform, tokenizer=trimming(tokenizer, trim), batch_size=cfg.train.batch_size,
        num_workers=cfg.data.workers, seed=cfg.seed, resampled=cfg.data.resampled,
        shuffle_buffer=cfg.data.shuffle_buffer, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_samples=cfg.data.num_samples,
        pin_memory=accelerator.device.type == "cuda", stall_warn_s=cfg.data.stall_warn_s,
        waiting=stop.waiting_for_data,
    )
    approximate = saved is not None and not restore_data_position(loader, resume_from, saved["world_size"],
                                                                  accelerator, cfg)
    start_trackers(accelerator, cfg.log, output_dir, to_dict(cfg), state.step)
    run_log = RunLog(accelerator, output_dir)
    run_log.rewind(state.step)
    run_log.multiline_layout("GGeM exponent p of each group", P_PREFIX + r"\d+")
    run_log.note({"run/precision": accelerator.mixed_precision})
    if approximate:
        run_log.log({"data/resumed_approximately": 1}, state.step)
    in_output_dir = resume_from is not None and resume_from.resolve() == step_dir(output_dir, state.step).resolve()
    return _Run(cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                loss_fn=loss_fn, loader=loader, normalizer=DeviceNormalizer(normalization, accelerator.device),
                tokenizer=tokenizer, run_log=run_log, stop=stop, state=state,
                saved=step_dir(output_dir, state.step) if in_output_dir else None)


@dataclass
class _Run:
    """The pieces of one training run (built by ``_start_run``), the loop over its steps and its end."""

    cfg: RunConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    loader: TrainLoader
    normalizer: DeviceNormalizer
    tokenizer: Any
    run_log: RunLog
    stop: StopControl
    state: TrainState
    saved: Path | None = None  # the checkpoint in OUTPUT_DIR/checkpoints of the step last resumed from or saved

    @contextmanager
    def training(self) -> Iterator[None]:
        """The scope of the training steps: stop signals are caught inside; at its end the loader's
        workers are shut down and the stop exchange is finished."""
        try:
            with self.stop.catching_signals():
                yield
        finally:
            self.loader.close()
            self.stop.close()

    def loop(self) -> TrainOutcome:
        """Run steps until ``train.steps`` or a stop; outside log, checkpoint and evaluation steps the
        host never waits for the device."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        unwrapped = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        nonfinite = NonFiniteSteps(accelerator.device, state.bad_steps, state.bad_steps_in_a_row, state.scaler_skips)
        global_batch = cfg.train.batch_size * accelerator.num_processes
        progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", unit="step",
                        disable=not (accelerator.is_main_process and cfg.log.progress))
        data_iter = batches(self.loader)
        self.model.train()
        timer = StepTimer()
        outcome = TrainOutcome(step=state.step)
        try:
            while state.step < cfg.train.steps:
                fetch_start = time.perf_counter()
                try:
                    images, texts = next(data_iter)
                except StopRequested:  # a signal while one process waited for a batch: stop after the last step
                    return self._stop(outcome, "signal", nonfinite, timer)
                timer.waited(time.perf_counter() - fetch_start)
                images, texts = to_device(images, texts, accelerator.device, self.normalizer)
                loss = train_step(self.model, self.loss_fn, accelerator, images, texts, cfg.train.accum_steps)
                grad_norm = optimizer_step(accelerator, self.model, self.optimizer, nonfinite, cfg.train.grad_clip,
                                           state.step + 1, loss)
                self.scheduler.step()
                clamp_logit_scale_(unwrapped)
                state.step += 1
                state.samples_seen += global_batch
                timer.stepped()
                progress.update(1)

                log_step = state.step % cfg.log.every == 0 or state.step == cfg.train.steps
                checkpoint_step = state.step % cfg.train.checkpoint_every == 0 or state.step == cfg.train.steps
                if log_step or checkpoint_step:
                    self._read_nonfinite(nonfinite)
                if log_step:
                    # reading the loss waits for the device, so the window's steps are done when it is timed
                    metrics = step_metrics(unwrapped, loss, grad_norm, self.optimizer, accelerator)
                    metrics.update(timer.metrics(cfg.train.batch_size, accelerator.num_processes))
                    metrics["data/text_tokens"] = texts.shape[1]  # this step's text width: trimmed, or the context
                    with timer.paused():  # logging is not step time
                        self._log(metrics, unwrapped)
                    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.train.steps:
                    with timer.paused():  # evaluation time is not step time
                        self._evaluate()
                    self.model.train()

                stopped_by = self.stop.check(state.step)
                if stopped_by:
                    return self._stop(outcome, stopped_by, nonfinite, timer, read_counters=not checkpoint_step)
                if checkpoint_step and state.bad_steps_in_a_row == 0 or state.step == cfg.train.steps:
                    with timer.paused():
                        outcome.checkpoint = self._save()
        except CheckpointDiskFull as error:
            return self._disk_full(outcome, error)
        finally:
            progress.close()
        outcome.step = state.step
        return outcome

    def _stop(self, outcome: TrainOutcome, stopped_by: str, nonfinite: NonFiniteSteps, timer: StepTimer,
              read_counters: bool = True) -> TrainOutcome:
        """End the loop early: checkpoint the last completed step (unless that is the checkpoint just resumed
        from or saved) and say why it stopped."""
        if read_counters:
            self._read_nonfinite(nonfinite)
        step = self.state.step
        if self.saved == step_dir(self.cfg.output_dir, step):
            outcome.checkpoint, saved = self.saved, f"step {step} is already saved in {self.saved}"
        else:
            with timer.paused():
                outcome.checkpoint = self._save()
            saved = f"checkpoint {outcome.checkpoint}"
        self.accelerator.print(f"stopped at step {step} ({stopped_by}); {saved}")
        outcome.step, outcome.stopped_by = self.state.step, stopped_by
        return outcome

    def evaluate_and_export(self) -> tuple[list[EvalResult], Path | None]:
        """The end of a run that reached ``train.steps``: evaluate on ``eval.datasets`` and save the model
        to ``OUTPUT_DIR/final`` (collective); returns the evaluations and, on the main process, the folder."""
        accelerator, final_dir = self.accelerator, Path(self.cfg.output_dir) / "final"
        evaluations = self._evaluate() if self.cfg.eval.datasets else []
        exported = plain_model(accelerator, self.model, self._shell)
        final = save_model(exported, final_dir) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        accelerator.print(f"trained {self.state.step} steps; model saved to {final_dir}")
        return evaluations, final

    def _log(self, metrics: dict[str, Any], unwrapped: torch.nn.Module) -> None:
        """Complete a log step's ``metrics`` with the counters and memory, and log them with the exponents."""
        metrics.update({
            "train/epoch": self.loader.epoch,
            "train/bad_steps": self.state.bad_steps,
            "perf/max_memory_gb": max_over_processes(peak_memory_gb(self.accelerator.device), self.accelerator),
            "data/skipped_samples": skipped_samples(self.loader, self.accelerator),
        })
        if self.accelerator.scaler is not None:
            metrics.update({"train/scaler_skips": self.state.scaler_skips,
                            "train/loss_scale": self.accelerator.scaler.get_scale()})
        self.run_log.log(metrics, self.state.step)
        exponents = pool_exponents(unwrapped)
        if exponents is not None:
            self.run_log.log_histogram("train/pool_p", exponents, self.state.step)

    def _evaluate(self) -> list[EvalResult]:
        return run_evaluation(self.cfg, self.model, self.accelerator, self.tokenizer, self.loss_fn, self.run_log,
                              self.state.step, self._shell)

    def _shell(self) -> torch.nn.Module:
        """A new model of the run's architecture, without pretrained weights: what an FSDP-sharded model
        is gathered into for evaluation and export (:func:`mmggem.train.fsdp.plain_model`)."""
        return model_from_config(self.cfg, load_pretrained=False)

    def _read_nonfinite(self, nonfinite: NonFiniteSteps) -> None:
        """Bring the device counters into ``state``; stop the run after ``train.max_bad_steps`` in a row."""
        counts = nonfinite.read()
        self.state.bad_steps, self.state.bad_steps_in_a_row = counts.total, counts.in_a_row
        self.state.scaler_skips = counts.scaler_skips
        if counts.longest_streak >= self.cfg.train.max_bad_steps:
            kept = list_checkpoints(self.cfg.output_dir)
            raise TrainingDiverged(
                f"{counts.longest_streak} steps in a row had a non-finite loss or gradient (last at step "
                f"{counts.last_step}); last good checkpoint: {kept[-1] if kept else 'none'}")

    def _save(self) -> Path:
        self.saved = save_checkpoint(self.accelerator, self.cfg.output_dir, self.state.step, vars(self.state),
                                     self.loader.state_dict(), self.scheduler.state_dict(),
                                     self.cfg.train.keep_checkpoints)
        return self.saved

    def _disk_full(self, outcome: TrainOutcome, error: CheckpointDiskFull) -> TrainOutcome:
        """The run cannot checkpoint: say so in one line (on stderr, as the CLI's errors) and stop."""
        if self.accelerator.is_main_process:
            print(f"mmggem train: error: {error} (exit {EXIT_DISK_FULL})", file=sys.stderr, flush=True)
        outcome.step, outcome.stopped_by, outcome.checkpoint = self.state.step, "disk_full", None
        return outcome
