"""Tests for mmggem.train.optim: parameter groups, AdamW and the warmup + cosine schedule."""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mmggem.checkpoint.store import load_checkpoint, save_checkpoint
from mmggem.train.optim import WarmupCosine, build_optimizer, cosine_schedule, param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "mmggem" / "model" / "model_configs"


class _Pooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((3,), 3.0))


class _Head(nn.Module):
    """A 1-d parameter named ``p`` outside a pooler: an ordinary no-decay parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(4))


def _clip_with_pooler() -> nn.Module:
    open_clip.add_model_config(CONFIGS)
    model = open_clip.create_model("ViT-Ti-4-28")
    model.visual.pooler = _Pooler()
    model.visual.head = _Head()
    model.logit_bias = nn.Parameter(torch.tensor(-10.0))
    model.ln_final.bias.requires_grad_(False)
    return model


def test_param_groups_split_an_open_clip_model() -> None:
    model = _clip_with_pooler()
    groups = param_groups(model, weight_decay=0.2, pool_p_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert set().union(*by_group.values()) == trainable
    matrices = ("conv1.weight", "in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")
    assert by_group["decay"] == {n for n in trainable if n.endswith(matrices)} | {
        "visual.proj",
        "text_projection",
        "token_embedding.weight",
    }
    assert by_group["pool_p"] == {"visual.pooler.p"}
    assert {"logit_scale", "logit_bias", "positional_embedding", "visual.positional_embedding",
            "visual.class_embedding", "visual.ln_pre.weight", "visual.head.p"} <= by_group["no_decay"]  # fmt: skip
    assert "ln_final.bias" not in set().union(*by_group.values())
    settings = {g["name"]: (g["weight_decay"], g["lr_mult"]) for g in groups}
    assert settings == {"decay": (0.2, 1.0), "no_decay": (0.0, 1.0), "pool_p": (0.0, 10.0)}


def test_locked_towers_are_in_no_group() -> None:
    from mmggem import create_model
    from mmggem.model.clip import lock_towers

    model = create_model("ViT-Ti-4-28")
    lock_towers(model, image=True, text=True)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, weight_decay=0.2)}
    assert grouped == {"decay": ["text_projection", "visual.proj"], "no_decay": ["logit_scale"],
                       "pool_p": ["visual.pooler.p"]}


def test_param_groups_leave_out_an_empty_pool_p_group() -> None:
    assert [g["name"] for g in param_groups(nn.Linear(3, 2), weight_decay=0.1)] == ["decay", "no_decay"]


def test_build_optimizer_decays_only_the_decay_group() -> None:
    """With zero gradients AdamW's only update is the decoupled decay p *= 1 - lr * wd."""
    torch.manual_seed(0)
    model = _clip_with_pooler()
    optimizer = build_optimizer(model, lr=0.01, weight_decay=0.5, pool_p_lr_mult=4.0)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
        ("decay", 0.01),
        ("no_decay", 0.01),
        ("pool_p", pytest.approx(0.04)),
    ]
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["visual.proj"].detach(), before["visual.proj"] * (1 - 0.01 * 0.5))
    for name in ("visual.pooler.p", "logit_scale", "visual.class_embedding", "positional_embedding"):
        torch.testing.assert_close(after[name].detach(), before[name], rtol=0, atol=0)


def _schedule(warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    optimizer = build_optimizer(_clip_with_pooler(), lr=1e-3, weight_decay=0.1, pool_p_lr_mult=10.0)
    return cosine_schedule(optimizer, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_ratio)


def _lrs_per_step(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[list[float]]:
    """The groups' learning rates used by optimizer steps 0 .. steps - 1."""
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_warms_up_then_decays_to_the_minimum() -> None:
    lrs = _lrs_per_step(_schedule(warmup=4, total=10, min_ratio=0.1), 12)
    base = [1e-3, 1e-3, 1e-2]  # decay, no_decay, pool_p (x10)
    factors = {0: 0.25, 3: 1.0, 4: 1.0, 7: 0.1 + 0.9 * 0.5, 10: 0.1, 11: 0.1}
    for step, factor in factors.items():
        assert lrs[step] == pytest.approx([b * factor for b in base]), step
    assert all(a[0] > b[0] for a, b in zip(lrs[4:10], lrs[5:11]))


def test_cosine_schedule_without_warmup_starts_at_the_base_lr() -> None:
    lrs = _lrs_per_step(_schedule(warmup=0, total=4, min_ratio=0.0), 5)
    assert [step[0] for step in lrs] == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4,
                                                       1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])  # fmt: skip


