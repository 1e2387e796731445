"""Fused Triton kernel for the MRU scan ``H_t = H_{t-1} @ M_t``, forward and backward (docs/design.md §2).

Chunked three-phase scan, forward (one program per (sequence, chunk)):
  1. every chunk's total product ``P_c`` (reads M),
  2. per sequence, an exclusive scan over the chunk totals: the state entering each chunk,
  3. every chunk replays its products from its entering state and writes ``H`` (reads M, writes H).
Backward, the reverse affine scan ``B_t = G_t + B_{t+1} M_{t+1}^T`` the same way: each chunk's affine
map ``B_s = L + B_e U``, a reverse scan over chunks, then each chunk replays and writes
``dM_t = H_{t-1}^T B_t`` (and ``dH0 = B_1 M_1^T``). When a sequence is one chunk, phases 1 and 2 are
skipped and each tensor is read or written exactly once. Arithmetic is fp32 whatever the I/O dtype.

Registered with ``torch.library`` (``matrec::triton_mru_scan_fwd`` / ``_bwd``, fake impls, autograd),
so ``torch.compile(fullgraph=True)`` sees one opaque op. ``triton`` is imported lazily: this module
imports without it and ``triton_available`` says why the kernel cannot run.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from ...checks import check_int
from ..triton_support import compile_ahead, device_available, launchable

MAX_DIM = 64  # a few [D, D] fp32 blocks live in registers; the backward already spills at 64
_IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (chunks per sequence)


def triton_available(device) -> tuple[bool, str]:
    """Whether the Triton scan can run on ``device``, and if not, why.

    CUDA devices need triton and a visible GPU; CPU tensors run only in Triton's interpreter, i.e.
    when ``TRITON_INTERPRET=1`` is set (slow: meant for tests).
    """
    return device_available(device, cpu_needs_interpret=True)


def _kernel(name: str, device: torch.device):
    """The scan kernel body ``name`` of :mod:`matrec.ops.mru_scan._triton_kernels`, see :func:`launchable`."""
    from matrec.ops.mru_scan import _triton_kernels as bodies

    return launchable(getattr(bodies, name), device)


def compile_for_target(name: str, *, d: int, io_dtype: str = "fp32", arch: int = 90,
                       **flags):
    """Compile kernel body ``name`` ahead of time for ``sm_<arch>``, with no GPU needed.

    The launches above specialise the same way: pointers to ``io_dtype`` (``"fp32"``, ``"bf16"``,
    ``"fp16"``), chunk buffers fp32, ``DIM=d``, padded ``D``, this module's ``num_warps``; ``flags``
    are the remaining constexprs (``CARRY``, ``HAS_H0``, ``FROM_CARRY``). Used by the tests to catch
    what Triton's interpreter accepts but its compiler would not, and to read register counts.
    """
    from matrec.ops.mru_scan import _triton_kernels as bodies

    D = _padded(d)
    constexprs = {"DIM": d, "D": D, **flags}

    def signature_of(arg: str) -> str:
        if arg in ("T", "n_chunks", "CHUNK"):
            return "i32"
        return "*fp32" if arg in ("P", "S", "U", "L", "BC") else "*" + io_dtype

    warps = _num_warps(D, backward=name.startswith("mru_bwd"))
    return compile_ahead(getattr(bodies, name), signature_of, constexprs, warps, arch)


def _check_runnable(device: torch.device) -> None:
    ok, reason = triton_available(device)
    if not ok:
        raise RuntimeError(f"mru_scan_triton cannot run on {device}: {reason}")


def _empty(shape, like: Tensor, dtype=None) -> Tensor:
    """Every buffer the kernels write; tests swap in a NaN fill to catch elements left unwritten."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _padded(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())  # tl.dot wants power-of-two blocks of at least 16


def _num_warps(D: int, backward: bool = False) -> int:
    """Warps per program. Untimed: chosen from ptxas's static register counts for sm_90
    (``benchmarks/triton_scan_ptxas.py``); the backward holds more live blocks, so it gets more
    warps where fewer would need > 200 registers per thread or spill."""
    if backward:
        return {16: 2, 32: 8}.get(D, 16)
    return {16: 2, 32: 4}.get(D, 8)


