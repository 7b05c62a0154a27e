"""Tests for mmggem.train.loss: reference formulas, and 2 real processes against 1."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_loss_worker import CASES, run_case
from mmggem.train.loss import ClipLoss, SigLipLoss, build_loss, clamp_logit_scale_, micro_batch_loss

WORLD = 2
CLOSE = {"rtol": 1e-5, "atol": 1e-5}


def _features(n: int, d: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts


def _clip_reference(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """CLIP's symmetric cross-entropy written out with scalars."""
    n = len(images)
    sim = [[scale * float(images[i] @ texts[j]) for j in range(n)] for i in range(n)]
    image_to_text = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    text_to_image = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


def _siglip_reference(images: torch.Tensor, texts: torch.Tensor, scale: float, bias: float) -> float:
    """SigLIP Eq. 1 written out with scalars."""
    n = len(images)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (scale * float(images[i] @ texts[j]) + bias)))
    return total / n


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_equals_the_written_out_formula(local_loss: bool) -> None:
    loss_fn = ClipLoss(local_loss=local_loss)
    for n in (5, 3, 5):  # reuses the cached labels for a repeated shape
        images, texts = _features(n, seed=n)
        scale = torch.tensor(7.5, dtype=torch.float64)
        assert loss_fn(images, texts, scale).item() == pytest.approx(_clip_reference(images, texts, 7.5), rel=1e-12)


def test_siglip_loss_equals_the_written_out_formula() -> None:
    loss_fn = SigLipLoss()
    for n in (5, 3):
        images, texts = _features(n, seed=n)
        scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
        assert loss_fn(images, texts, scale, bias).item() == pytest.approx(
            _siglip_reference(images, texts, 10.0, -4.0), rel=1e-12
        )


def test_build_loss_builds_each_loss_and_names_the_valid_choices() -> None:
    clip = build_loss("clip", local_loss=True)
    assert isinstance(clip, ClipLoss) and clip.local_loss
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(ValueError, match="'infonce'.*clip, siglip"):
        build_loss("infonce")


class _Scaled(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(value))


class _Wrapper(nn.Module):
    """Names its child ``module`` like DDP does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_clamp_logit_scale_keeps_the_scale_between_1_and_100() -> None:
    high, low, inside = _Scaled(math.log(200.0)), _Wrapper(_Scaled(-0.5)), _Scaled(2.0)
    clamp_logit_scale_(high)
    clamp_logit_scale_(low)
    clamp_logit_scale_(inside)
    assert high.logit_scale.exp().item() == pytest.approx(100.0)
    assert low.module.logit_scale.item() == 0.0
    assert inside.logit_scale.item() == 2.0
    param = nn.Parameter(torch.tensor(5.0))
    clamp_logit_scale_(param, max_scale=50.0)
    assert param.exp().item() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="Linear has no parameter named 'logit_scale'"):
        clamp_logit_scale_(nn.Linear(2, 2))


def test_micro_batch_loss_rejects_a_bad_index() -> None:
    images, texts = _features(2)
    with pytest.raises(ValueError, match="micro-batch index 2 needs 0 <= index < 2"):
        micro_batch_loss(ClipLoss(), [images, images], [texts, texts], 2, images, texts, torch.tensor(1.0))


@pytest.mark.parametrize("loss_name", ["clip", "clip_local", "siglip"])
def test_accumulated_micro_batches_give_the_full_batch_gradients(loss_name: str) -> None:
    whole, accumulated = run_case(loss_name, 1), run_case(loss_name, 3)
    torch.testing.assert_close(accumulated["loss"], whole["loss"], **CLOSE)
    torch.testing.assert_close(accumulated["grads"], whole["grads"], **CLOSE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the worker in 2 real gloo processes; one result dict per rank."""
    out = tmp_path_factory.mktemp("dist_loss")
    worker = Path(__file__).with_name("dist_loss_worker.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--master_port", str(_free_port()), str(worker), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize(("loss_name", "micro_batches"), CASES)
def test_two_processes_match_one_process_on_the_concatenated_batch(
    two_process_results: list[dict], loss_name: str, micro_batches: int
) -> None:
    """Per-process batch b on 2 processes vs. one process on the 2b batch.

    Values: the mean of the processes' losses is the single-process loss (and
    every process returns it for the full-matrix CLIP loss). Gradients: the
    DDP-averaged parameter gradients equal the single-process ones, and each
    process's feature gradients are 2x the single-process gradients of its
    rows (the all-gather sums both copies).
    """
    reference = run_case(loss_name, 1)
    results = [r[f"{loss_name}/{micro_batches}"] for r in two_process_results]
    losses = torch.stack([r["loss"] for r in results])
    torch.testing.assert_close(losses.mean(), reference["loss"], **CLOSE)
    if loss_name == "clip":
        torch.testing.assert_close(losses, reference["loss"].expand(WORLD), **CLOSE)

    for result in results:
        torch.testing.assert_close(result["grads"], reference["grads"], **CLOSE)

    if micro_batches == 1:
        for rank, result in enumerate(results):
            rows = slice(rank * len(result["image_grad"]), (rank + 1) * len(result["image_grad"]))
            torch.testing.assert_close(result["image_grad"], WORLD * reference["image_grad"][rows], **CLOSE)
            torch.testing.assert_close(result["text_grad"], WORLD * reference["text_grad"][rows], **CLOSE)
