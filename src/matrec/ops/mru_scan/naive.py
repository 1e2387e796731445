"""The MRU scan by its definition: one matrix product per step. The reference for every backend."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_mru_scan"]


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