def _chunk_size(N: int, T: int, device: torch.device, chunk_size: int) -> int:
    """Steps per chunk: ``chunk_size`` if given (> 0), else enough chunks to fill the GPU.

    A sequence stays one chunk (one pass over every tensor) when there are enough sequences to keep
    every SM busy; otherwise it is split, into at most ~2 sqrt(T) chunks so that the sequential
    scan over chunk totals (phase 2) stays no longer than a chunk.
    """
    if chunk_size > 0:
        C = chunk_size
    elif device.type != "cuda":
        C = T  # the interpreter is sequential anyway: splitting only adds work
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(target / max(N, 1))
        n_chunks = max(1, min(want, T // 32, 2 * math.isqrt(T)))
        C = math.ceil(T / n_chunks)
    return max(C, math.ceil(T / _MAX_GRID_Y))


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 etc.)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(states: Tensor, initial_state: Optional[Tensor], chunk_size: int) -> Tensor:
    N, T, d, _ = states.shape
    out = _empty(states.shape, states)
    if out.numel() == 0:
        return out
    _check_runnable(states.device)
    M = states.contiguous()
    H0 = initial_state.contiguous() if initial_state is not None else M  # M: unused placeholder
    D = _padded(d)
    C = _chunk_size(N, T, states.device, chunk_size)
    n_chunks = math.ceil(T / C)
    launch = dict(num_warps=_num_warps(D), enable_fp_fusion=True)  # FMAs, as in the products
    dev = states.device
    if n_chunks == 1:
        carry, S = (1 if initial_state is not None else 0), M
    else:
        P = _empty((N, n_chunks, D, D), states, torch.float32)
        S = _empty(P.shape, P)
        _kernel("mru_fwd_chunk_total", dev)[(N, n_chunks)](M, P, T, n_chunks, C, DIM=d, D=D, **launch)
        _kernel("mru_fwd_chunk_carry", dev)[(N,)](P, S, H0, n_chunks, DIM=d, D=D,
                                                  HAS_H0=initial_state is not None, **launch)
        carry = 2
    _kernel("mru_fwd_apply", dev)[(N, n_chunks)](M, out, S, H0, T, n_chunks, C, DIM=d, D=D,
                                                 CARRY=carry, **launch)
    return out


def _backward(grad: Tensor, states: Tensor, output: Tensor, initial_state: Optional[Tensor],
              chunk_size: int) -> tuple[Tensor, Tensor]:
    N, T, d, _ = states.shape
    d_states = _empty(states.shape, states)
    has_h0 = initial_state is not None
    d_init = _empty(initial_state.shape, initial_state) if has_h0 else states.new_empty(0)
    if d_states.numel() == 0:
        if has_h0:
            d_init.zero_()  # no step: nothing depends on H0
        return d_states, d_init
    _check_runnable(states.device)
    M, H, G = states.contiguous(), output.contiguous(), grad.contiguous()
    H0 = initial_state.contiguous() if has_h0 else M
    DH0 = d_init if has_h0 else d_states  # placeholder pointer when there is no H0
    D = _padded(d)
    C = _chunk_size(N, T, states.device, chunk_size)
    n_chunks = math.ceil(T / C)
    launch = dict(num_warps=_num_warps(D, backward=True), enable_fp_fusion=True)
    dev = states.device
    BC = M  # placeholder when a sequence is one chunk
    if n_chunks > 1:
        U = _empty((N, n_chunks, D, D), states, torch.float32)
        L = _empty(U.shape, U)
        BC = _empty(U.shape, U)
        _kernel("mru_bwd_chunk_affine", dev)[(N, n_chunks)](M, G, U, L, T, n_chunks, C, DIM=d, D=D,
                                                            **launch)
        _kernel("mru_bwd_chunk_carry", dev)[(N,)](U, L, BC, n_chunks, D=D, **launch)
    _kernel("mru_bwd_apply", dev)[(N, n_chunks)](M, H, G, H0, BC, d_states, DH0, T, n_chunks, C,
                                                 DIM=d, D=D, FROM_CARRY=n_chunks > 1, HAS_H0=has_h0,
                                                 **launch)
    return d_states, d_init


@torch.library.custom_op("matrec::triton_mru_scan_fwd", mutates_args=())
def triton_mru_scan_fwd(states: Tensor, initial_state: Optional[Tensor], chunk_size: int) -> Tensor:
    """``H [N, T, d, d]`` from ``states [N, T, d, d]`` and ``initial_state [N, d, d]`` or None."""
    with _on(states.device):
        return _forward(states, initial_state, chunk_size)


@triton_mru_scan_fwd.register_fake
def _(states, initial_state, chunk_size):
    return states.new_empty(states.shape)  # contiguous, like the real output


@torch.library.custom_op("matrec::triton_mru_scan_bwd", mutates_args=())
def triton_mru_scan_bwd(grad: Tensor, states: Tensor, output: Tensor, initial_state: Optional[Tensor],
                        chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(dL/dstates [N, T, d, d], dL/dinitial_state [N, d, d] or [0] when None)`` from
    ``grad = dL/dH``, the forward's inputs and its output ``H``."""
    with _on(states.device):
        return _backward(grad, states, output, initial_state, chunk_size)


@triton_mru_scan_bwd.register_fake
def _(grad, states, output, initial_state, chunk_size):
    d_init = states.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return states.new_empty(states.shape), d_init


def _setup_context(ctx, inputs, output):
    states, initial_state, chunk_size = inputs
    ctx.save_for_backward(states, initial_state, output)
    ctx.chunk_size = chunk_size


def _scan_backward(ctx, grad):
    states, initial_state, output = ctx.saved_tensors
    d_states, d_init = triton_mru_scan_bwd(grad, states, output, initial_state, ctx.chunk_size)
    return d_states, (d_init if initial_state is not None else None), None


triton_mru_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_context)


def mru_scan_triton(states: Tensor, initial_state: Optional[Tensor] = None, *,
                    chunk_size: Optional[int] = None) -> Tensor:
    """All MRU states ``H_t = H_{t-1} @ M_t`` by the fused Triton kernel; differentiable.

    Args:
        states: ``[N, T, d, d]`` input state matrices ``M_t``; float32, bfloat16 or float16;
            ``1 <= d <= 64``, any ``T``.
        initial_state: ``[N, d, d]`` ``H_0``, or None for the identity (then ``H_1 = M_1``).
        chunk_size: steps per chunk; None picks one from the GPU's size (see ``docs/kernel.md``).
    Returns:
        ``[N, T, d, d]`` in ``states.dtype``; computed in float32.
    Raises:
        RuntimeError: the kernel cannot run on this device (the reason is in the message).
    """
    if not isinstance(states, Tensor) or states.dim() != 4 or states.shape[-1] != states.shape[-2]:
        shape = tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__
        raise ValueError(f"states must be a [N, T, d, d] tensor of square matrices, got {shape}")
    if states.dtype not in _IO_DTYPES:
        raise TypeError(f"states must be float32, bfloat16 or float16, got {states.dtype}")
    N, T, d, _ = states.shape
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f"states must hold matrices of order 1..{MAX_DIM}, got d={d}")
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != (N, d, d):
            shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else initial_state
            raise ValueError(f"initial_state must be None or a [N, d, d] = {(N, d, d)} tensor, got {shape}")
        if initial_state.dtype not in _IO_DTYPES:
            raise TypeError(f"initial_state must be float32, bfloat16 or float16, got {initial_state.dtype}")
        if initial_state.device != states.device:
            raise ValueError(f"initial_state is on {initial_state.device}, states on {states.device}")
    check_int("chunk_size", chunk_size, allow_none=True)
    return triton_mru_scan_fwd(states, initial_state, chunk_size or 0)
