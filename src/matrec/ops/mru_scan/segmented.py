"""The MRU scan over packed documents: ``H_t = H_{t-1} @ M_t``, except ``H_t = M_t`` where a
document starts (``resets [N, T]``): every document's products start afresh inside one row.

A reset cuts the product, which no chain of right-multiplications can express, but a chain of
affine maps can: step ``t`` is ``X -> X @ U_t + L_t`` with ``(U, L) = (M_t, 0)`` inside a document and
``(0, M_t)`` at its start. Those maps are the stacked ``[U; L]`` elements the shared backward of
:mod:`.scan` already scans (``r = 2d``, docs/design.md §2.2), so every pattern backend computes the
segmented scan as it is, in both directions: the forward scans the affine maps, the backward the
reverse recurrence ``B_t = G_t + B_{t+1} M_{t+1}^T`` with the term dropped where step ``t+1`` starts a
document (``H_{t+1}`` does not depend on ``H_t`` there). About twice the forward work of the plain scan.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class SegmentedPatternScan(torch.autograd.Function):
    """``states [N, T, d, d]``, ``initial_state [N, d, d]`` or None (identity), ``resets [N, T]`` bool."""

    @staticmethod
    def forward(ctx, states, initial_state, resets, pattern, chunk_size):
        N, T, d, _ = states.shape
        with torch.autocast(device_type=states.device.type, enabled=False):
            r = resets[:, :, None, None]  # [N, T, 1, 1]
            E = states.new_zeros(N, T, 2 * d, d)  # [N, T, 2d, d]: stacked [U; L]
            E[:, :, :d] = torch.where(r, 0.0, states)
            E[:, :, d:] = torch.where(r, states, 0.0)
            # the first map applied to H_0 once, here, so the prefixes act on X_0 = 0: H_t = L_{1..t}
            first = states[:, 0] if initial_state is None else initial_state @ states[:, 0]
            E[:, 0, :d] = 0
            E[:, 0, d:] = torch.where(r[:, 0], states[:, 0], first)
            H = pattern(E, chunk_size)[:, :, d:].contiguous()  # [N, T, d, d]
        ctx.save_for_backward(states, initial_state, resets, H)
        ctx.pattern, ctx.chunk_size = pattern, chunk_size
        return H

    @staticmethod
    @once_differentiable
    def backward(ctx, G):  # G: [N, T, d, d] = dL/dH_t from outside the scan
        states, H0, resets, H = ctx.saved_tensors
        N, T, d, _ = states.shape
        with torch.autocast(device_type=states.device.type, enabled=False):
            keep = ~resets[:, 1:, None, None]  # [N, T-1, 1, 1]: step t+1 continues its document
            E = G.new_empty(N, T, 2 * d, d)
            E[:, 0, :d] = 0
            E[:, 1:, :d] = (states[:, 1:] * keep).flip(1).mT
            E[:, :, d:] = G.flip(1)
            B = ctx.pattern(E, ctx.chunk_size)[:, :, d:].flip(1)  # [N, T, d, d]: total adjoints
            dM = dH0 = None
            start0 = resets[:, 0, None, None]  # [N, 1, 1]
            if ctx.needs_input_grad[0]:
                dM = torch.empty_like(states)  # dL/dM_t = H_{t-1}^T B_t, B_t at a document's start
                dM[:, 1:] = torch.where(keep, H[:, :-1].mT @ B[:, 1:], B[:, 1:])
                dM[:, 0] = B[:, 0] if H0 is None else torch.where(start0, B[:, 0], H0.mT @ B[:, 0])
            if H0 is not None and ctx.needs_input_grad[1]:
                dH0 = torch.where(start0, 0.0, B[:, 0] @ states[:, 0].mT)
        return dM, dH0, None, None, None
