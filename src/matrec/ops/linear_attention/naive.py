"""Causal linear attention by its definition, one step at a time. The reference (and the generation path).

With positive features ``q, k`` (the layer's feature map already applied)::

    S_t = S_{t-1} + k_t v_t^T        # [D, D] per head
    z_t = z_{t-1} + k_t              # [D]
    y_t = q_t^T S_t / (q_t^T z_t + eps)
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..time_scan import time_scan


def linear_attention_step(S: Tensor, z: Tensor, q: Tensor, k: Tensor, v: Tensor, eps: float):
    """One step of the definition: ``q, k, v [B, H, D]`` -> ``(y [B, H, D], S, z)``."""
    S = S + k[..., :, None] * v[..., None, :]  # [B, H, D, D]
    z = z + k
    num = (q[..., :, None] * S).sum(-2)  # [B, H, D]
    den = (q * z).sum(-1, keepdim=True)  # [B, H, 1]
    return num / (den + eps), S, z


def _restart(S: Tensor, z: Tensor, start: Tensor | None):
    """``(S, z)`` zeroed in the rows where ``start [B]`` is set (a packed document begins)."""
    if start is None:
        return S, z
    keep = ~start[:, None, None]  # [B, 1, 1]
    return S * keep[..., None], z * keep


def recurrent_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                   chunk_size: int = 0, starts: Tensor | None = None):
    """The definition, step by step. ``q, k`` are features ``[B, H, T, D]``; returns ``(y, S, z)``.
    ``starts [B, T]`` (bool, optional): packed documents; the state restarts from zero where set."""
    ys = []
    for t in range(q.shape[-2]):
        S, z = _restart(S, z, None if starts is None else starts[:, t])
        y, S, z = linear_attention_step(S, z, q[..., t, :], k[..., t, :], v[..., t, :], eps)
        ys.append(y)
    return torch.stack(ys, dim=-2), S, z


def scan_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float, chunk_size: int = 0,
              starts: Tensor | None = None):
    """:func:`linear_attention_step` through :func:`matrec.ops.time_scan.time_scan`: one loop node
    whose length stays dynamic under ``torch.export`` (the export-safe form ``"scan"``)."""
    xs = tuple(t.permute(2, 0, 1, 3) for t in (q, k, v))  # [T, B, H, D] each
    if starts is not None:
        xs = (*xs, starts.t())

    def step(carry, x):
        S, z = _restart(*carry, x[3] if starts is not None else None)
        y, S, z = linear_attention_step(S, z, *x[:3], eps)
        return (S, z), y

    (S, z), y = time_scan(step, (S, z), xs)
    return y.permute(1, 2, 0, 3), S, z
