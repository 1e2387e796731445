"""Causal linear attention by its definition, one step at a time. The reference (and the generation path).

With positive features ``q, k`` (the layer's feature map already applied)::

    S_t = S_{t-1} + k_t v_t^T        # [D, D] per head
    z_t = z_{t-1} + k_t              # [D]
    y_t = q_t^T S_t / (q_t^T z_t + eps)
"""
from __future__ import annotations

import torch
from torch import Tensor


def recurrent_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                   chunk_size: int = 0):
    """The definition, step by step. ``q, k`` are features ``[B, H, T, D]``; returns ``(y, S, z)``."""
    ys = []
    for t in range(q.shape[-2]):
        S = S + k[..., t, :, None] * v[..., t, None, :]  # [B, H, D, D]
        z = z + k[..., t, :]
        num = (q[..., t, :, None] * S).sum(-2)  # [B, H, D]
        den = (q[..., t, :] * z).sum(-1, keepdim=True)  # [B, H, 1]
        ys.append(num / (den + eps))
    return torch.stack(ys, dim=-2), S, z
