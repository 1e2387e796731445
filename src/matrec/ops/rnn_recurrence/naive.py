"""The recurrence by its definition: a plain autograd loop over time. The reference for every backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import compute_dtype
from ..time_scan import keep_where, time_scan
from .nonlinearities import NONLINEARITIES, Phi


def recurrence_step(h: Tensor, xp: Tensor, weight: Tensor, bias: Tensor | None, phi: Phi,
                    mask_t: Tensor | None = None, reset_t: Tensor | None = None) -> Tensor:
    """One step of the definition, ``h [B, H]``, ``xp [B, H]`` -> the next ``h``; where ``mask_t [B]``
    is unset the step keeps ``h``; where ``reset_t [B]`` is set a packed document starts, from
    ``h = 0``. A linear layer, not ``h @ W^T``: XNNPACK takes a linear with a constant weight (the
    exported graph)."""
    if reset_t is not None:
        h = h * ~reset_t[:, None]
    new = phi.forward(xp + F.linear(h, weight), bias)  # [B, H]
    return new if mask_t is None else keep_where(mask_t, new, h)


def check_mask(mask: Tensor | None, xproj: Tensor, argument: str = "mask") -> None:
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or mask.shape != xproj.shape[:2]):
        raise ValueError(f"{argument} must be None or a bool tensor [T, B] = {list(xproj.shape[:2])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")


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
                         bias: Tensor | None = None, nonlinearity: str = "modrelu",
                         mask: Tensor | None = None, resets: Tensor | None = None) -> Tensor:
    """The definition, as a plain autograd loop over time. Same arguments as :func:`recurrence`."""
    phi = check_inputs(xproj, weight, h0, bias, nonlinearity)
    check_mask(mask, xproj)
    check_mask(resets, xproj, "resets")
    sdt = compute_dtype(xproj.dtype)
    T, B, H = xproj.shape
    W = weight.to(sdt)
    b = None if bias is None else bias.to(sdt)
    h = xproj.new_zeros(B, H, dtype=sdt) if h0 is None else h0.to(sdt)
    out = []
    for t in range(T):
        h = recurrence_step(h, xproj[t].to(sdt), W, b, phi, None if mask is None else mask[t],
                            None if resets is None else resets[t])  # [B, H]
        out.append(h)
    return torch.stack(out).to(xproj.dtype)  # [T, B, H]


def recurrence_scan(xproj: Tensor, weight: Tensor, h0: Tensor | None = None, bias: Tensor | None = None,
                    nonlinearity: str = "modrelu", mask: Tensor | None = None,
                    resets: Tensor | None = None) -> Tensor:
    """:func:`recurrence_step` through :func:`matrec.ops.time_scan.time_scan`: one loop node whose
    length stays dynamic under ``torch.export`` (the export-safe backend ``"scan"``). Same
    arguments and result as :func:`recurrence_reference`."""
    phi = NONLINEARITIES.get(nonlinearity)
    sdt = compute_dtype(xproj.dtype)
    W = weight.to(sdt)
    b = None if bias is None else bias.to(sdt)
    h = xproj.new_zeros(xproj.shape[1:], dtype=sdt) if h0 is None else h0.to(sdt)

    # absent inputs stand in as all-valid / no-restart flags: one step function for every case
    flags = [torch.ones_like(xproj[..., 0], dtype=torch.bool) if mask is None else mask,
             torch.zeros_like(xproj[..., 0], dtype=torch.bool) if resets is None else resets]

    def step(h, x):
        xp, m, r = x
        h = recurrence_step(h, xp, W, b, phi, None if mask is None else m, None if resets is None else r)
        return h, h

    _, out = time_scan(step, h, (xproj.to(sdt), *flags))
    return out.to(xproj.dtype)  # [T, B, H]
