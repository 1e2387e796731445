"""Fused single-layer RNN recurrence ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` with its own backward.

PyTorch's fused RNN kernels know only tanh and relu; MORNN's memory recipe needs modReLU (and offers
identity). Autograd through a Python loop over time records ~5 graph nodes per step and replays them
all backwards; here the forward runs without a graph, saves the pre-activations ``z_t``, and the
backward runs the reverse recurrence with ``W`` (``dL/dh_{t-1} = dL/dz_t @ W``) in two ops per step,
then gets ``dL/dW`` from one GEMM over all steps (plus one for ``h0``; :func:`parameter_grads`), not T small ones.

Conventions (nn.RNN's): time-major ``xproj [T, B, H]`` (the input projection with both biases
already added), ``W [H, H]`` acts on row vectors as ``h @ W^T``, ``h0 [B, H]``. The state is carried
in float32 whatever the I/O dtype (float64 stays float64); the output has ``xproj``'s dtype.

The op is registered with ``torch.library`` (``matrec::rnn_recurrence``: custom op, fake kernel,
autograd), so modules using it trace under ``torch.compile(fullgraph=True)``. ``recurrence_reference``
is the plain autograd loop every test compares against.

For the identity nonlinearity the recurrence is linear, and ``matrec::rnn_recurrence_chunked`` runs
it in parallel over time (backend "chunked"; see the section below and docs/mornn.md, "Speed").
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ...registry import Registry


class Phi(NamedTuple):
    """A nonlinearity with what its backward needs.

    ``forward(z, b) -> h``; ``slope(z, h, b) -> dh/dz`` (elementwise); ``bias_grad(z, gz) ->
    dL/db`` per element, from ``gz = dL/dz`` (only for nonlinearities with a learned bias ``b [H]``).
    """

    forward: Callable[[Tensor, Tensor | None], Tensor]
    slope: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    bias_grad: Callable[[Tensor, Tensor], Tensor] | None = None


NONLINEARITIES: Registry[Phi] = Registry("recurrence nonlinearity", argument="nonlinearity")


def modrelu(z: Tensor, b: Tensor) -> Tensor:
    """modReLU ``sign(z) * relu(|z| + b)`` (b ``[H]`` learned; b < 0 gives a dead zone around 0)."""
    return torch.sign(z) * torch.relu(z.abs() + b)


def _modrelu_slope(z, h, b):
    # d/dz sign(z)(|z|+b) = sign(z)^2 on the live side; autograd's convention (0 at z = 0) kept.
    s = torch.sign(z)
    return s * s * ((z.abs() + b) > 0).to(z.dtype)


def _modrelu_bias_grad(z, gz):
    # dh/db = sign(z) on the live side = slope * sign(z) (sign^3 = sign), so dL/db = gz * sign(z):
    # the backward needs no extra saved tensor for b.
    return gz * torch.sign(z)


NONLINEARITIES.register("tanh", Phi(lambda z, b: torch.tanh(z), lambda z, h, b: 1 - h * h))
NONLINEARITIES.register("relu", Phi(lambda z, b: torch.relu(z), lambda z, h, b: (z > 0).to(z.dtype)))
NONLINEARITIES.register("modrelu", Phi(modrelu, _modrelu_slope, _modrelu_bias_grad))
NONLINEARITIES.register("identity", Phi(lambda z, b: z, lambda z, h, b: torch.ones_like(z)))


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None, nonlinearity: str):
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
    phi = _check(xproj, weight, h0, bias, nonlinearity)
    sdt = _state_dtype(xproj.dtype)
    T, B, H = xproj.shape
    W = weight.to(sdt)
    b = None if bias is None else bias.to(sdt)
    h = xproj.new_zeros(B, H, dtype=sdt) if h0 is None else h0.to(sdt)
    out = []
    for t in range(T):
        h = phi.forward(xproj[t].to(sdt) + h @ W.t(), b)  # [B, H]
        out.append(h)
    return torch.stack(out).to(xproj.dtype)  # [T, B, H]


# ---------------------------------------------------------------------------------------------
# The op: forward loop without a graph, backward as the reverse recurrence.
# ---------------------------------------------------------------------------------------------

def _forward_impl(xproj, weight, h0, bias, nonlinearity):
    phi = NONLINEARITIES.get(nonlinearity)
    sdt = _state_dtype(xproj.dtype)
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
    sdt = _state_dtype(xproj.dtype)
    return torch.empty_like(xproj, dtype=sdt), torch.empty_like(xproj, dtype=sdt)


def parameter_grads(gz: Tensor, z: Tensor, out: Tensor, h0: Tensor | None,
                    nonlinearity: str) -> tuple[Tensor, Tensor]:
    """``(dL/dW [H, H], dL/db [H])`` from ``gz = dL/dz [T, B, H]`` and the states ``out`` (all in the
    state dtype): ``dL/dW = sum_t gz_t^T h_{t-1}`` as one GEMM over all steps (``h_{-1} = h0``, zeros
    when None); ``dL/db`` from the nonlinearity's ``bias_grad`` (zeros without a learned bias).
    Shared by every backend's backward."""
    H = gz.shape[-1]
    grad_W = gz[1:].reshape(-1, H).t() @ out[:-1].reshape(-1, H)  # [H, H]
    if h0 is not None:
        grad_W.addmm_(gz[0].t(), h0.to(gz.dtype))
    phi = NONLINEARITIES.get(nonlinearity)
    grad_b = phi.bias_grad(z, gz).sum(dim=(0, 1)) if phi.bias_grad is not None else gz.new_zeros(H)
    return grad_W, grad_b


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


