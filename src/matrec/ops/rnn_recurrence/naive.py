"""The recurrence by its definition: a plain autograd loop over time. The reference for every backend."""
from __future__ import annotations

import torch
from torch import Tensor

from ..precision import compute_dtype
from .nonlinearities import NONLINEARITIES


def check_inputs(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None, nonlinearity: str):
    """Validate a recurrence call (every backend's); returns the nonlinearity's :class:`Phi`."""
    phi = NONLINEARITIES.get(nonlinearity)
    if not isinstance(xproj, Tensor) or xproj.dim() != 3 or not xproj.is_floating_point():
        raise ValueError(f"xproj must be a floating tensor [T, B, H], got "
                         f"{getattr(xproj, 'shape', type(xproj).__name__)}")
    T, B, H = xproj.shape
    if T < 1:  # as nn.RNN; every backward here needs a step (the loop's g[T-1], torch.stack)
        raise ValueError(f"xproj must have at least one time step, got shape {list(xproj.shape)}")
    if weight.shape != (H, H):
        raise ValueError(f"weight must be [H, H] = [{H}, {H}], got {list(weight.shape)}")
    if h0 is not None and h0.shape != (B, H):
        raise ValueError(f"h0 must be [B, H] = [{B}, {H}], got {list(h0.shape)}")
    if (phi.bias_grad is None) != (bias is None):
        raise ValueError(f"bias must be given exactly when nonlinearity has a learned bias "
                         f"(modrelu); got nonlinearity={nonlinearity!r}, bias={'set' if bias is not None else None}")
    if bias is not None and bias.shape != (H,):
        raise ValueError(f"bias must be [H] = [{H}], got {list(bias.shape)}")
    return phi


def recurrence_reference(xproj: Tensor, weight: Tensor, h0: Tensor | None = None,
                         bias: Tensor | None = None, nonlinearity: str = "modrelu") -> Tensor:
    """The definition, as a plain autograd loop over time. Same arguments as :func:`recurrence`."""
    phi = check_inputs(xproj, weight, h0, bias, nonlinearity)
    sdt = compute_dtype(xproj.dtype)
    T, B, H = xproj.shape
    W = weight.to(sdt)
    b = None if bias is None else bias.to(sdt)
    h = xproj.new_zeros(B, H, dtype=sdt) if h0 is None else h0.to(sdt)
    out = []
    for t in range(T):
        h = phi.forward(xproj[t].to(sdt) + h @ W.t(), b)  # [B, H]
        out.append(h)
    return torch.stack(out).to(xproj.dtype)  # [T, B, H]
