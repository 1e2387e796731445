"""Causal softmax attention by its definition: scores, mask, softmax, weighted sum. The reference."""
from __future__ import annotations

import math

from torch import Tensor

from .sdpa import causal_mask, padded_causal_mask


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, offset: int,
                               window: int | None = None) -> Tensor:
    """Same contract as :func:`matrec.ops.attention.causal_attention` (without dropout).

    ``q [B, H, T, D]``, ``k, v [B, H, S, D]`` -> ``[B, H, T, D]``.
    """
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    mask = causal_mask(q.shape[-2], k.shape[-2], offset, window, q.device)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def padded_causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, valid: Tensor,
                                      docs: Tensor | None = None) -> Tensor:
    """Same contract as :func:`matrec.ops.attention.padded_causal_attention` (without dropout)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    return scores.masked_fill(~padded_causal_mask(valid, q.shape[-2], docs), float("-inf")).softmax(-1) @ v
