"""Causal linear attention, chunk-parallel: quadratic attention inside chunks of ``chunk_size``, the
recurrence across chunk totals. Memory ``O(T * chunk_size)``, not ``O(T^2)``; equal to
:func:`matrec.ops.linear_attention.naive.recurrent_form`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def chunked_form(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float,
                 chunk_size: int = 64, starts: Tensor | None = None):
    """Chunk-parallel form, equal to :func:`recurrent_form` (``starts``: see :func:`_segmented`)."""
    if starts is not None:
        return _segmented(q, k, v, S, z, eps, chunk_size, starts)
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


def _chunk_ends(totals: Tensor, start: Tensor, initial: Tensor) -> Tensor:
    """The state after each chunk of a recurrence ``X_c = totals_c + (no start in c) X_{c-1}``,
    ``X_{-1} = initial``: a cumulative sum minus its value before each chunk's latest restart.
    ``totals [B, H, N, ...]``, ``start [B, N]`` bool."""
    B, N = start.shape
    cum = totals.cumsum(2)  # [B, H, N, ...]
    before = torch.cat((torch.zeros_like(cum[:, :, :1]), cum), dim=2)  # [B, H, N + 1, ...]: sum of chunks < j
    last = torch.where(start, torch.arange(N, device=start.device), -1).cummax(-1).values  # [B, N]
    idx = last.clamp(min=0).view(B, 1, N, *([1] * (totals.dim() - 3))).expand_as(totals)
    base = torch.where((last >= 0).view(B, 1, N, *([1] * (totals.dim() - 3))), before.gather(2, idx),
                       -initial[:, :, None])
    return cum - base


def _segmented(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor, eps: float, chunk_size: int,
               starts: Tensor):
    """The chunked form over packed documents (``starts [B, T]``: the state restarts from zero where
    set): the quadratic part masked to one document, a chunk's carried state seen only by queries
    before the chunk's first start, and the chunk totals restarted at each chunk holding a start."""
    B, H, T, D = q.shape
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero features contribute nothing; padding continues the last document
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        starts = F.pad(starts, (0, pad))
    N = (T + pad) // C
    qc, kc, vc = (t.view(B, H, N, C, -1) for t in (q, k, v))  # [B, H, N, C, D]
    doc = starts.long().cumsum(-1).view(B, N, C)  # [B, N, C]: document index of every position
    before = torch.cat((doc.new_zeros(B, 1), doc[:, :-1, -1]), dim=1)  # [B, N]: the document entering
    sees_in = (doc == before[..., None])[:, None]  # [B, 1, N, C]: no start in the chunk up to here
    tail = (doc == doc[..., -1:])[:, None, ..., None].to(k.dtype)  # [B, 1, N, C, 1]: the chunk's last document
    kv = (kc * tail).transpose(-1, -2) @ vc  # [B, H, N, D, D]
    ks = (kc * tail).sum(-2)  # [B, H, N, D]
    has_start = starts.view(B, N, C).any(-1)  # [B, N]
    S_end, z_end = _chunk_ends(kv, has_start, S), _chunk_ends(ks, has_start, z)
    S_in = torch.cat((S[:, :, None], S_end[:, :, :-1]), dim=2)  # [B, H, N, D, D]
    z_in = torch.cat((z[:, :, None], z_end[:, :, :-1]), dim=2)  # [B, H, N, D]
    same = (doc[..., :, None] == doc[..., None, :])[:, None]  # [B, 1, N, C, C]
    A = (qc @ kc.transpose(-1, -2)).tril() * same  # [B, H, N, C, C]: causal, within the document
    num = (qc @ S_in) * sees_in[..., None] + A @ vc  # [B, H, N, C, D]
    den = (qc * z_in[..., None, :]).sum(-1) * sees_in + A.sum(-1)  # [B, H, N, C]
    y = (num / (den[..., None] + eps)).reshape(B, H, N * C, -1)[..., :T, :]
    return y, S_end[:, :, -1], z_end[:, :, -1]