# ---------------------------------------------------------------------------------------------
# Identity nonlinearity: the linear recurrence in chunked parallel form.
# ---------------------------------------------------------------------------------------------
# h_t = x_t + h_{t-1} A^T unrolled inside a chunk of C steps (h_{c,0} = the state entering chunk c):
#     h_{c,j} = h_{c,0} (A^T)^j + sum_{i<=j} x_{c,i} (A^T)^(j-i)
#             = (h_{c,0} + sum_{i<=j} x_{c,i} (A^T)^-i) (A^T)^j.
# So a chunk costs a batched GEMM with the C matrices (A^T)^-i, a cumsum over the chunk and a batched
# GEMM with (A^T)^j; only the T/C chunk-entry states are carried sequentially. Powers never go past C,
# so nothing like A^-T grows. This is the eigen form y_t = u_t + lam * y_{t-1} (y = h V^-T) with the
# scalings lam^-i, lam^j folded into the two projections: it needs no eigendecomposition, hence no
# conditioning problem with repeated eigenvalues (W = I, Henaff's blocks), and it measured faster
# than the eigenbasis form at every shape tried (docs/mornn.md, "Speed").

CHUNK_SIZE = 16
# Rounding in the chunked sums grows with max_i ||W^i|| ||W^-i|| / H (1 for orthogonal W); refused above this.
MAX_POWER_CONDITION = 10.0


