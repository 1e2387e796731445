"""The diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise), real or complex.

The recurrence of the Linear Recurrent Unit (docs/models.md) and of diagonal state-space models.
:func:`diagonal_scan_reference` is the definition, one step at a time; :func:`diagonal_scan` computes
every ``h_t`` at once by a parallel prefix scan in ``ceil(log2 T)`` rounds (Hillis–Steele).

Why it is a scan: the step ``h -> a h + b`` is an affine map, and affine maps compose associatively,
``(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)``. After the round with offset ``d`` every position
holds the composition of the (up to) ``2d`` steps ending there, so ``log2 T`` rounds give every
prefix. A time-invariant ``a`` (the LRU's) needs no per-position product: after round ``d`` the
composed multiplier of a full window is simply ``a^(2d)``. The rounds are ordinary differentiable
tensor operations, so autograd gives the gradient (memory ``O(T log T)`` per channel).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(a: Tensor, b: Tensor, h0: Tensor | None) -> None:
    if b.dim() < 2:
        raise ValueError(f"b must be [..., T, N] (time on dim -2), got shape {tuple(b.shape)}")
    if a.dim() != 1 and a.shape != b.shape:
        raise ValueError(f"a must be [N] (time-invariant) or b's shape {tuple(b.shape)}, "
                         f"got {tuple(a.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must share the last dim N, got {a.shape[-1]} and {b.shape[-1]}")
    if h0 is not None and h0.shape != b.shape[:-2] + b.shape[-1:]:
        raise ValueError(f"h0 must be [..., N] = {tuple(b.shape[:-2] + b.shape[-1:])}, "
                         f"got {tuple(h0.shape)}")


def diagonal_scan_reference(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for ``t = 0..T-1`` from ``h_{-1} = h0`` (zero if None).

    Shapes: ``a [N]`` (time-invariant) or ``[..., T, N]``; ``b [..., T, N]``; ``h0 [..., N]``.
    Returns ``h [..., T, N]``. The plain loop every faster form is tested against.
    """
    _check(a, b, h0)
    h = torch.zeros_like(b[..., 0, :]) if h0 is None else h0.to(b.dtype)
    out = []
    for t in range(b.shape[-2]):
        h = (a if a.dim() == 1 else a[..., t, :]) * h + b[..., t, :]
        out.append(h)
    return torch.stack(out, dim=-2)


def diagonal_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """:func:`diagonal_scan_reference` by a parallel prefix scan (same arguments and result)."""
    _check(a, b, h0)
    T = b.shape[-2]
    if h0 is not None:  # fold the initial state into the first input: h_0 = a_0 h0 + b_0
        a0 = a if a.dim() == 1 else a[..., 0, :]
        b = torch.cat(((a0 * h0.to(b.dtype) + b[..., 0, :]).unsqueeze(-2), b[..., 1:, :]), dim=-2)
    h = b
    if a.dim() == 1:
        power = a  # a^d: the multiplier of a window of d steps
        d = 1
        while d < T:
            # positions t >= d absorb the window ending at t - d; positions t < d are complete
            h = torch.cat((h[..., :d, :], h[..., d:, :] + power * h[..., :-d, :]), dim=-2)
            power = power * power
            d *= 2
        return h
    A = a
    d = 1
    while d < T:
        h = torch.cat((h[..., :d, :], h[..., d:, :] + A[..., d:, :] * h[..., :-d, :]), dim=-2)
        A = torch.cat((A[..., :d, :], A[..., d:, :] * A[..., :-d, :]), dim=-2)
        d *= 2
    return h
