"""MRU prefix-product scan: ``H_t = H_{t-1} @ M_t`` (SPEC section 1.1).

Bootstrap version: only the sequential reference exists here so far.
"""
from __future__ import annotations

import torch
from torch import Tensor


def naive_mru_scan(states: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """The definition, one product per step; autograd runs through the loop. Reference only.

    Args:
        states: ``[..., T, d, d]`` input state matrices ``M_t``.
        initial_state: ``[..., d, d]`` or None (the identity).
    Returns:
        ``[..., T, d, d]``: every ``H_t``.
    """
    T = states.shape[-3]
    H = initial_state
    out = []
    for t in range(T):
        M = states[..., t, :, :]
        H = M if H is None else H @ M
        out.append(H)
    return torch.stack(out, dim=-3)


def mru_scan(states: Tensor, initial_state: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    return naive_mru_scan(states, initial_state)
