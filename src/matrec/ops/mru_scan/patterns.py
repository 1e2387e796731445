"""Parallel scan patterns over "stacked elements" ``[N, T, r, d]``.

An element is a matrix (``r = d``: the forward scan) or an affine map ``X -> X @ U + L`` stored as
``[U; L]`` (``r = 2d``: the backward scan, see :mod:`matrec.ops.mru_scan.scan` and docs/design.md).
Every pattern takes ownership of ``x [N, T, r, d]`` (contiguous), scans along dim 1, in place where
convenient, and returns the inclusive prefix ``x_1, x_1 o x_2, ...`` of the same shape.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# The associative operator on stacked elements [..., r, d] (r = d: matrix; r = 2d: affine [U; L]).


def combine(a: Tensor, b: Tensor) -> Tensor:
    """``a`` then ``b`` (``a`` is the earlier element): ``a @ b_U`` plus ``[0; b_L]`` when affine."""
    d = b.shape[-1]
    out = a @ b[..., :d, :]
    if b.shape[-2] > d:  # affine: (U1, L1) then (U2, L2) = (U1 U2, L1 U2 + L2)
        out[..., d:, :] += b[..., d:, :]
    return out


def extend_prefix(a: Tensor, b: Tensor) -> None:
    """``b <- a o b`` in place, where ``a`` is a complete prefix (it starts at position 0).

    In the backward the scan starts from ``X_0 = 0``, so of a complete prefix ``[U; L]`` only ``L``
    is ever read again (it *is* ``X_t``). Computing just that row block halves the work of every
    step whose left operand is a complete prefix; the ``U`` rows left in ``b`` are then stale and
    must not be read (no pattern reads the ``U`` of a complete prefix).
    """
    d = b.shape[-1]
    if b.shape[-2] > d:
        b[..., d:, :] += a[..., d:, :] @ b[..., :d, :]
    else:
        b.copy_(a @ b)


def identity_elements(x: Tensor, n: int) -> Tensor:
    """``n`` identity elements ``[I; 0]`` shaped like ``x [N, T, r, d]`` along dim 1."""
    N, _, r, d = x.shape
    # built without in-place writes into a view: torch.compile cannot functionalise those
    e = torch.eye(r, d, dtype=x.dtype, device=x.device)  # [r, d] = [I; 0]
    return e.expand(N, n, r, d)


# ---------------------------------------------------------------------------------------------
# Scan patterns. Each takes ownership of x [N, T, r, d] (contiguous), scans along dim 1 (in place
# where convenient) and returns the inclusive prefix x_1, x_1 o x_2, ... of the same shape.


def sequential_scan(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """T - 1 combines one after another: the definition."""
    for t in range(1, x.shape[1]):
        extend_prefix(x[:, t - 1], x[:, t])
    return x


def hillis_steele_scan(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """ceil(log2 T) steps; step k combines every element with the one 2^k before it."""
    T = x.shape[1]
    k = 1
    while k < T:
        x[:, k:] = combine(x[:, :-k], x[:, k:])  # right side is materialised before the write
        k *= 2
    return x


def sklansky_scan(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """ceil(log2 T) steps; step k: the second half of every 2^(k+1)-block takes its first half's last."""
    N, T, r, d = x.shape
    h = 1
    while h < T:
        full = (T // (2 * h)) * (2 * h)
        if full:
            xv = x[:, :full].view(N, full // (2 * h), 2 * h, r, d)  # [N, blocks, 2h, r, d]
            xv[:, :, h:] = combine(xv[:, :, h - 1 : h], xv[:, :, h:])
        if T - full > h:  # a partial last block that reaches its second half
            x[:, full + h :] = combine(x[:, full + h - 1 : full + h], x[:, full + h :])
        h *= 2
    return x


def brent_kung_scan(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Up-sweep (tree of partial totals) then down-sweep; ~2T combines in ~2 log2 T steps."""
    T = x.shape[1]
    s = 2
    while s <= T:  # up-sweep: x[i] for (i + 1) % s == 0 becomes the total of its s-block
        x[:, s - 1 :: s] = combine(x[:, s // 2 - 1 : T - s // 2 : s], x[:, s - 1 :: s])
        s *= 2
    s //= 2
    while s >= 2:  # down-sweep: fill the middles of the blocks from the left totals
        first = s + s // 2 - 1
        if first < T:  # left operands are complete prefixes by now
            extend_prefix(x[:, s - 1 : T - s // 2 : s], x[:, first::s])
        s //= 2
    return x


def default_chunk_size(T: int) -> int:
    """``ceil(sqrt(T))``: balances the in-chunk steps (C) against the steps over chunk totals (T/C)."""
    return max(1, math.isqrt(T - 1) + 1) if T > 1 else 1


def chunked_scan(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Prefix inside every chunk (all chunks at once), a scan over chunk totals, one fix-up each."""
    N, T, r, d = x.shape
    C = min(chunk_size or default_chunk_size(T), T)
    nc = -(-T // C)
    if nc * C != T:  # pad the last chunk with identities; they never reach the output
        x = torch.cat([x, identity_elements(x, nc * C - T)], dim=1)
    xv = x.view(N, nc, C, r, d)  # [N, chunks, C, r, d]
    for j in range(1, C):
        xv[:, :, j] = combine(xv[:, :, j - 1], xv[:, :, j])
    if nc > 1:
        carry = xv[:, :-1, C - 1].clone()  # [N, nc-1, r, d]: chunk totals (clone: fixed up below)
        # carry[c] becomes the complete prefix up to the end of chunk c
        # many chunks (explicit small chunk_size on a long T): chunk the totals too, else a loop
        carry = chunked_scan(carry) if nc - 1 > 64 else sequential_scan(carry)
        extend_prefix(carry.unsqueeze(2), xv[:, 1:])
    return x[:, :T]
