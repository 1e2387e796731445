"""The MRU scan read out as directions: every ``H_t`` rescaled to ``||H_t||_F = sqrt(d)``.

Why (docs/mru.md, "Reading out the state's direction"): a product of spectrally normalised matrices
never overflows, but it shrinks whenever consecutive factors stretch different directions, and a
state carried over a long stream decays towards zero, taking the layer's output with it. The
direction of ``H_t`` is untouched by any scalar factor, so it keeps everything the read-out can use
at any length. ``sqrt(d)`` is the Frobenius norm of the identity and of every orthogonal matrix, so
for those the read-out is the plain product.

Exact in any grouping: scalars commute with matrix products, so rescaling after every step
(:func:`naive_direction_scan`, the definition) and rescaling only between blocks of ``block`` steps
(:func:`direction_scan`, one plain :func:`~matrec.ops.mru_scan.mru_scan` per block) give the same
``H_t``. The block only has to be short enough that a block's product cannot leave float32's range
from a unit-scale start.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...checks import check_int
from .scan import _validate, mru_scan

#: steps per plain scan between two rescalings of the carried state (any value gives the same result
#: up to rounding). A spectrally normalised product can shrink fast: 0.2 decades per token under
#: strongly shearing random weights (tests/nn/test_mru_direction.py); 32 steps leave float32 room for
#: more than 1 decade per token, while a trained layer moved about 0.006.
DIRECTION_BLOCK = 32


def _unit(H: Tensor) -> Tensor:
    """``H * sqrt(d) / ||H||_F`` per matrix of ``H [..., d, d]``."""
    d = H.shape[-1]
    return H * (math.sqrt(d) / H.flatten(-2).norm(dim=-1))[..., None, None]


def naive_direction_scan(states: Tensor, initial_state: Tensor | None = None,
                         resets: Tensor | None = None) -> Tensor:
    """The definition, one step at a time: ``H_t = unit(H_{t-1} @ M_t)`` (``M_t`` alone where
    ``resets`` is set), ``H_0 = initial_state`` or the identity. ``states [..., T, d, d]``,
    ``resets [..., T]`` -> ``[..., T, d, d]``."""
    T = states.shape[-3]
    out = []
    H = initial_state
    for t in range(T):
        M = states[..., t, :, :]
        if H is None:
            step = M
        elif resets is None:
            step = H @ M
        else:
            step = (H @ M).where(~resets[..., t, None, None], M)
        H = _unit(step)
        out.append(H)
    return torch.stack(out, -3)


def direction_scan(states: Tensor, initial_state: Tensor | None = None, *, backend: str = "auto",
                   resets: Tensor | None = None, block: int = DIRECTION_BLOCK) -> Tensor:
    """Every ``H_t`` of :func:`naive_direction_scan`, by a plain parallel scan per block of ``block``
    steps with the state rescaled between blocks. Arguments as :func:`~matrec.ops.mru_scan.mru_scan`
    (``backend``, ``resets``); differentiable by autograd through the blocks."""
    _validate(states, initial_state, None)
    check_int("block", block)
    T = states.shape[-3]
    out = []
    H = initial_state
    for lo in range(0, T, block):
        hi = min(lo + block, T)
        part = None if resets is None else resets[..., lo:hi]
        Hb = _unit(mru_scan(states[..., lo:hi, :, :], H, backend=backend, resets=part))  # [..., hi-lo, d, d]
        out.append(Hb)
        H = Hb[..., -1, :, :]
    return out[0] if len(out) == 1 else torch.cat(out, -3)
