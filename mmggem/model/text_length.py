"""Text at its real length: token batches cut to their longest caption where that changes nothing.

Captions are padded to ``context_length`` (32, 77), but most hold 10 to 15 tokens. Two kinds of
text tower compute, for the features they return, nothing that depends on the positions after a
caption's end:

- open_clip's text transformer with a causal attention mask, pooled at the end-of-text token
  (``text_pool_type`` ``argmax`` or ``eos``) or at the first position: under the causal mask no
  position sees a later one, so the positions after the pooled one cannot reach it;
- a Hugging Face encoder (open_clip's ``HFTextEncoder``) whose attention mask hides the padding,
  pooled as the mean over that mask or at the CLS token: padded keys get no weight and padded
  rows are not pooled.

For these a batch cut to ``max(pooled position) + 1`` (or the last non-padding position + 1) gives
the same features, and the same gradients, for fewer FLOPs. Other towers (no causal mask,
pooling the last position, max pooling over padded positions) keep the full length.

The length is computed from the token tensor where the tokenizer made it, on the host (in the
training loader's workers, before the copy to the device), and rounded up to a multiple of 8
chosen so that a compiled model sees at most :data:`MAX_SHAPES` shapes (:func:`bucket`): under
``accelerate launch``, which sets ``ACCELERATE_DYNAMO_USE_DYNAMIC=False``, ``torch.compile`` runs
with ``dynamic=False`` and compiles one graph per shape, and past dynamo's recompile limit (8) it
stops compiling and runs eagerly. Each process cuts its own batches; the towers' parameters, hence
their gradients, keep their shapes.

open_clip's ``CLIP.encode_text`` adds the whole positional embedding and the whole causal mask,
so it refuses a shorter batch: :class:`TrimmableCLIP` is open_clip's ``CLIP`` whose
``encode_text`` takes the first ``L`` rows of both. It also applies the final LayerNorm to the
pooled rows only (LayerNorm normalises each position on its own, so the numbers are the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.transformer import text_global_pool
from torch import nn

ROUND_TO = 8
"""Trimmed lengths are multiples of this at least (capped at the context length): few shapes to compile."""

MAX_SHAPES = 8
"""The most trimmed lengths a context length gives: the default of ``torch._dynamo.config.recompile_limit``."""


def bucket(context_length: int) -> int:
    """The multiple trimmed lengths are rounded up to: 8, or the multiple of 8 that keeps the lengths to
    :data:`MAX_SHAPES` (context 77: 16, giving 16, 32, 48, 64 and 77; 8 would give 10 lengths)."""
    return ROUND_TO * math.ceil(context_length / (ROUND_TO * MAX_SHAPES))

CAUSAL_POOLS = ("argmax", "eos", "first")
"""open_clip ``text_pool_type`` values that read one position at or before the end of the caption."""

EXACT_HF_POOLERS = (MeanPooler, ClsPooler, ClsLastHiddenStatePooler)
"""Hugging Face poolers that read only unmasked positions (open_clip's ``MaxPooler`` reads padded ones)."""

Pool = Literal["argmax", "eos", "first", "mask"]


@dataclass(frozen=True)
class TextTrim:
    """Cuts ``[B, context_length]`` token batches to the positions a text tower's features depend on.

    ``pool`` says how those positions are found: the pooled position of open_clip's
    ``text_global_pool`` (``argmax``: the highest token id, the end-of-text token; ``eos``: the first
    ``eos_id``; ``first``: position 0), or ``mask``, the last token that is not ``pad_id``.
    """

    pool: Pool
    eos_id: int | None = None
    pad_id: int | None = None
    multiple: int = ROUND_TO

    def needed(self, tokens: torch.Tensor) -> int:
        """The number of leading positions every row's features depend on (at least 1)."""
        if self.pool == "first" or tokens.shape[1] == 0:
            return 1
        if self.pool == "argmax":
            last = tokens.argmax(dim=-1).max()
        elif self.pool == "eos":
            last = (tokens == self.eos_id).int().argmax(dim=-1).max()
        else:
            used = (tokens != self.pad_id).any(dim=0)
            last = (used * torch.arange(len(used))).max()
        return int(last) + 1

    def length(self, tokens: torch.Tensor) -> int:
        """:meth:`needed` rounded up to a multiple of ``multiple``, capped at the batch's width."""
        return min(tokens.shape[1], math.ceil(self.needed(tokens) / self.multiple) * self.multiple)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first :meth:`length` columns of ``tokens`` (a contiguous copy when shorter)."""
        length = self.length(tokens)
        return tokens if length == tokens.shape[1] else tokens[:, :length].contiguous()


NOT_TRIMMED = ("model.trim_text is on, but this text tower's features read padded positions (no causal mask, or "
               "pooling that reads the last or padded positions): text batches keep the full context length")
"""Said once at the start of a run whose tower :func:`text_trim` cannot trim exactly."""


def text_trim(model: nn.Module) -> TextTrim | None:
    """How to trim the text batches of ``model`` exactly, or None where only the full length is exact."""
    if isinstance(model, TrimmableCLIP):
        if model.attn_mask is not None and model.text_pool_type in CAUSAL_POOLS:
            return TextTrim(model.text_pool_type, eos_id=model.text_eos_id, multiple=bucket(model.context_length))
        return None
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder) and isinstance(text.pooler, EXACT_HF_POOLERS):
        return TextTrim("mask", pad_id=text.config.pad_token_id, multiple=bucket(model.context_length))
    return None


@dataclass(frozen=True)
class TrimmingTokenizer:
    """A tokenizer whose batches come out trimmed by ``trim`` (picklable, for loader workers)."""

    tokenizer: Callable[[list[str]], torch.Tensor]
    trim: TextTrim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.trim(self.tokenizer(texts))


def trimming(tokenizer: Callable[[list[str]], torch.Tensor],
             trim: TextTrim | None) -> Callable[[list[str]], torch.Tensor]:
    """``tokenizer`` with its batches trimmed by ``trim``; ``tokenizer`` itself when ``trim`` is None."""
    return tokenizer if trim is None else TrimmingTokenizer(tokenizer, trim)


class TrimmableCLIP(open_clip.CLIP):
    """open_clip's ``CLIP`` whose ``encode_text`` takes token batches of any length up to the context.

    Same parameters and buffers under the same names: open_clip checkpoints load unchanged.
    """

    @classmethod
    def adopt(cls, model: open_clip.CLIP) -> "TrimmableCLIP":
        """Turn an open_clip ``CLIP`` into a trimmable one in place."""
        if type(model) is not open_clip.CLIP:
            raise TypeError(f"expected open_clip's CLIP, got {type(model).__name__}")
        model.__class__ = cls
        return model

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's text path on the first ``L = text.shape[1]`` positions, LayerNorm after pooling."""
        length = text.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(text_global_pool(x, text, self.text_pool_type, eos_token_id=self.text_eos_id))
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x
