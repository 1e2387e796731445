"""Persistent Triton kernel for ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` (forward and backward).

One launch steps through all of time: each program owns ``BLOCK_B`` batch rows, loads ``W`` once,
keeps its state in float32 registers, and does the ``[BLOCK_B, H] x [H, H]`` product per step with
``tl.dot`` in IEEE float32 (no TF32: the state must not drift). The backward kernel runs the reverse
recurrence ``dL/dh_{t-1} = g_{t-1} + (dL/dh_t * phi'(z_t)) @ W`` from the saved pre-activations;
``dL/dW`` and the modReLU bias gradient are then one GEMM and one reduction in PyTorch, exactly as
in :mod:`matrec.ops.recurrence` (the reference for this kernel).

Registered as ``matrec::rnn_recurrence_triton`` (custom op, fake kernel, autograd). CPU tensors run
in Triton's interpreter (slow: how the tests check it), CUDA tensors compiled. The whole ``W`` tile lives in one
program, so hidden sizes are limited to ``MAX_HIDDEN``; larger ones belong to the PyTorch op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .recurrence import NONLINEARITIES, _check, register_recurrence_autograd
from .triton_scan import launchable as _launcher  # interpreted for CPU tensors, compiled for CUDA

MAX_HIDDEN = 128  # ptxas for sm_90: H = 256 needs 272-336 KiB shared memory, over the 228 KiB limit
_CODES = {"tanh": 0, "relu": 1, "modrelu": 2, "identity": 3}


def _fwd_kernel(X, W, H0, BIAS, OUT, Z, T, B, H,
                HAS_H0: tl.constexpr, NL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mb, mh = rb < B, rh < H
    m2 = mb[:, None] & mh[None, :]
    # W^T as [k, j] so the step is h @ W^T; padded rows/cols are 0, so padded state stays phi(0) = 0
    wt = tl.load(W + rh[None, :] * H + rh[:, None], mask=mh[:, None] & mh[None, :], other=0.0)
    b = tl.load(BIAS + rh, mask=mh, other=0.0)
    if HAS_H0:
        h = tl.load(H0 + rb[:, None] * H + rh[None, :], mask=m2, other=0.0)
    else:
        h = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)
    for t in range(T):
        off = t * B * H + rb[:, None] * H + rh[None, :]
        z = tl.load(X + off, mask=m2, other=0.0) + tl.dot(h, wt, input_precision="ieee")
        if NL == 0:
            h = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))  # tanh; saturates cleanly at +-1
        elif NL == 1:
            h = tl.maximum(z, 0.0)
        elif NL == 2:
            s = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
            h = s * tl.maximum(tl.abs(z) + b[None, :], 0.0)
        else:
            h = z
        h = tl.where(m2, h, 0.0)
        tl.store(Z + off, z, mask=m2)
        tl.store(OUT + off, h, mask=m2)


def _bwd_kernel(G, Z, OUT, W, BIAS, GZ, GH0, T, B, H,
                NL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mb, mh = rb < B, rh < H
    m2 = mb[:, None] & mh[None, :]
    w = tl.load(W + rh[:, None] * H + rh[None, :], mask=mh[:, None] & mh[None, :], other=0.0)  # [j, k]
    b = tl.load(BIAS + rh, mask=mh, other=0.0)
    carry = tl.full((BLOCK_B, BLOCK_H), 0.0, tl.float32)  # dL/dh_t flowing back through W
    for i in range(T):
        t = T - 1 - i
        off = t * B * H + rb[:, None] * H + rh[None, :]
        gh = tl.load(G + off, mask=m2, other=0.0) + carry
        z = tl.load(Z + off, mask=m2, other=0.0)
        h = tl.load(OUT + off, mask=m2, other=0.0)
        if NL == 0:
            d = 1.0 - h * h
        elif NL == 1:
            d = tl.where(z > 0, 1.0, 0.0)
        elif NL == 2:
            s = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
            d = tl.where(tl.abs(z) + b[None, :] > 0, s * s, 0.0)
        else:
            d = tl.full(z.shape, 1.0, tl.float32)
        gz = tl.where(m2, gh * d, 0.0)
        tl.store(GZ + off, gz, mask=m2)
        carry = tl.dot(gz, w, input_precision="ieee")
    tl.store(GH0 + rb[:, None] * H + rh[None, :], carry, mask=m2)


def _blocks(B: int, H: int) -> tuple[int, int]:
    # tl.dot needs every dimension >= 16
    return 16, max(16, triton.next_power_of_2(H))


# Kernel bodies are plain functions wrapped per call (see matrec.ops.triton_scan.launchable), so they use only tl.* builtins:
# triton.language.standard helpers (tl.zeros, tl.sigmoid, ...) are frozen in one mode at import.


@torch.library.custom_op("matrec::rnn_recurrence_triton", mutates_args=())
def _triton_recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                       nonlinearity: str) -> tuple[Tensor, Tensor]:
    T, B, H = xproj.shape
    x = xproj.float().contiguous()
    W = weight.float().contiguous()
    b = bias.float().contiguous() if bias is not None else x.new_zeros(H)
    h0c = h0.float().contiguous() if h0 is not None else x.new_zeros(1)
    out = torch.full_like(x, float("nan"))  # NaN-poisoned: an element the kernel skips shows up
    z = torch.full_like(x, float("nan"))
    BB, BH = _blocks(B, H)
    _launcher(_fwd_kernel, x.device)[(triton.cdiv(B, BB),)](x, W, h0c, b, out, z, T, B, H, HAS_H0=h0 is not None,
                                       NL=_CODES[nonlinearity], BLOCK_B=BB, BLOCK_H=BH)
    return out, z


@_triton_recurrence.register_fake
def _(xproj, weight, h0, bias, nonlinearity):
    return (torch.empty_like(xproj, dtype=torch.float32), torch.empty_like(xproj, dtype=torch.float32))


@torch.library.custom_op("matrec::rnn_recurrence_triton_backward", mutates_args=())
def _triton_recurrence_backward(grad_out: Tensor, z: Tensor, out: Tensor, weight: Tensor,
                                h0: Tensor | None, bias: Tensor | None, nonlinearity: str
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, B, H = z.shape
    g = grad_out.float().contiguous()
    W = weight.float().contiguous()
    b = bias.float().contiguous() if bias is not None else z.new_zeros(H)
    gz = torch.full_like(z, float("nan"))
    gh0 = z.new_full((B, H), float("nan"))
    BB, BH = _blocks(B, H)
    _launcher(_bwd_kernel, z.device)[(triton.cdiv(B, BB),)](g, z, out, W, b, gz, gh0, T, B, H,
                                       NL=_CODES[nonlinearity], BLOCK_B=BB, BLOCK_H=BH)
    h0s = z.new_zeros(B, H) if h0 is None else h0.float()
    h_prev = torch.cat([h0s[None], out[:-1]])                 # [T, B, H]
    grad_W = gz.reshape(-1, H).t() @ h_prev.reshape(-1, H)    # [H, H]
    phi = NONLINEARITIES.get(nonlinearity)
    grad_b = phi.bias_grad(z, gz).sum(dim=(0, 1)) if phi.bias_grad is not None else z.new_zeros(H)
    return gz, grad_W, gh0, grad_b


@_triton_recurrence_backward.register_fake
def _(grad_out, z, out, weight, h0, bias, nonlinearity):
    T, B, H = z.shape
    return torch.empty_like(z), z.new_empty(H, H), z.new_empty(B, H), z.new_empty(H)


register_recurrence_autograd(_triton_recurrence, _triton_recurrence_backward)


def triton_recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None = None,
                      bias: Tensor | None = None, nonlinearity: str = "modrelu") -> Tensor:
    """Same contract as :func:`matrec.ops.recurrence.recurrence` (float32 state; float64 inputs
    are computed in float32 here), for ``H <= MAX_HIDDEN``."""
    _check(xproj, weight, h0, bias, nonlinearity)
    if xproj.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size must be <= {MAX_HIDDEN} for the Triton recurrence, got {xproj.shape[-1]}")
    return _triton_recurrence(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)
