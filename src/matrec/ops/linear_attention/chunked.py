"""Causal linear attention, chunk-parallel: quadratic attention inside chunks of ``chunk_size``, the
recurrence across chunk totals. Memory ``O(T * chunk_size)``, not ``O(T^2)``; equal to
:func:`matrec.ops.linear_attention.naive.recurrent_form`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def chunked_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                 chunk_size: int = 64):
    """Chunk-parallel form, equal to :func:`recurrent_form`."""
    B, H, T, D = q.shape
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero features contribute nothing to S or z
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    N = (T + pad) // C
    qc, kc, vc = (t.view(B, H, N, C, -1) for t in (q, k, v))  # [B, H, N, C, D]
    kv = kc.transpose(-1, -2) @ vc  # [B, H, N, D, D]: each chunk's total
    ks = kc.sum(-2)  # [B, H, N, D]
    # state entering each chunk: initial state plus the totals of all earlier chunks
    S_in = S[:, :, None] + kv.cumsum(2) - kv  # [B, H, N, D, D]
    z_in = z[:, :, None] + ks.cumsum(2) - ks  # [B, H, N, D]
    A = (qc @ kc.transpose(-1, -2)).tril()  # [B, H, N, C, C]: causal within the chunk
    num = qc @ S_in + A @ vc  # [B, H, N, C, D]
    den = (qc * z_in[..., None, :]).sum(-1) + A.sum(-1)  # [B, H, N, C]
    y = (num / (den[..., None] + eps)).reshape(B, H, N * C, -1)[..., :T, :]
    return y, S_in[:, :, -1] + kv[:, :, -1], z_in[:, :, -1] + ks[:, :, -1]
