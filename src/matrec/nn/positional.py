"""Positional encodings for causal attention, applied to queries and keys at absolute positions.

Each encoding is built as ``POSITIONS.get(name)(head_dim, **options)`` and called as
``enc(q, k, offset) -> (q, k)`` with ``q, k [B, H, T, head_dim]`` whose first row sits at absolute
position ``offset`` (the length of the KV cache), so cached generation sees the same positions as a
full recomputation. ``offset`` may also be a tensor ``[B, T]`` of every token's position (rows
padded differently: the attention's masked path).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.precision import compute_dtype
from ..registry import Registry

POSITIONS: Registry = Registry("positional encoding", argument="pos")


def _rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs ``(x[..., i], x[..., i + D/2])`` by the angles behind ``cos``/``sin``
    (``[T, D/2]``, or ``[B, 1, T, D/2]`` per row)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@POSITIONS.register("none")
class NoPosition(nn.Module):
    """No positional information (order then comes only from causality)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()

    def forward(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        return q, k


@POSITIONS.register("rope")
class Rotary(nn.Module):
    """RoPE (Su et al.): rotate 2-D pairs of q and k by ``position * base^(-2i/D)``.

    ``q_m . k_n`` then depends on ``m - n`` only. Angles are formed in at least float32 whatever the input
    dtype, since ``position * frequency`` loses the relative phase in half precision.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]

    def positions(self, T: int, offset, like: Tensor) -> Tensor:
        """``[T]`` from an int ``offset``, ``[B, 1, T]`` (broadcasting over heads) from ``[B, T]``."""
        dtype = compute_dtype(like.dtype)
        if isinstance(offset, Tensor):
            return offset.to(like.device, dtype)[:, None, :]
        return torch.arange(offset, offset + T, device=like.device, dtype=dtype)

    def angles(self, T: int, offset, like: Tensor) -> Tensor:
        pos = self.positions(T, offset, like)
        return pos[..., None] * self.inv_freq.to(like.device, pos.dtype)  # [T, D/2] or [B, 1, T, D/2]

    def forward(self, q: Tensor, k: Tensor, offset) -> tuple[Tensor, Tensor]:
        theta = self.angles(q.shape[-2], offset, q)
        cos, sin = theta.cos().to(q.dtype), theta.sin().to(q.dtype)
        return _rotate_half(q, cos, sin), _rotate_half(k, cos, sin)


@POSITIONS.register("xpos")
class XPos(Rotary):
    """xPos (Sun et al.): RoPE plus a per-frequency decay ``zeta_i^((m - n)/scale_base)`` on q.k.

    ``zeta_i = (2i/D + gamma) / (1 + gamma)`` with ``gamma = 0.4``: q is scaled by ``zeta^(m/s)``
    and k by ``zeta^(-n/s)``, so the product decays with distance whatever the absolute offset.
    Positions are absolute (so the KV cache stays valid); in float32 the key scale overflows beyond
    roughly ``70 * scale_base`` tokens.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scale_base: float = 512.0,
                 gamma: float = 0.4) -> None:
        super().__init__(head_dim, base)
        zeta = (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim + gamma) / (1 + gamma)
        self.register_buffer("zeta", zeta, persistent=False)  # [D/2]
        self.scale_base = scale_base

    def forward(self, q: Tensor, k: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        T = q.shape[-2]
        theta = self.angles(T, offset, q)
        cos, sin = theta.cos(), theta.sin()
        pos = self.positions(T, offset, q)
        scale = self.zeta.to(q.device, theta.dtype) ** (pos[..., None] / self.scale_base)  # as theta
        q = _rotate_half(q, (cos * scale).to(q.dtype), (sin * scale).to(q.dtype))
        k = _rotate_half(k, (cos / scale).to(k.dtype), (sin / scale).to(k.dtype))
        return q, k
