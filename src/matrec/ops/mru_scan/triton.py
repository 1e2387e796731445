"""Fused Triton kernel for the MRU scan ``H_t = H_{t-1} @ M_t``, forward and backward (docs/design.md §2;
the kernel design is docs/kernel.md "Design").

Chunked three-phase scan, forward (one program per (group of ``SEQ`` sequences, chunk)):
  1. every chunk's total product ``P_c`` (reads M),
  2. per sequence, an exclusive scan over the chunk totals: the state entering each chunk,
  3. every chunk replays its products from its entering state and writes ``H`` (reads M, writes H).
Backward, the reverse affine recurrence the same way, with the forward's ``P_c`` kept as the linear
part of each chunk's map (so its phase 1 is one product per step): phase 1 each chunk's own carry
``L_c``, phase 2 a reverse scan over chunks, phase 3 each chunk replays and writes ``dM`` (and ``dH0``).
When a sequence is one chunk, phases 1 and 2 are skipped and each tensor is read or written exactly
once. Arithmetic is fp32 whatever the I/O dtype.

Everything a call needs besides its tensors (kernels, grids, chunking, constexprs, warps, stages) is
resolved once per (shape, device, chunking) and cached in a :class:`_Plan`, so a call is the plan
lookup, its output allocations and 1 or 3 launches per direction, with no host synchronisation
(CUDA-graph capturable).

Registered with ``torch.library`` (``matrec::triton_mru_scan_fwd`` / ``_bwd``, fake impls, autograd),
so ``torch.compile(fullgraph=True)`` sees one opaque op; eager calls take the same forward and backward
through a plain ``autograd.Function``, skipping the ops' dispatch layers. ``triton`` is imported lazily: this module
imports without it and ``triton_available`` says why the kernel cannot run.
"""
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...checks import check_int
from ..triton_support import compile_ahead, device_available, launchable

MAX_DIM = 64  # a few [D, D] fp32 blocks per sequence live in registers
_IO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (chunks per sequence)
_MIN_CHUNK = 16  # steps; shorter chunks make phase 2 (sequential over chunks) the longest phase


@dataclass(frozen=True)
class LaunchConfig:
    """Per padded order ``D``: sequences per program, warps forward / backward, pipeline stages."""

    seq: int
    warps_fwd: int
    warps_bwd: int
    stages: int


# Untimed (no GPU has run this kernel form yet): chosen from the sm_90 compile alone, ptxas's registers
# and spills (benchmarks/triton_scan_ptxas.py, table in docs/kernel.md): as many sequences per program
# as keep the backward's live blocks in registers without spilling. d = 64's backward still spills
# (236 bytes at 16 warps for fp32 I/O, 900 for bf16; more at 8 or 32): the kernel is meant for d <= 32.
# tests/ops/test_triton_scan.py compiles the d <= 32 entries for sm_90 and fails on any spill.
CONFIGS = {
    8: LaunchConfig(seq=8, warps_fwd=4, warps_bwd=4, stages=3),
    16: LaunchConfig(seq=4, warps_fwd=4, warps_bwd=4, stages=3),
    32: LaunchConfig(seq=1, warps_fwd=4, warps_bwd=8, stages=3),
    64: LaunchConfig(seq=1, warps_fwd=8, warps_bwd=16, stages=2),
}


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


@functools.lru_cache(maxsize=None)
def _min_dot_k() -> int:
    """The smallest K the installed Triton's fp32 ``tl.dot`` takes on NVIDIA GPUs: 8 in Triton 3.9,
    16 in older releases (asked of Triton's own rule, so the interpreter pads as the GPU would)."""
    from types import SimpleNamespace

    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        fp32 = SimpleNamespace(scalar=SimpleNamespace(primitive_bitwidth=32))
        return max(1, int(min_dot_size(GPUTarget("cuda", 90, 32))(fp32, fp32)[2]))
    except Exception:  # an older or newer layout of triton's backend: the long-standing minimum
        return 16


def _padded(d: int) -> int:
    """``d`` rounded up to a power of two, at least the K an fp32 ``tl.dot`` needs (:func:`_min_dot_k`)."""
    return max(_min_dot_k(), 1 << (d - 1).bit_length())


def launch_config(d: int) -> LaunchConfig:
    return CONFIGS[_padded(d)]


