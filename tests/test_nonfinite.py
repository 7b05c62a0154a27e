"""fp16 with a real loss scaler around the trainer's own step: overflows are skipped, not divergence.

accelerate creates its ``GradScaler`` only for GPU-like devices, so on this CPU the test does
what ``Accelerator.__init__`` does for fp16 on a GPU ("Mixed precision attributes"): the state
says fp16 (``ACCELERATE_MIXED_PRECISION``), ``native_amp`` is on and ``scaler`` is a real
``torch.amp.GradScaler("cpu")``. Autocast itself is switched off with accelerate's
``AutocastKwargs(enabled=False)`` (fp16 matrix products take seconds per step on this CPU), so
overflows come from the scale alone: starting it at 1.7e38, the scaled gradients overflow fp32
until the scaler has halved it enough, as fp16 gradients overflow from 2^16 in a real run.
The same run on the GPU, with fp16 autocast, is in test_gpu.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import AutocastKwargs
from host_reads import HostReads

import mmggem
from mmggem.train.loss import build_loss
from mmggem.model.clip import get_tokenizer
from mmggem.train.nonfinite import NonFiniteSteps, optimizer_step
from mmggem.train.optim import build_optimizer
from mmggem.train.step import train_step


@pytest.fixture
def fp16_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """accelerate's process-wide state set to fp16 for this test only."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def cpu_accelerator(scaler: torch.amp.GradScaler | None) -> Accelerator:
    """An fp16 Accelerator on the CPU with ``scaler`` (None: none) and autocast off."""
    accelerator = Accelerator(cpu=True, kwargs_handlers=[AutocastKwargs(enabled=False)])
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # accelerate's CPU: no scaler
    accelerator.native_amp, accelerator.scaler = scaler is not None, scaler
    return accelerator


def run(accelerator: Accelerator, steps: int, loss_fn=None, counter: HostReads | None = None
        ) -> tuple[torch.Tensor, NonFiniteSteps, torch.optim.Optimizer]:
    """``steps`` of the trainer's train_step + optimizer_step on a fixed batch, for the tiny model and
    its fused AdamW prepared by ``accelerator``; the losses (not read), counters and optimizer."""
    torch.manual_seed(0)
    model = mmggem.create_model("ViT-Ti-4-28")
    texts = get_tokenizer(model)([f"a photo of colour {i % 5}" for i in range(8)]).to(accelerator.device)
    images = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1)).to(accelerator.device)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, 1e-3, 0.1, (0.9, 0.98), 1e-6, 10.0))
    nonfinite, losses = NonFiniteSteps(accelerator.device), []
    for step in range(1, steps + 1):
        if counter is not None:
            counter.step = step
        loss = train_step(model, loss_fn or build_loss("clip"), accelerator, images, texts, 1)
        optimizer_step(accelerator, model, optimizer, nonfinite, 1.0, step, loss)
        losses.append(loss)
    return torch.stack(losses), nonfinite, optimizer


def updates(optimizer: torch.optim.Optimizer) -> int:
    """How many updates fused AdamW made (its step count; a skipped step leaves it)."""
    return int(next(iter(optimizer.optimizer.state.values()))["step"])


def test_a_run_of_first_step_overflows_is_skipped_by_the_scaler_not_counted_as_divergence(fp16_state: None) -> None:
    init_scale = 1.7e38
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
    counter = HostReads()
    with counter:
        losses, nonfinite, optimizer = run(cpu_accelerator(scaler), 10, counter=counter)
    assert counter.reads == []  # the fp16 step reads nothing from the device
    counts, losses = nonfinite.read(), losses.tolist()
    skips = round(math.log2(init_scale / scaler.get_scale()))  # each overflow halved the scale
    assert counts.scaler_skips == skips >= 5  # at least train.max_bad_steps (5) overflows in a row
    assert (counts.total, counts.longest_streak, counts.in_a_row) == (0, 0, 0)  # no divergence
    assert updates(optimizer) == 10 - skips
    # the overflowing steps changed nothing; the later ones train as without a scaler
    reference, _, _ = run(cpu_accelerator(None), 10 - skips)
    assert losses[:skips + 1] == [losses[0]] * (skips + 1)
    torch.testing.assert_close(torch.tensor(losses[skips:]), reference, rtol=1e-4, atol=1e-4)


def test_non_finite_steps_of_another_cause_still_count_under_the_scaler(fp16_state: None) -> None:
    """Step 1: a NaN loss (counts); step 2: NaN gradients of a finite loss at scale 2 (the scaler's
    skip); step 3: the same at scale 1, where no scaling can explain it (counts); step 4: clean."""
    clip_loss, calls = build_loss("clip"), []

    def poisoned(image_features, text_features, logit_scale, *rest):
        calls.append(1)
        loss = clip_loss(image_features, text_features, logit_scale, *rest)
        if len(calls) == 1:
            return loss * math.nan
        if len(calls) in (2, 3):  # d sqrt(x)/dx at 0 is inf: a finite loss with NaN gradients
            return loss + 0 * torch.sqrt(logit_scale * 0)
        return loss

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=10_000)
    losses, nonfinite, optimizer = run(cpu_accelerator(scaler), 4, loss_fn=poisoned)
    counts, losses = nonfinite.read(), losses.tolist()
    assert math.isnan(losses[0]) and all(math.isfinite(loss) for loss in losses[1:])
    assert (counts.total, counts.scaler_skips, counts.last_step, counts.longest_streak) == (2, 1, 3, 1)
    assert scaler.get_scale() == 0.5 and updates(optimizer) == 1
