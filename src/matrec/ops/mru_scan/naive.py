"""The MRU scan by its definition: one matrix product per step. The reference for every backend."""
from __future__ import annotations

import torch
from torch import Tensor

from ..time_scan import time_scan

__all__ = ["naive_mru_scan", "mru_step", "scan_mru_scan"]


def mru_step(H: Tensor, M: Tensor) -> Tensor:
    """One step of the definition: ``H_t = H_{t-1} @ M_t``."""
    return H @ M


def naive_mru_scan(states: Tensor, initial_state: Tensor | None = None, resets: Tensor | None = None) -> Tensor:
    """The definition, one product per step; autograd runs through the loop. Reference only.

    Args:
        states: ``[..., T, d, d]`` input state matrices ``M_t``.
        initial_state: ``[..., d, d]`` or None (the identity).
        resets: ``[..., T]`` bool or None: where set, a document starts and ``H_t = M_t``.
    Returns:
        ``[..., T, d, d]``: every ``H_t``.
    """
    T = states.shape[-3]
    H = initial_state
    out = []
    for t in range(T):
        M = states[..., t, :, :]
        if H is None:
            H = M
        else:
            H = mru_step(H, M)
            if resets is not None:
                H = torch.where(resets[..., t, None, None], M, H)
        out.append(H)
    return torch.stack(out, dim=-3)


def scan_mru_scan(states: Tensor, initial_state: Tensor | None = None, resets: Tensor | None = None,
                  **_) -> Tensor:
    """The definition's step through :func:`matrec.ops.time_scan.time_scan`: one loop node whose
    length stays dynamic under ``torch.export`` (the export-safe backend ``"scan"``). Flat shapes
    ``states [N, T, d, d]``, ``initial_state [N, d, d]`` or None -> ``[N, T, d, d]``."""
    if initial_state is None:
        eye = torch.eye(states.shape[-1], dtype=states.dtype, device=states.device)
        initial_state = eye.expand(states.shape[0], -1, -1).clone()

    def step(H, x):
        M, r = x if resets is not None else (x, None)
        H = mru_step(H, M) if r is None else torch.where(r[:, None, None], M, mru_step(H, M))
        return H, H

    xs = states.transpose(0, 1) if resets is None else (states.transpose(0, 1), resets.t())
    _, H = time_scan(step, initial_state, xs)  # [T, N, d, d]
    return H.transpose(0, 1)