@pytest.mark.parametrize(
    ("warmup", "total", "min_ratio", "message"),
    [(10, 10, 0.0, "need 0 <= warmup_steps < total_steps"), (-1, 10, 0.0, "warmup_steps=-1"),
     (0, 10, 1.5, "min_lr_ratio=1.5")],
)  # fmt: skip
def test_cosine_schedule_rejects_invalid_settings(warmup: int, total: int, min_ratio: float, message: str) -> None:
    optimizer = build_optimizer(nn.Linear(2, 2), lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match=message):
        cosine_schedule(optimizer, warmup, total, min_ratio)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, steps: range) -> list[float]:
    """Steps with gradients that depend only on the step index; returns the lrs used."""
    lrs = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_optimizer_and_schedule_state_round_trip_through_a_file(tmp_path: Path) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        return model, optimizer, cosine_schedule(optimizer, warmup_steps=3, total_steps=10, min_lr_ratio=0.05)

    model, optimizer, scheduler = build()
    _train(model, optimizer, scheduler, range(5))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, tmp_path / "state.pt")
    straight_lrs = _train(model, optimizer, scheduler, range(5, 12))

    restored = torch.load(tmp_path / "state.pt", weights_only=True)
    model2, optimizer2, scheduler2 = build()
    model2.load_state_dict(restored["model"])
    optimizer2.load_state_dict(restored["optimizer"])
    scheduler2.load_state_dict(restored["scheduler"])
    resumed_lrs = _train(model2, optimizer2, scheduler2, range(5, 12))

    assert resumed_lrs == straight_lrs
    assert len(set(straight_lrs)) == 6  # steps 5..10 differ; 10 and 11 sit at the minimum
    torch.testing.assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_resume_with_more_steps_follows_the_new_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint of step 10 of a 10-step schedule, resumed with 20 steps through the trainer's own save and
    load (accelerate restores the optimizer after the scheduler): steps 11.. use the 20-step cosine's rates,
    not the old minimum (0), and one line names the changed setting."""
    def build(total: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, Accelerator]:
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=total)
        return *accelerator.prepare(model, optimizer), scheduler, accelerator

    model, optimizer, scheduler, accelerator = build(10)
    _train(model, optimizer, scheduler, range(10))
    saved = save_checkpoint(accelerator, tmp_path, 10, {}, {}, scheduler.state_dict(), keep=1)
    model, optimizer, scheduler, accelerator = build(20)
    load_checkpoint(accelerator, saved, scheduler)
    assert "the schedule follows the config: total steps 10 -> 20\n" in capsys.readouterr().out
    used = _train(model, optimizer, scheduler, range(10, 20))
    assert used == pytest.approx([1e-2 * WarmupCosine(2, 20)(step) for step in range(10, 20)], rel=1e-12)
    assert min(used) > 0


def test_a_resume_with_other_optimizer_settings_follows_the_config(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The checkpoint's optimizer state holds its groups' weight decay and betas: they give way to the
    current config's, with one line naming them, while the moments carry over."""
    def build(weight_decay: float, betas: tuple[float, float]) -> tuple:
        torch.manual_seed(0)
        accelerator = Accelerator(cpu=True)
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=weight_decay, betas=betas)
        scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=10)
        return *accelerator.prepare(model, optimizer), scheduler, accelerator

    model, optimizer, scheduler, accelerator = build(0.1, (0.9, 0.98))
    _train(model, optimizer, scheduler, range(5))
    moments = {k: v["exp_avg"].clone() for k, v in enumerate(optimizer.state_dict()["state"].values())}
    saved = save_checkpoint(accelerator, tmp_path, 5, {}, {}, scheduler.state_dict(), keep=1)
    capsys.readouterr()
    model, optimizer, scheduler, accelerator = build(0.1, (0.9, 0.98))
    load_checkpoint(accelerator, saved, scheduler)
    assert "follows the config" not in capsys.readouterr().out
    model, optimizer, scheduler, accelerator = build(0.2, (0.9, 0.95))
    load_checkpoint(accelerator, saved, scheduler)
    assert ("the optimizer follows the config: betas (0.9, 0.98) -> (0.9, 0.95), weight_decay 0.1 -> 0.2\n"
            in capsys.readouterr().out)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.2]
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    for k, v in enumerate(optimizer.state_dict()["state"].values()):
        assert torch.equal(v["exp_avg"], moments[k])
