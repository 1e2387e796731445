"""The recurrence as an export-only form: :func:`matrec.ops.time_scan.time_scan` over the step of
the definition (:mod:`.naive`), with a padding mask. Inference only (no custom op, no autograd
kernel): what ``matrec.export`` puts in an exported graph."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..time_scan import keep_where, time_scan
from .nonlinearities import NONLINEARITIES


def recurrence_scan(xproj: Tensor, weight: Tensor, h0: Tensor, bias: Tensor | None = None,
                    nonlinearity: str = "tanh", mask: Tensor | None = None,
                    unrolled: bool = False) -> tuple[Tensor, Tensor]:
    """``h_t = phi(xproj_t + h_{t-1} W^T)`` over ``xproj [T, B, H]`` from ``h0 [B, H]``.

    ``mask [T, B]`` (bool, optional): where unset, the step leaves ``h`` unchanged (and outputs it).
    Returns ``(out [T, B, H], h_T [B, H])``; ``h_T`` is the state after each row's last valid step.
    """
    phi = NONLINEARITIES.get(nonlinearity)

    def step(h, x):
        xp, m = x
        # a linear layer (not h @ W^T): XNNPACK takes a linear with a constant weight
        new = phi.forward(xp + F.linear(h, weight), bias)  # [B, H]
        h = new if m is None else keep_where(m, new, h)
        return h, h

    if mask is None:
        h_T, out = time_scan(lambda h, xp: step(h, (xp, None)), h0, xproj, unrolled=unrolled)
    else:
        h_T, out = time_scan(step, h0, (xproj, mask), unrolled=unrolled)
    return out, h_T
