"""GGeM and the baseline poolers against direct references."""
import pytest
import torch

from torch import nn

from mmggem.train.optim import build_optimizer
from mmggem.model.pooling import POOLER_NAMES, GGeM, GeM, build_pooler


def reference_ggem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y[b, c] = (mean_n max(x, eps)^p_g)^(1/p_g), channel by channel in float64."""
    x = x.double().clamp(min=eps)
    groups = p.numel()
    width = x.shape[-1] // groups
    out = torch.empty(x.shape[0], x.shape[-1], dtype=torch.float64)
    for c in range(x.shape[-1]):
        pg = p[c // width].double()
        out[:, c] = x[:, :, c].pow(pg).mean(dim=1).pow(1 / pg)
    return out


def reference_signed(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = sign(m) |m|^(1/p_g), m = mean_n s(x) max(|x|, eps)^p_g, s(x) = +1 for x >= 0 else -1; float64."""
    x = x.double()
    powered = torch.where(x >= 0, 1.0, -1.0) * x.abs().clamp(min=eps).pow(
        p.double().repeat_interleave(x.shape[-1] // p.numel()))
    mean = powered.mean(dim=1)
    return mean.sign() * mean.abs().pow(1 / p.double().repeat_interleave(x.shape[-1] // p.numel()))


def with_p(pooler: GGeM, p: torch.Tensor) -> GGeM:
    with torch.no_grad():
        pooler.p.copy_(p)
    return pooler


@pytest.mark.parametrize("groups", [1, 3, 12])
def test_ggem_matches_float64_reference_with_random_p(groups: int) -> None:
    torch.manual_seed(groups)
    x = torch.randn(4, 9, 12) * 2
    p = torch.empty(groups).uniform_(1, 8)
    pooler = with_p(GGeM(12, groups), p)
    torch.testing.assert_close(pooler(x).double(), reference_ggem(x, p), rtol=1e-5, atol=1e-6)


def _pooler(kind: str, p: float) -> nn.Module:
    """GeM, or GGeM with 3 groups, every exponent at ``p``."""
    if kind == "gem":
        return GeM(p_init=p)
    return with_p(GGeM(12, 3), torch.full((3,), p))


@pytest.mark.parametrize("kind", ["gem", "ggem"])
@pytest.mark.parametrize("p", [1.0, 3.0, 8.0, 10.0])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2, 1e4])
def test_gem_and_ggem_match_float64_reference_at_large_p_and_scale(kind: str, p: float, scale: float) -> None:
    torch.manual_seed(int(p))
    x = torch.randn(4, 9, 12).abs() * scale
    x[:, :, 0] = 1e-7  # one channel at or below eps on every token
    pooler = _pooler(kind, p)
    expected = reference_ggem(x, torch.full((pooler.p.numel(),), p))
    torch.testing.assert_close(pooler(x).double(), expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("kind", ["gem", "ggem"])
@pytest.mark.parametrize(("p", "scale"), [(8.0, 1e-7), (10.0, 1e4), (10.0, 1.0)])
def test_gem_and_ggem_gradients_are_finite_where_the_direct_power_mean_fails(kind: str, p: float,
                                                                             scale: float) -> None:
    """At p = 8 a channel at eps gives eps^8 = 1e-48, 0 in float32, so the direct form's gradient of p is nan;
    at p = 10 activations of 1e4 give 1e40, inf in float32."""
    torch.manual_seed(0)
    x = (torch.rand(2, 6, 12) * scale).requires_grad_()
    pooler = _pooler(kind, p)
    pooled = pooler(x)
    (pooled * torch.randn_like(pooled)).sum().backward()
    assert torch.isfinite(pooled).all() and torch.isfinite(pooler.p.grad).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(pooled.double(), reference_ggem(x.detach(), torch.full((pooler.p.numel(),), p)),
                               rtol=1e-5, atol=1e-6 * scale)


def test_p_one_gives_the_mean() -> None:
    x = torch.rand(3, 10, 8) + 0.1
    pooler = with_p(GGeM(8, 4), torch.ones(4))
    torch.testing.assert_close(pooler(x), x.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_large_p_approaches_the_max_and_grows_with_p() -> None:
    x = torch.rand(2, 16, 6) + 0.05
    outputs = [with_p(GGeM(6, 2), torch.full((2,), p))(x) for p in (1.0, 4.0, 32.0, 1000.0)]
    for smaller, larger in zip(outputs, outputs[1:]):
        assert torch.all(larger >= smaller - 1e-6)
    torch.testing.assert_close(outputs[-1], x.amax(dim=1), rtol=5e-3, atol=0)


def test_one_group_is_gem() -> None:
    x = torch.randn(5, 7, 16)
    gem, ggem = GeM(p_init=2.5), GGeM(16, groups=1, p_init=2.5)
    torch.testing.assert_close(ggem(x), gem(x), rtol=1e-5, atol=1e-6)


def test_one_group_per_channel_is_per_channel_gem() -> None:
    x = torch.randn(2, 5, 4)
    p = torch.tensor([1.5, 2.0, 5.0, 7.0])
    pooled = with_p(GGeM(4, groups=4), p)(x)
    for c in range(4):
        gem = GeM(p_init=float(p[c]))
        torch.testing.assert_close(pooled[:, c], gem(x[:, :, c : c + 1])[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 3, 12])
def test_signed_ggem_matches_float64_reference_with_random_p(groups: int) -> None:
    torch.manual_seed(groups)
    x = torch.randn(4, 9, 12) * 2
    p = torch.empty(groups).uniform_(1, 8)
    pooler = with_p(GGeM(12, groups, negatives="signed"), p)
    torch.testing.assert_close(pooler(x).double(), reference_signed(x, p), rtol=1e-5, atol=1e-6)


def test_signed_power_mean_keeps_signs_and_does_not_overflow() -> None:
    x = torch.randn(3, 16, 4) * 20
    pooled = with_p(GGeM(4, 2, negatives="signed"), torch.tensor([1.0, 60.0]))(x)
    torch.testing.assert_close(pooled[:, :2], x[:, :, :2].mean(dim=1), rtol=1e-5, atol=1e-5)
    largest = x[:, :, 2:].gather(1, x[:, :, 2:].abs().argmax(dim=1, keepdim=True))[:, 0]
    torch.testing.assert_close(pooled[:, 2:], largest, rtol=0.1, atol=0)  # p -> inf: the entry of largest |x|
    assert torch.isfinite(pooled).all()


def test_signed_gem_is_signed_ggem_with_one_group() -> None:
    x = torch.randn(5, 7, 16)
    gem, ggem = GeM(p_init=2.5, negatives="signed"), GGeM(16, groups=1, p_init=2.5, negatives="signed")
    torch.testing.assert_close(ggem(x), gem(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [3.0, 10.0, 40.0])  # eps**p is 0 in float32 from p = 7.5: the floor is in log space
def test_signed_gradients_are_finite_even_when_signs_cancel(p: float) -> None:
    x = torch.tensor([[[1.0, 2.0], [-1.0, 3.0]]], requires_grad=True)  # channel 0 sums to exactly 0
    pooler = with_p(GGeM(2, 1, negatives="signed"), torch.tensor([p]))
    pooled = pooler(x)
    pooled.sum().backward()
    assert torch.isfinite(pooled).all() and pooled[0, 0].abs() < 1e-5
    assert torch.isfinite(x.grad).all() and torch.isfinite(pooler.p.grad).all()


class _Tower(nn.Module):
    """Just enough of a model for the optimizer: the pooler under the name the real one has."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler


@pytest.mark.parametrize("pooler", [GGeM(6, 2, p_init=1.0), GeM(p_init=1.0)], ids=["ggem", "gem"])
def test_an_exponent_at_its_bound_rises_when_its_gradient_says_so_and_stays_bounded(pooler: nn.Module) -> None:
    x = torch.rand(4, 10, 6) + 0.1
    optimizer = build_optimizer(_Tower(pooler), lr=1e-3, weight_decay=0.1)
    for _ in range(3):  # larger p, larger output: -sum pushes every p up, +sum down into the bound
        optimizer.zero_grad()
        (-pooler(x).sum()).backward()
        optimizer.step()
    assert torch.all(pooler.p > 1.02)  # lr 1e-3 x 10 (the exponents' multiplier) x 3 Adam steps
    for _ in range(10):
        optimizer.zero_grad()
        pooler(x).sum().backward()
        optimizer.step()
    assert torch.all(pooler.p == 1.0)


def test_p_init_below_the_bound_starts_at_the_bound() -> None:
    assert torch.all(GGeM(12, 3, p_init=0.5).p == 1.0) and GeM(p_init=0.2).p == 1.0


def test_checkpoints_with_exponents_below_one_load_as_the_value_their_forward_used() -> None:
    import mmggem

    model = mmggem.create_model("ViT-Ti-4-28", pooling="ggem")
    state = model.state_dict()
    state["visual.pooler.p"] = torch.tensor([0.4, 2.0, 0.9, 1.5, 1.0, 3.0])
    model.load_state_dict(state)
    torch.testing.assert_close(model.visual.pooler.p.detach(), torch.tensor([1.0, 2.0, 1.0, 1.5, 1.0, 3.0]))


def test_p_is_clamped_to_one_inside_forward() -> None:
    x = torch.rand(2, 6, 4) + 0.1
    pooler = with_p(GGeM(4, 2), torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(pooler(x), x.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_gradients_reach_p_and_tokens() -> None:
    x = torch.randn(3, 8, 12, requires_grad=True)
    pooler = GGeM(12, 3)
    (pooler(x) * torch.randn(3, 12)).sum().backward()
    assert pooler.p.grad is not None and pooler.p.grad.shape == (3,)
    assert torch.all(pooler.p.grad != 0) and torch.isfinite(pooler.p.grad).all()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast_output_close_to_fp32() -> None:
    x = torch.randn(4, 10, 12)
    pooler = GGeM(12, 3)
    expected = pooler(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pooler(x.bfloat16())
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), expected, rtol=1e-2, atol=1e-2)


def test_parameter_p_has_one_exponent_per_group_at_p_init() -> None:
    pooler = GGeM(12, 4, p_init=2.0)
    assert isinstance(pooler.p, torch.nn.Parameter)
    assert pooler.p.shape == (4,) and torch.all(pooler.p == 2.0)


@pytest.mark.parametrize("name", POOLER_NAMES)
def test_every_pooler_maps_tokens_to_one_vector(name: str) -> None:
    pooler = build_pooler(name, dim=12, heads=3)
    assert pooler(torch.randn(2, 5, 12)).shape == (2, 12)
    assert pooler.uses_class_token == (name == "cls")


def test_build_pooler_defaults_ggem_groups_to_heads_and_takes_options() -> None:
    assert build_pooler("ggem", dim=12, heads=3).p.shape == (3,)
    custom = build_pooler("ggem", dim=12, heads=3, groups=6, p_init=4.0, eps=1e-3)
    assert custom.p.shape == (6,) and torch.all(custom.p == 4.0) and custom.eps == 1e-3


def test_baselines_compute_their_definitions() -> None:
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(build_pooler("avg", 6, 2)(x), x.mean(1))
    torch.testing.assert_close(build_pooler("max", 6, 2)(x), x.amax(1))
    torch.testing.assert_close(build_pooler("cls", 6, 2)(x[:, :1]), x[:, 0])


def test_bad_arguments_raise_value_errors_naming_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"valid groups: \[1, 2, 3, 4, 6, 12\]"):
        GGeM(12, 5)
    with pytest.raises(ValueError, match="cls, avg, max, gem, ggem, attn"):
        build_pooler("mean", dim=12, heads=3)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="p_init"):
            GGeM(12, 3, p_init=bad)
        with pytest.raises(ValueError, match="p_init"):
            build_pooler("gem", 12, 3, p_init=bad)
    with pytest.raises(ValueError, match="negatives must be one of clamp, signed"):
        build_pooler("ggem", 12, 3, negatives="abs")
    with pytest.raises(ValueError, match="invalid options for pooling 'avg'"):
        build_pooler("avg", 12, 3, p_init=2.0)