def chunk_powers(weight: Tensor, chunk_size: int, dtype: torch.dtype) -> tuple[Tensor, float]:
    """``[2, C, H, H]`` = (W^1..W^C, W^-1..W^-C) in ``dtype`` and the power condition
    ``max_i ||W^i||_F ||W^-i||_F / H`` (1 for orthogonal ``W``; inf when ``W`` is singular).

    Computed in float64 and rounded once to ``dtype``, so the float32 result is at least as close to
    float64 arithmetic as the loop's (T = 1000: 4e-7..1.1e-6 vs 1.5e-6..2.3e-6, ``python
    benchmarks/recurrence_crossover.py --accuracy``). Powers taken in float32 would be rounded at
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
    sdt = _state_dtype(xproj.dtype)
    T, B, H = xproj.shape
    P, condition = chunk_powers(weight, _chunk_size(T, H), sdt)
    if not condition <= MAX_POWER_CONDITION:
        if strict:
            raise ValueError(
                f"weight must have well-conditioned powers for backend='chunked' (an orthogonal W): "
                f"max_i ||W^i|| ||W^-i|| / H = {condition:.3g} over a chunk of {P.shape[1]} steps, "
                f"above {MAX_POWER_CONDITION}; use backend='torch'")
        # auto's open fallback: the sequential op; NaN powers tell the backward which path ran
        return _forward_impl(xproj, weight, h0, None, "identity")[0], P.fill_(float("nan"))
    x = xproj.to(sdt)
    out = chunked_linear_recurrence(x, None if h0 is None else h0.to(sdt),
                                    P[1].transpose(1, 2), P[0].transpose(1, 2))
    return out, P


def _chunked_fake(xproj, weight, h0, bias, nonlinearity):
    sdt = _state_dtype(xproj.dtype)
    T, B, H = xproj.shape
    return torch.empty_like(xproj, dtype=sdt), xproj.new_empty(2, _chunk_size(T, H), H, H, dtype=sdt)


# Two forward ops (same backward): "chunked" raises on a W it cannot handle, auto's falls back to the
# sequential loop. The second output is not z (z == out for the identity) but the saved powers of W.
@torch.library.custom_op("matrec::rnn_recurrence_chunked", mutates_args=())
def _rnn_recurrence_chunked(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                            nonlinearity: str) -> tuple[Tensor, Tensor]:
    return _chunked_forward(xproj, weight, h0, strict=True)


@torch.library.custom_op("matrec::rnn_recurrence_chunked_or_loop", mutates_args=())
def _rnn_recurrence_chunked_or_loop(xproj: Tensor, weight: Tensor, h0: Tensor | None,
                                    bias: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor]:
    return _chunked_forward(xproj, weight, h0, strict=False)


_rnn_recurrence_chunked.register_fake(_chunked_fake)
_rnn_recurrence_chunked_or_loop.register_fake(_chunked_fake)


@torch.library.custom_op("matrec::rnn_recurrence_chunked_backward", mutates_args=())
def _rnn_recurrence_chunked_backward(grad_out: Tensor, powers: Tensor, out: Tensor, weight: Tensor,
                                     h0: Tensor | None, bias: Tensor | None, nonlinearity: str
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (d xproj [T,B,H], d W [H,H], d h0 [B,H], d bias [H] = 0) in the state dtype."""
    if torch.isnan(powers[0, 0, 0, 0]):                   # the forward fell back to the loop
        return _rnn_recurrence_backward(grad_out, out, out, weight, h0, None, "identity")
    sdt = out.dtype
    W = weight.to(sdt)
    # dL/dz_t = g_t + dL/dz_{t+1} W: the forward form with A = W^T, run backwards in time
    gz = chunked_linear_recurrence(grad_out.to(sdt).flip(0), None, powers[1], powers[0]).flip(0)
    grad_h0 = gz[0] @ W                                   # [B, H]
    grad_W, grad_b = parameter_grads(gz, out, out, h0, "identity")
    return gz, grad_W, grad_h0, grad_b


@_rnn_recurrence_chunked_backward.register_fake
def _(grad_out, powers, out, weight, h0, bias, nonlinearity):
    T, B, H = out.shape
    return (torch.empty_like(out), out.new_empty(H, H), out.new_empty(B, H), out.new_empty(H))


register_recurrence_autograd(_rnn_recurrence_chunked, _rnn_recurrence_chunked_backward)
register_recurrence_autograd(_rnn_recurrence_chunked_or_loop, _rnn_recurrence_chunked_backward)


RECURRENCE_BACKENDS: Registry[Callable] = Registry("recurrence backend", argument="backend")


