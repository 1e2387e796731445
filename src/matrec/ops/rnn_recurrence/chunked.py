"""The "chunked" backend: the identity (linear) recurrence in parallel over time.

h_t = x_t + h_{t-1} A^T unrolled inside a chunk of C steps (h_{c,0} = the state entering chunk c):
    h_{c,j} = h_{c,0} (A^T)^j + sum_{i<=j} x_{c,i} (A^T)^(j-i)
            = (h_{c,0} + sum_{i<=j} x_{c,i} (A^T)^-i) (A^T)^j.
So a chunk costs a batched GEMM with the C matrices (A^T)^-i, a cumsum over the chunk and a batched
GEMM with (A^T)^j; only the T/C chunk-entry states are carried sequentially. Powers never go past C,
so nothing like A^-T grows. This is the eigen form y_t = u_t + lam * y_{t-1} (y = h V^-T) with the
scalings lam^-i, lam^j folded into the two projections: it needs no eigendecomposition, hence no
conditioning problem with repeated eigenvalues (W = I, Henaff's blocks), and it ran faster
than the eigenbasis form (docs/mornn.md, "Speed").

Two forward ops share one backward: ``matrec::rnn_recurrence_chunked`` raises on a ``W`` whose powers
are ill-conditioned; ``matrec::rnn_recurrence_chunked_or_loop`` (auto's) runs the sequential loop
instead. Both return ``(out, powers, chunked)``: the saved powers of ``W`` and a boolean scalar that
says which path ran, which the backward reads (so the choice is an explicit output, not a value
hidden in the data).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..precision import compute_dtype
from .fused import _forward_impl, _rnn_recurrence_backward, parameter_grads

CHUNK_SIZE = 16
# Rounding in the chunked sums grows with max_i ||W^i|| ||W^-i|| / H (1 for orthogonal W); refused above this.
MAX_POWER_CONDITION = 10.0


def chunk_powers(weight: Tensor, chunk_size: int, dtype: torch.dtype) -> tuple[Tensor, float]:
    """``[2, C, H, H]`` = (W^1..W^C, W^-1..W^-C) in ``dtype`` and the power condition
    ``max_i ||W^i||_F ||W^-i||_F / H`` (1 for orthogonal ``W``; inf when ``W`` is singular).

    Computed in float64 and rounded once to ``dtype``, so the float32 result is at least as close to
    float64 arithmetic as the loop's (``python benchmarks/recurrence_crossover.py --accuracy``;
    figures in docs/mornn.md, "Speed"). Powers taken in float32 would be rounded at
    each of ~log2(C) products, ``W^-1`` first, and on repeated eigenvalues the per-chunk errors add
    up coherently over the chunks."""
    W = weight.detach().double()
    H = W.shape[-1]
    W_inv, info = torch.linalg.inv_ex(W)
    if info.item() != 0:
        return W.new_full((2, chunk_size, H, H), float("nan"), dtype=dtype), float("inf")
    P = W.new_empty(2, chunk_size, H, H)                  # [2, C, H, H]
    P[0, 0], P[1, 0] = W, W_inv
    k = 1
    while k < chunk_size:  # doubling: W^(k+1..2k) = W^(1..k) W^k, the k products as ONE [k*H, H] GEMM
        n = min(k, chunk_size - k)
        for s in range(2):
            torch.mm(P[s, :n].reshape(n * H, H), P[s, k - 1], out=P[s, k:k + n].view(n * H, H))
        k += n
    norms = P.flatten(2).norm(dim=2)                      # [2, C]
    condition = (norms[0] * norms[1]).max().item() / H
    return P.to(dtype), condition if condition == condition else float("inf")  # NaN (overflow) -> inf


def _chunk_size(T: int, H: int) -> int:
    return max(1, min(CHUNK_SIZE if H <= 64 else CHUNK_SIZE // 2, T))


def chunked_linear_recurrence(x: Tensor, h0: Tensor | None, P_in: Tensor, P_out: Tensor) -> Tensor:
    """``h_t = x_t + h_{t-1} A^T`` for ``x [T, B, H]``, given ``P_in [C, H, H]`` = (A^T)^-1..(A^T)^-C
    and ``P_out [C, H, H]`` = (A^T)^1..(A^T)^C in ``x``'s dtype. Returns ``h [T, B, H]``."""
    T, B, H = x.shape
    C = P_in.shape[0]
    N, full = -(-T // C), T // C                          # chunks, of which full ones
    # position-major [C, N, B, H]: the batched GEMMs run over the in-chunk position i
    xc = x.new_empty(C, N, B, H)
    xc.transpose(0, 1)[:full] = x[:full * C].view(full, C, B, H)
    if full < N:
        rest = T - full * C
        xc[:rest, full] = x[full * C:]
        xc[rest:, full] = 0
    S = torch.bmm(xc.view(C, N * B, H), P_in).view(C, N, B, H)  # x_{c,i} (A^T)^-i
    for i in range(1, C):                                 # cumsum over i: C in-place adds, faster than
        S[i] += S[i - 1]                                  # torch.cumsum over dim 0 (a slow path) here
    carries = x.new_empty(N, B, H)                        # [N, B, H] state entering each chunk
    carry = x.new_zeros(B, H) if h0 is None else h0
    for c in range(N):                                    # T/C sequential steps instead of T
        carries[c] = carry
        carry = (carry + S[-1, c]) @ P_out[-1]
    S += carries
    hc = torch.bmm(S.view(C, N * B, H), P_out).view(C, N, B, H)  # [C, N, B, H]
    h = x.new_empty(T, B, H)
    h[:full * C].view(full, C, B, H).copy_(hc.transpose(0, 1)[:full])
    if full < N:
        h[full * C:] = hc[:T - full * C, full]
    return h


def _chunked_forward(xproj, weight, h0, strict):
    sdt = compute_dtype(xproj.dtype)
    T, B, H = xproj.shape
    P, condition = chunk_powers(weight, _chunk_size(T, H), sdt)
    if not condition <= MAX_POWER_CONDITION:
        if strict:
            raise ValueError(
                f"weight must have well-conditioned powers for backend='chunked' (an orthogonal W): "
                f"max_i ||W^i|| ||W^-i|| / H = {condition:.3g} over a chunk of {P.shape[1]} steps, "
                f"above {MAX_POWER_CONDITION}; use backend='torch'")
        out = _forward_impl(xproj, weight, h0, None, "identity")[0]
        return out, torch.zeros_like(P), torch.tensor(False, device=xproj.device)
    x = xproj.to(sdt)
    out = chunked_linear_recurrence(x, None if h0 is None else h0.to(sdt),
                                    P[1].transpose(1, 2), P[0].transpose(1, 2))
    return out, P, torch.tensor(True, device=xproj.device)


def _chunked_fake(xproj, weight, h0, bias, nonlinearity):
    sdt = compute_dtype(xproj.dtype)
    T, B, H = xproj.shape
    return (torch.empty_like(xproj, dtype=sdt), xproj.new_empty(2, _chunk_size(T, H), H, H, dtype=sdt),
            xproj.new_empty((), dtype=torch.bool))


@torch.library.custom_op("matrec::rnn_recurrence_chunked", mutates_args=())
def _rnn_recurrence_chunked(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                            nonlinearity: str) -> tuple[Tensor, Tensor, Tensor]:
    return _chunked_forward(xproj, weight, h0, strict=True)


@torch.library.custom_op("matrec::rnn_recurrence_chunked_or_loop", mutates_args=())
def _rnn_recurrence_chunked_or_loop(xproj: Tensor, weight: Tensor, h0: Tensor | None,
                                    bias: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor, Tensor]:
    return _chunked_forward(xproj, weight, h0, strict=False)


_rnn_recurrence_chunked.register_fake(_chunked_fake)
_rnn_recurrence_chunked_or_loop.register_fake(_chunked_fake)


@torch.library.custom_op("matrec::rnn_recurrence_chunked_backward", mutates_args=())
def _rnn_recurrence_chunked_backward(grad_out: Tensor, powers: Tensor, chunked: Tensor, out: Tensor,
                                     weight: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (d xproj [T,B,H], d W [H,H], d h0 [B,H]) in the state dtype."""
    if not chunked.item():  # the forward ran the loop: so does the backward
        gz, grad_W, grad_h0, _ = _rnn_recurrence_backward(grad_out, out, out, weight, h0, None, "identity")
        return gz, grad_W, grad_h0
    sdt = out.dtype
    W = weight.to(sdt)
    # dL/dz_t = g_t + dL/dz_{t+1} W: the forward form with A = W^T, run backwards in time
    gz = chunked_linear_recurrence(grad_out.to(sdt).flip(0), None, powers[1], powers[0]).flip(0)
    grad_h0 = gz[0] @ W                                   # [B, H]
    grad_W, _ = parameter_grads(gz, out, out, h0, "identity")
    return gz, grad_W, grad_h0


@_rnn_recurrence_chunked_backward.register_fake
def _(grad_out, powers, chunked, out, weight, h0):
    T, B, H = out.shape
    return torch.empty_like(out), out.new_empty(H, H), out.new_empty(B, H)


def _setup_context(ctx, inputs, output):
    xproj, weight, h0, bias, nonlinearity = inputs
    out, powers, chunked = output
    ctx.save_for_backward(powers, chunked, out, weight, h0)
    ctx.dtypes = (xproj.dtype, weight.dtype, None if h0 is None else h0.dtype)


def _backward(ctx, grad_out, grad_powers, grad_chunked):
    powers, chunked, out, weight, h0 = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    gx, gW, gh0 = _rnn_recurrence_chunked_backward(grad_out, powers, chunked, out, weight, h0)
    dx, dW, dh0 = ctx.dtypes
    return gx.to(dx), gW.to(dW), None if h0 is None else gh0.to(dh0), None, None


for _op in (_rnn_recurrence_chunked, _rnn_recurrence_chunked_or_loop):
    _op.register_autograd(_backward, setup_context=_setup_context)
