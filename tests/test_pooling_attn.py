"""The attention pooler is timm's AttentionPoolLatent, and computes what the nn.MultiheadAttention one computed."""
from __future__ import annotations

import torch
from torch import nn

from mmggem.model.pooling import AttentionPool, build_pooler

DIM, HEADS = 32, 4


class MultiheadAttentionPool(nn.Module):
    """The layout of mmggem's attention pooler before timm: torch's nn.MultiheadAttention with a learned probe."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, DIM))
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        for parameter in self.parameters():  # no zero biases: every weight must land in its place
            nn.init.normal_(parameter, std=0.2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attn(self.probe.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]


def test_a_saved_multihead_attention_pooler_loads_and_pools_the_same() -> None:
    torch.manual_seed(0)
    old = MultiheadAttentionPool().eval()
    tower = nn.Module()
    tower.pooler = old
    saved = tower.state_dict()  # keys under a prefix, as in a saved model
    tower.pooler = build_pooler("attn", DIM, HEADS).eval()
    tower.load_state_dict(saved)  # strict: every old key has a new place and every new key a value
    tokens = torch.randn(3, 10, DIM)
    with torch.no_grad():
        assert torch.allclose(tower.pooler(tokens), old(tokens), atol=1e-5)
    assert isinstance(tower.pooler, AttentionPool) and not AttentionPool.uses_class_token


def test_its_own_state_dict_round_trips() -> None:
    torch.manual_seed(1)
    first, second = AttentionPool(DIM, HEADS).eval(), AttentionPool(DIM, HEADS).eval()
    second.load_state_dict(first.state_dict())
    tokens = torch.randn(2, 7, DIM)
    with torch.no_grad():
        assert torch.equal(first(tokens), second(tokens))
    assert {"latent", "q.weight", "kv.weight", "proj.weight", "norm.weight", "mlp.fc1.weight"} <= set(first.state_dict())