@RECURRENCE_BACKENDS.register("torch")
def _torch_backend(xproj, weight, h0, bias, nonlinearity):
    return _rnn_recurrence(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


@RECURRENCE_BACKENDS.register("loop")
def _loop_backend(xproj, weight, h0, bias, nonlinearity):
    # the autograd loop: the reference, selectable so benchmarks time what the op replaces
    return recurrence_reference(xproj, weight, h0, bias, nonlinearity)


@RECURRENCE_BACKENDS.register("chunked")
def _chunked_backend(xproj, weight, h0, bias, nonlinearity):
    if nonlinearity != "identity":
        raise ValueError(f"nonlinearity must be 'identity' for backend='chunked' (the parallel form "
                         f"of a linear recurrence), got {nonlinearity!r}")
    return _rnn_recurrence_chunked(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


@RECURRENCE_BACKENDS.register("triton")
def _triton_backend(xproj, weight, h0, bias, nonlinearity):
    from .triton import triton_recurrence  # Triton is an optional dependency

    return triton_recurrence(xproj, weight, h0, bias, nonlinearity)


# auto's rule for the chunked form, from benchmarks/recurrence_crossover.py (docs/mornn.md, "Speed";
# benchmarks/results/recurrence_crossover_cpu.md, 1 thread: every shape it picks there ran faster
# than "torch", 1.04x at the weakest): CPU only (nothing measured on CUDA); per-step work
# B * H^2 <= AUTO_CHUNKED_MAX_WORK (above it the form's doubled GEMM work outweighs the per-step
# overhead it saves); H <= 128 and T >= max(64, 4 H), enough steps to repay the ~H^3 set-up (W's
# powers; at H = 256 it lost at every B measured).
AUTO_CHUNKED_MAX_WORK = 8 * 64 * 64
AUTO_CHUNKED_MAX_HIDDEN = 128


def _auto_backend(xproj: Tensor, nonlinearity: str) -> str:
    """The backend "auto" runs: "chunked" (falling back to the loop on an unsuitable W) or "torch"."""
    T, B, H = xproj.shape
    if (nonlinearity == "identity" and xproj.device.type == "cpu" and H <= AUTO_CHUNKED_MAX_HIDDEN
            and T >= max(64, 4 * H) and B * H * H <= AUTO_CHUNKED_MAX_WORK):
        return "chunked"
    return "torch"


def recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None = None, bias: Tensor | None = None,
               nonlinearity: str = "modrelu", *, backend: str = "auto") -> Tensor:
    """Run ``h_t = phi(xproj_t + h_{t-1} @ weight^T (; bias))`` over time, fused forward and backward.

    Args:
        xproj: ``[T, B, H]`` input projection ``x_t @ W_ih^T + b_ih + b_hh``.
        weight: ``[H, H]`` recurrent matrix.
        h0: ``[B, H]`` initial state, zeros when None.
        bias: ``[H]`` modReLU bias; required for ``"modrelu"``, must be None otherwise.
        nonlinearity: one of ``NONLINEARITIES`` (tanh, relu, modrelu, identity).
        backend: one of ``RECURRENCE_BACKENDS`` or "auto":

            - "torch": the op above (a step per time step, any device, any nonlinearity);
            - "loop": the autograd reference;
            - "chunked": identity only, the parallel form (chunks of C steps through W's powers,
              sequential over T/C chunk states); needs W with well-conditioned powers (orthogonal)
              and raises ValueError otherwise;
            - "triton": the persistent kernel of :mod:`matrec.ops.rnn_recurrence.triton` (hidden-size
              limit and dtypes: see there); opt-in, measured on no GPU yet;
            - "auto": "chunked" where measured faster than "torch" (:func:`_auto_backend`: identity,
              CPU, H <= 128, T >= max(64, 4H), B*H^2 <= 32768; on a W the chunked form cannot take
              it falls back to the sequential loop inside the op, with no error), else "torch".

    Returns:
        ``[T, B, H]`` all states ``h_1..h_T``, in ``xproj``'s dtype.
    """
    _check(xproj, weight, h0, bias, nonlinearity)
    if backend == "auto":
        if _auto_backend(xproj, nonlinearity) == "chunked":
            out = _rnn_recurrence_chunked_or_loop(xproj, weight, h0, bias, nonlinearity)[0]
            return out.to(xproj.dtype)
        backend = "torch"
    return RECURRENCE_BACKENDS.get(backend)(xproj, weight, h0, bias, nonlinearity)