def compile_for_target(name: str, *, d: int, io_dtype: str = "fp32", arch: int = 90,
                       stages: Optional[int] = None, **flags):
    """Compile kernel body ``name`` ahead of time for ``sm_<arch>``, with no GPU needed.

    The launches specialise the same way: pointers to ``io_dtype`` (``"fp32"``, ``"bf16"``,
    ``"fp16"``), chunk buffers fp32, ``DIM=d``, padded ``D``, ``SEQ``, ``num_warps`` and ``STAGES``
    from :data:`CONFIGS` (``stages`` overrides the latter); ``flags`` are the remaining constexprs
    (``CARRY``, ``HAS_H0``, ``FROM_CARRY``). Used by the tests to catch what Triton's interpreter
    accepts but its compiler would not, and to read register counts, spills and the pipelined loads.
    """
    from matrec.ops.mru_scan import _triton_kernels as bodies

    cfg = launch_config(d)
    constexprs = {"DIM": d, "D": _padded(d), "SEQ": cfg.seq,
                  "STAGES": cfg.stages if stages is None else stages, **flags}

    def signature_of(arg: str) -> str:
        if arg in ("N", "T", "n_chunks", "CHUNK"):
            return "i32"
        return "*fp32" if arg in ("P", "S", "L", "BC") else "*" + io_dtype

    warps = cfg.warps_bwd if name.startswith("mru_bwd") else cfg.warps_fwd
    return compile_ahead(getattr(bodies, name), signature_of, constexprs, warps, arch, aligned_pointers=True)


def _check_runnable(device: torch.device) -> None:
    if device.type == "cuda" and _cuda_runnable(device):
        return  # a CUDA verdict cannot change within a process: asked once per device
    ok, reason = triton_available(device)
    if not ok:
        raise RuntimeError(f"mru_scan_triton cannot run on {device}: {reason}")


@functools.lru_cache(maxsize=None)
def _cuda_runnable(device: torch.device) -> bool:
    return triton_available(device)[0]


def _empty(shape, like: Tensor, dtype=None) -> Tensor:
    """Every buffer the kernels write; tests swap in a NaN fill to catch elements left unwritten."""
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunk_size(N: int, T: int, device: torch.device, chunk_size: int, seq: int = 1) -> int:
    """Steps per chunk: ``chunk_size`` if given (> 0), else from the GPU's size.

    One chunk per sequence (one pass over every tensor) when the ``ceil(N / seq)`` programs alone put
    about 4 on every SM. Otherwise chunks of ``max(16, ceil(sqrt(T)))`` steps: a program's time is
    its chunk plus phase 2's walk over the chunks, ``C + T / C``, least at ``C = sqrt(T)``.
    """
    if chunk_size > 0:
        C = chunk_size
    elif device.type != "cuda":
        C = T  # the interpreter is sequential anyway: splitting only adds work
    elif math.ceil(N / seq) >= 4 * _sm_count(device):
        C = T
    else:
        C = max(_MIN_CHUNK, math.isqrt(max(T - 1, 0)) + 1)
    return max(1, min(C, T), math.ceil(T / _MAX_GRID_Y))


@dataclass(frozen=True)
class _Plan:
    """What one call of a given (shape, device, chunking) launches, resolved once and cached."""

    N: int
    T: int
    d: int
    D: int
    cfg: LaunchConfig
    chunk: int
    n_chunks: int
    grid: tuple  # (sequence groups, chunks): phases 1 and 3
    grid_seq: tuple  # (sequence groups,): phase 2
    fwd_kw: dict  # constexprs and launch options of the forward kernels
    bwd_kw: dict  # ... of the backward kernels
    bwd_carry_kw: dict  # ... of mru_bwd_chunk_carry (no DIM: it reads fp32 chunk buffers only)

    def totals_shape(self) -> tuple:
        """The chunk totals' buffer, flat (its length is then the one symbolic size a fake needs)."""
        return (self.N * self.n_chunks * self.D * self.D if self.n_chunks > 1 else 0,)


@functools.lru_cache(maxsize=256)
def _plan(N: int, T: int, d: int, device: torch.device, chunk_size: int) -> _Plan:
    cfg = launch_config(d)
    C = _chunk_size(N, T, device, chunk_size, cfg.seq)
    n_chunks = math.ceil(T / C)
    groups = math.ceil(N / cfg.seq)
    D = _padded(d)
    sizes = dict(D=D, SEQ=cfg.seq, STAGES=cfg.stages, enable_fp_fusion=True)  # FMAs, as in the products
    fwd = dict(DIM=d, num_warps=cfg.warps_fwd, **sizes)
    bwd = dict(DIM=d, num_warps=cfg.warps_bwd, **sizes)
    return _Plan(N, T, d, D, cfg, C, n_chunks, (groups, n_chunks), (groups,), fwd, bwd,
                 dict(num_warps=cfg.warps_bwd, **sizes))


