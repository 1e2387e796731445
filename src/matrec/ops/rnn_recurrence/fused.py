"""The "torch" backend: the recurrence as one op, forward without a graph, backward as the reverse
recurrence (two ops per step) and ``dL/dW`` from one GEMM over all steps.

Registered with ``torch.library`` (``matrec::rnn_recurrence``: custom op, fake kernel, autograd), so
modules using it trace under ``torch.compile(fullgraph=True)``. :func:`parameter_grads` and
:func:`register_recurrence_autograd` are shared with the chunked and Triton backends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..precision import compute_dtype
from .nonlinearities import NONLINEARITIES


def _forward_impl(xproj, weight, h0, bias, nonlinearity):
    phi = NONLINEARITIES.get(nonlinearity)
    sdt = compute_dtype(xproj.dtype)
    T, B, H = xproj.shape
    x = xproj.to(sdt)
    Wt = weight.to(sdt).t()
    b = None if bias is None else bias.to(sdt)
    h = x.new_zeros(B, H) if h0 is None else h0.to(sdt)
    z = torch.empty_like(x)    # [T, B, H] pre-activations, saved for backward
    out = torch.empty_like(x)  # [T, B, H]
    for t in range(T):
        torch.addmm(x[t], h, Wt, out=z[t])
        out[t] = phi.forward(z[t], b)
        h = out[t]
    return out, z


@torch.library.custom_op("matrec::rnn_recurrence", mutates_args=())
def _rnn_recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                    nonlinearity: str) -> tuple[Tensor, Tensor]:
    # Both outputs in the state dtype: the backward needs the unrounded states.
    return _forward_impl(xproj, weight, h0, bias, nonlinearity)


@_rnn_recurrence.register_fake
def _(xproj, weight, h0, bias, nonlinearity):
    sdt = compute_dtype(xproj.dtype)
    return torch.empty_like(xproj, dtype=sdt), torch.empty_like(xproj, dtype=sdt)


def parameter_grads(gz: Tensor, z: Tensor, out: Tensor, h0: Tensor | None,
                    nonlinearity: str) -> tuple[Tensor, Tensor]:
    """``(dL/dW [H, H], dL/db [H])`` from ``gz = dL/dz [T, B, H]`` and the states ``out`` (all in the
    state dtype): ``dL/dW = sum_t gz_t^T h_{t-1}`` as one GEMM over all steps (``h_{-1} = h0``, zeros
    when None); ``dL/db`` from the nonlinearity's ``bias_grad`` (zeros without a learned bias).
    Shared by every backend's backward."""
    H = gz.shape[-1]
    grad_W = weight_grad(gz, out, h0)
    phi = NONLINEARITIES.get(nonlinearity)
    grad_b = phi.bias_grad(z, gz).sum(dim=(0, 1)) if phi.bias_grad is not None else gz.new_zeros(H)
    return grad_W, grad_b


def weight_grad(gz: Tensor, out: Tensor, h0: Tensor | None) -> Tensor:
    """``dL/dW = sum_t gz_t^T h_{t-1} [H, H]`` as one GEMM over all steps (``h_{-1} = h0``)."""
    H = gz.shape[-1]
    grad_W = gz[1:].reshape(-1, H).t() @ out[:-1].reshape(-1, H)  # [H, H]
    if h0 is not None:
        grad_W.addmm_(gz[0].t(), h0.to(gz.dtype))
    return grad_W


@torch.library.custom_op("matrec::rnn_recurrence_backward", mutates_args=())
def _rnn_recurrence_backward(grad_out: Tensor, z: Tensor, out: Tensor, weight: Tensor,
                             h0: Tensor | None, bias: Tensor | None, nonlinearity: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (d xproj [T,B,H], d W [H,H], d h0 [B,H], d bias [H]) in the state dtype."""
    phi = NONLINEARITIES.get(nonlinearity)
    sdt = z.dtype
    T = z.shape[0]
    W = weight.to(sdt)
    b = None if bias is None else bias.to(sdt)
    g = grad_out.to(sdt)                                  # [T, B, H] dL/dh_t from outside
    h = out                                               # [T, B, H] states, state dtype
    slope = phi.slope(z, h, b)                            # [T, B, H] dh_t/dz_t, all steps at once
    gz = torch.empty_like(z)                              # [T, B, H] dL/dz_t
    gh = g[T - 1]                                         # total dL/dh_t, starts at the last step
    for t in range(T - 1, -1, -1):
        torch.mul(gh, slope[t], out=gz[t])
        if t > 0:
            gh = torch.addmm(g[t - 1], gz[t], W)          # dL/dh_{t-1} = g_{t-1} + dL/dz_t @ W
    grad_h0 = gz[0] @ W                                   # [B, H]
    grad_W, grad_b = parameter_grads(gz, z, h, h0, nonlinearity)
    return gz, grad_W, grad_h0, grad_b


@_rnn_recurrence_backward.register_fake
def _(grad_out, z, out, weight, h0, bias, nonlinearity):
    T, B, H = z.shape
    return (torch.empty_like(z), z.new_empty(H, H), z.new_empty(B, H), z.new_empty(H))


def register_recurrence_autograd(op, backward_op) -> None:
    """Give a recurrence op ``(xproj, weight, h0, bias, nonlinearity) -> (out, z)`` its autograd:
    ``backward_op(grad_out, z, out, weight, h0, bias, nonlinearity) -> (gx, gW, gh0, gb)`` runs the
    reverse recurrence from the saved pre-activations ``z``. Shared by every backend's op."""

    def setup_context(ctx, inputs, output):
        xproj, weight, h0, bias, nonlinearity = inputs
        out, z = output
        ctx.save_for_backward(z, out, weight, h0, bias)
        ctx.nonlinearity = nonlinearity
        ctx.dtypes = (xproj.dtype, weight.dtype,
                      None if h0 is None else h0.dtype, None if bias is None else bias.dtype)

    def backward(ctx, grad_out, grad_z):
        z, out, weight, h0, bias = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        gx, gW, gh0, gb = backward_op(grad_out, z, out, weight, h0, bias, ctx.nonlinearity)
        dx, dW, dh0, db = ctx.dtypes
        return (gx.to(dx), gW.to(dW), None if h0 is None else gh0.to(dh0),
                None if bias is None else gb.to(db), None)

    op.register_autograd(backward, setup_context=setup_context)


register_recurrence_autograd(_rnn_recurrence, _rnn_recurrence_backward)
