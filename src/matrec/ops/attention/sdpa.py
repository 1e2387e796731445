"""Causal softmax attention through ``torch.nn.functional.scaled_dot_product_attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(T: int, S: int, offset: int, window: int | None, device) -> Tensor:
    """``[T, S]`` bool: query row ``i`` (absolute position ``offset + i``) may see key column ``j``
    (absolute position ``offset + T - S + j``) when ``j``'s position is ``<= offset + i`` and, with a
    ``window``, ``> offset + i - window``."""
    q_pos = torch.arange(offset, offset + T, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(offset + T - S, offset + T, device=device)[None, :]  # [1, S]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def causal_attention(q: Tensor, k: Tensor, v: Tensor, offset: int, window: int | None = None,
                     dropout_p: float = 0.0) -> Tensor:
    """SDPA where query row ``i`` (absolute position ``offset + i``) sees the keys at positions
    ``<= offset + i`` and, with a ``window``, ``> offset + i - window``.

    ``q [B, H, T, D]``; ``k, v [B, H, S, D]`` hold the ``S`` most recent positions, the last being
    ``offset + T - 1``. Returns ``[B, H, T, D]``.
    """
    T, S = q.shape[-2], k.shape[-2]
    if offset == 0 and S == T and window is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
    # SDPA's is_causal aligns the mask top-left; with a cache it must align bottom-right.
    mask = causal_mask(T, S, offset, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def padded_causal_mask(valid: Tensor, T: int, docs: Tensor | None = None) -> Tensor:
    """``[B, 1, T, S]`` bool for a cache of ``S`` slots whose last ``T`` are this call's tokens:
    query ``i`` (slot ``S - T + i``) sees the valid slots up to its own, and always itself (so a
    padded query's row stays finite). ``valid [B, S]`` marks the slots that hold tokens; ``docs
    [B, S]`` (optional, packed documents) the document of each slot: a query sees its own only (the
    block-diagonal causal mask)."""
    S = valid.shape[-1]
    key = torch.arange(S, device=valid.device)  # [S]
    query = key[S - T:, None]  # [T, 1]
    see = (key[None, :] <= query) & (valid[:, None, :] | (key[None, :] == query))  # [B, T, S]
    if docs is not None:
        see = see & (docs[:, None, :] == docs[:, S - T:, None])
    return see[:, None]


def padded_causal_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, dropout_p: float = 0.0,
                            docs: Tensor | None = None) -> Tensor:
    """SDPA over a cache with padding: ``q [B, H, T, D]``, ``k, v [B, H, S, D]`` (the last ``T``
    slots this call's), ``valid [B, S]``, ``docs [B, S]`` or None; see :func:`padded_causal_mask`.
    Returns ``[B, H, T, D]``."""
    mask = padded_causal_mask(valid, q.shape[-2], docs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