def scan_cost(N: int, T: int, d: int, io_bytes: int = 4, device="cuda", chunk_size: int = 0) -> dict:
    """The kernel's analytic cost for ``N`` sequences of ``T`` steps of order ``d`` (no initial state),
    as the plan of this device launches it: HBM bytes and FMAs of the forward and the backward.

    ``floor_bytes``: what any implementation must move (forward reads M and writes H; backward reads
    M, H, dH and writes dM), ``bytes``: what these kernels move (M and dH read twice when a sequence is
    split into chunks, plus the fp32 chunk buffers), ``fmas``: multiply-adds executed (padded
    ``D x D`` blocks, whole groups of sequences), ``useful_fmas``: ``d^3`` per product of the
    definition (``T`` forward, ``2T`` backward). Caches are ignored: each buffer access counts once.
    """
    plan = _plan(N, T, d, torch.device(device), chunk_size)
    unit = N * T * d * d * io_bytes  # one [N, T, d, d] tensor
    block = N * plan.n_chunks * plan.D ** 2 * 4  # one fp32 chunk buffer
    cube, chunks = plan.D ** 3, plan.n_chunks
    split = chunks > 1
    fwd_bytes = 2 * unit + (unit + 4 * block if split else 0)  # + M again; P and S written, read
    bwd_bytes = 4 * unit + (2 * unit + 5 * block if split else 0)  # + M, dH again; L w/r, P r, BC w/r
    rows = plan.grid[0] * plan.cfg.seq  # sequences computed: the last group's missing ones too
    fwd_fmas = rows * (T + (T + chunks if split else 0)) * cube
    bwd_fmas = rows * (2 * T + (T + chunks if split else 0)) * cube
    return {"n_chunks": chunks, "chunk": plan.chunk, "seq_per_program": plan.cfg.seq,
            "programs": plan.grid[0] * plan.grid[1],
            "floor_bytes": {"fwd": 2 * unit, "bwd": 4 * unit},
            "bytes": {"fwd": fwd_bytes, "bwd": bwd_bytes},
            "fmas": {"fwd": fwd_fmas, "bwd": bwd_fmas},
            "useful_fmas": {"fwd": N * T * d ** 3, "bwd": 2 * N * T * d ** 3}}


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 etc.)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(states: Tensor, initial_state: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(H, P)``: the states and the chunk totals (fp32 ``[N, n_chunks, D, D]`` flattened, or ``[0]``
    when a sequence is one chunk), kept for the backward."""
    N, T, d, _ = states.shape
    out = _empty(states.shape, states)
    if out.numel() == 0:
        return out, _empty((0,), states, torch.float32)
    _check_runnable(states.device)
    plan = _plan(N, T, d, states.device, chunk_size)
    M = states.contiguous()
    H0 = initial_state.contiguous() if initial_state is not None else M  # M: unused placeholder
    dev, kw = states.device, plan.fwd_kw
    P = _empty(plan.totals_shape(), states, torch.float32)
    if plan.n_chunks == 1:
        carry, S = (1 if initial_state is not None else 0), M
    else:
        S = _empty(P.shape, P)  # [N * n_chunks * D * D]
        _kernel("mru_fwd_chunk_total", dev)[plan.grid](M, P, N, T, plan.n_chunks, plan.chunk, **kw)
        _kernel("mru_fwd_chunk_carry", dev)[plan.grid_seq](P, S, H0, N, plan.n_chunks,
                                                           HAS_H0=initial_state is not None, **kw)
        carry = 2
    _kernel("mru_fwd_apply", dev)[plan.grid](M, out, S, H0, N, T, plan.n_chunks, plan.chunk,
                                             CARRY=carry, **kw)
    return out, P


def _backward(grad: Tensor, states: Tensor, output: Tensor, totals: Tensor,
              initial_state: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor]:
    N, T, d, _ = states.shape
    d_states = _empty(states.shape, states)
    has_h0 = initial_state is not None
    d_init = _empty(initial_state.shape, initial_state) if has_h0 else states.new_empty(0)
    if d_states.numel() == 0:
        if has_h0:
            d_init.zero_()  # no step: nothing depends on H0
        return d_states, d_init
    _check_runnable(states.device)
    plan = _plan(N, T, d, states.device, chunk_size)
    M, H, G = states.contiguous(), output.contiguous(), grad.contiguous()
    H0 = initial_state.contiguous() if has_h0 else M
    DH0 = d_init if has_h0 else d_states  # placeholder pointer when there is no H0
    dev, kw = states.device, plan.bwd_kw
    BC = M  # placeholder when a sequence is one chunk
    if plan.n_chunks > 1:
        if tuple(totals.shape) != plan.totals_shape():
            raise RuntimeError(f"triton_mru_scan_bwd: chunk totals of shape {tuple(totals.shape)}, "
                               f"expected {plan.totals_shape()} (forward run with another chunking?)")
        L = _empty(plan.totals_shape(), states, torch.float32)
        BC = _empty(L.shape, L)
        _kernel("mru_bwd_chunk_affine", dev)[plan.grid](M, G, L, N, T, plan.n_chunks, plan.chunk, **kw)
        _kernel("mru_bwd_chunk_carry", dev)[plan.grid_seq](totals, L, BC, N, plan.n_chunks,
                                                           **plan.bwd_carry_kw)
    _kernel("mru_bwd_apply", dev)[plan.grid](M, H, G, H0, BC, d_states, DH0, N, T, plan.n_chunks,
                                             plan.chunk, FROM_CARRY=plan.n_chunks > 1, HAS_H0=has_h0,
                                             **kw)
    return d_states, d_init


@torch.library.custom_op("matrec::triton_mru_scan_fwd", mutates_args=())
def triton_mru_scan_fwd(states: Tensor, initial_state: Optional[Tensor],
                        chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(H [N, T, d, d], chunk totals)`` from ``states [N, T, d, d]`` and ``initial_state [N, d, d]``
    or None. The totals (fp32 ``[N, n_chunks, D, D]`` flattened, ``[0]`` for one chunk) are for the
    backward."""
    with _on(states.device):
        return _forward(states, initial_state, chunk_size)


@triton_mru_scan_fwd.register_fake
def _(states, initial_state, chunk_size):
    N, T, d, _ = states.shape
    if all(isinstance(s, int) for s in states.shape) and isinstance(chunk_size, int):
        totals = (0,) if states.numel() == 0 else _plan(N, T, d, states.device, chunk_size).totals_shape()
    else:  # symbolic shapes (dynamic torch.compile): the chunking is decided at run time
        totals = (torch.library.get_ctx().new_dynamic_size(),)
    return states.new_empty(states.shape), states.new_empty(totals, dtype=torch.float32)


@torch.library.custom_op("matrec::triton_mru_scan_bwd", mutates_args=())
def triton_mru_scan_bwd(grad: Tensor, states: Tensor, output: Tensor, totals: Tensor,
                        initial_state: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor]:
    """``(dL/dstates [N, T, d, d], dL/dinitial_state [N, d, d] or [0] when None)`` from
    ``grad = dL/dH``, the forward's inputs, its output ``H`` and its chunk totals."""
    with _on(states.device):
        return _backward(grad, states, output, totals, initial_state, chunk_size)


@triton_mru_scan_bwd.register_fake
def _(grad, states, output, totals, initial_state, chunk_size):
    d_init = states.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return states.new_empty(states.shape), d_init


def _setup_context(ctx, inputs, output):
    states, initial_state, chunk_size = inputs
    H, totals = output
    ctx.save_for_backward(states, initial_state, H, totals)
    ctx.mark_non_differentiable(totals)
    ctx.chunk_size = chunk_size


def _scan_backward(ctx, grad, _grad_totals):
    states, initial_state, output, totals = ctx.saved_tensors
    d_states, d_init = triton_mru_scan_bwd(grad, states, output, totals, initial_state, ctx.chunk_size)
    return d_states, (d_init if initial_state is not None else None), None


triton_mru_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """The ops' forward and backward without torch.library's dispatch layers, for eager calls: they
    are most of a call's host work when the kernels themselves are quick
    (``benchmarks/scan_host_overhead.py``). Traced calls (torch.compile, export) use the ops."""

    @staticmethod
    def forward(ctx, states, initial_state, chunk_size):
        with _on(states.device):
            H, totals = _forward(states, initial_state, chunk_size)
        ctx.save_for_backward(states, initial_state, H, totals)
        ctx.chunk_size = chunk_size
        return H

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        states, initial_state, output, totals = ctx.saved_tensors
        with _on(states.device):
            d_states, d_init = _backward(grad, states, output, totals, initial_state, ctx.chunk_size)
        return d_states, (d_init if initial_state is not None else None), None


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
    if torch.compiler.is_compiling():  # one opaque op in the graph
        return triton_mru_scan_fwd(states, initial_state, chunk_size or 0)[0]
    return _EagerScan.apply(states, initial_state, chunk_size or 0)
