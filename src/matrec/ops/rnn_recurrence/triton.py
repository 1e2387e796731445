"""Persistent Triton kernels for ``h_t = phi(xproj_t + h_{t-1} @ W^T)`` (forward and backward).

One launch steps through all of time; each program owns ``BLOCK_B`` batch rows and keeps its state
in float32. Two kernel shapes, picked per hidden size by ``_CONFIGS`` (see :func:`config_for`):

- **on-chip** (small H): a program loads all of ``W`` once and keeps ``h`` in registers; the step
  is one ``[BLOCK_B, H] x [H, H]`` ``tl.dot``. Its ``W`` lives in registers/shared memory, which
  runs out (spills, then over the 227 KiB an H100 gives one block) as H grows.
- **tiled** (large H): per step a program loops over ``BLOCK_N`` output columns and ``BLOCK_K``
  reduction tiles, streaming ``W^T`` tiles from global memory (L2-resident on a GPU: every program
  reads the same ``W``) and reading ``h_{t-1}`` back from the output buffer it wrote the step before
  (``h0`` at t = 0). Its on-chip footprint does not depend on H.

The backward runs the reverse recurrence ``dL/dh_{t-1} = g_{t-1} + (dL/dh_t * phi'(z_t)) @ W`` from
the saved pre-activations, the same two ways (the tiled one reads ``dL/dz_{t+1}`` back from its own
``GZ`` buffer); ``dL/dW`` and the modReLU bias gradient are then one GEMM and one reduction in
PyTorch, exactly as in :mod:`matrec.ops.rnn_recurrence` (the reference for these kernels).

Products are IEEE float32 ``tl.dot`` (no TF32: the state must not drift). With
``weight_dtype=torch.bfloat16`` ``W`` is stored in bf16 (half its bytes streamed from L2 by the tiled
kernel) and widened to float32 in the kernel, so the result is exactly the float32 recurrence with
``W`` rounded to bf16 (relative error ~4e-3 per weight): a precision trade. bf16 products on tensor
cores (``h`` rounded too) are not offered: Triton's interpreter cannot run a bf16 ``tl.dot``, so that
path could not be tested without a GPU.

These are the *row* kernels: a program per ``BLOCK_B`` batch rows, so few programs at small B. On CUDA,
:func:`triton_recurrence` runs the column-split persistent kernels of :mod:`.triton_split` instead
(``kernel="auto"``, float32 ``W``), which fall back to these where their programs cannot all be resident.

Registered as ``matrec::rnn_recurrence_triton`` (float32 ``W``) and
``matrec::rnn_recurrence_triton_bf16w`` (custom ops, fake kernels, autograd). CPU tensors run in
Triton's interpreter (slow: how the tests check it), CUDA tensors compiled.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_support import compile_ahead, device_function, interpret_requested
from ..triton_support import launchable as _launcher  # interpreted for CPU tensors, compiled for CUDA
from .fused import parameter_grads, register_recurrence_autograd
from .naive import check_inputs
from .nonlinearities import kernel_code, kernel_nonlinearities

# The largest H tested (interpreter) and checked with ptxas. The tiled kernel's on-chip footprint does not
# depend on H, so the limit is what was verified, not what would compile.
MAX_HIDDEN = 512
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)

# Kernel bodies are plain functions wrapped per call (see matrec.ops.triton_support.launchable), so they use only tl.*
# builtins (triton.language.standard helpers such as tl.zeros are frozen in one mode at import) and helpers made
# with device_function, which run either way.


def _phi(z, b, NL: tl.constexpr):
    """``phi(z)`` for the nonlinearity numbered ``NL`` (:func:`.nonlinearities.kernel_code`); ``b`` [N]
    is the modReLU bias of ``z``'s N columns (read only for modReLU)."""
    if NL == 0:
        h = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))  # tanh; saturates cleanly at +-1
    elif NL == 1:
        h = tl.maximum(z, 0.0)
    elif NL == 2:
        h = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0)) * tl.maximum(tl.abs(z) + b[None, :], 0.0)
    else:
        h = z
    return h


def _phi_slope(z, b, H_PTRS, mask, NL: tl.constexpr):
    """``phi'(z)``, as ``NONLINEARITIES`` defines the slope; tanh's is taken from its output, loaded from
    ``H_PTRS`` (``mask``) only then: the others need ``z`` alone."""
    if NL == 0:
        h = tl.load(H_PTRS, mask=mask, other=0.0)
        d = 1.0 - h * h
    elif NL == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif NL == 2:
        s = tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
        d = tl.where(tl.abs(z) + b[None, :] > 0, s * s, 0.0)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


phi = device_function(_phi)
phi_slope = device_function(_phi_slope)


def _fwd_kernel(X, W, H0, BIAS, OUT, Z, T, B, H,
                HAS_H0: tl.constexpr, NL: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
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
        z = tl.load(X + off, mask=m2, other=0.0) + tl.dot(h, wt.to(tl.float32), input_precision="ieee")
        h = tl.where(m2, phi(z, b, NL), 0.0)
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
        gz = tl.where(m2, gh * phi_slope(z, b, OUT + off, m2, NL), 0.0)
        tl.store(GZ + off, gz, mask=m2)
        carry = tl.dot(gz, w.to(tl.float32), input_precision="ieee")
    tl.store(GH0 + rb[:, None] * H + rh[None, :], carry, mask=m2)


# The tiled kernels hand the state from one step to the next through global memory: step t's loads of h_{t-1}
# (or dL/dz_{t+1}) read what other threads of the same program stored at step t-1. tl.debug_barrier() is CUDA's
# __syncthreads (bar.sync), which guarantees that every global- and shared-memory access the block's threads made
# before it is visible to all threads of the block after it (a block runs on one SM, whose L1 sees its own stores;
# the compiler may turn these loads into cp.async.ca prefetches, which the guarantee covers). Programs never read
# each other's rows, so no grid-wide synchronisation is needed.


def _fwd_tiled_kernel(X, W, H0, BIAS, OUT, Z, T, B, H,
                      HAS_H0: tl.constexpr, NL: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    for t in range(T):
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mn = rn < H
            m2 = mb[:, None] & mn[None, :]
            acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # [BLOCK_B, BLOCK_N] h_{t-1} @ W^T
            for k0 in range(0, H, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                mk = rk < H
                mbk = mb[:, None] & mk[None, :]
                if t > 0:
                    hp = tl.load(OUT + (t - 1) * B * H + rb[:, None] * H + rk[None, :], mask=mbk, other=0.0)
                elif HAS_H0:
                    hp = tl.load(H0 + rb[:, None] * H + rk[None, :], mask=mbk, other=0.0)
                else:
                    hp = tl.full((BLOCK_B, BLOCK_K), 0.0, tl.float32)
                # W^T tile [k, n]; padded entries are 0, so padded k contribute nothing
                wt = tl.load(W + rn[None, :] * H + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
                acc += tl.dot(hp, wt.to(tl.float32), input_precision="ieee")
            off = t * B * H + rb[:, None] * H + rn[None, :]
            z = tl.load(X + off, mask=m2, other=0.0) + acc
            b = tl.load(BIAS + rn, mask=mn, other=0.0) if NL == 2 else 0.0  # [BLOCK_N], modReLU only
            tl.store(Z + off, z, mask=m2)
            tl.store(OUT + off, phi(z, b, NL), mask=m2)
        tl.debug_barrier()  # step t's OUT visible to every thread before step t+1 reads it


def _bwd_tiled_kernel(G, Z, OUT, W, BIAS, GZ, GH0, T, B, H,
                      NL: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    # i = 0..T-1 are the steps t = T-1..0 (write dL/dz_t); i = T writes dL/dh0 = dL/dz_0 @ W
    for i in range(T + 1):
        t = T - 1 - i
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            mn = rn < H
            m2 = mb[:, None] & mn[None, :]
            acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # [BLOCK_B, BLOCK_N] dL/dz_{t+1} @ W
            if i > 0:
                for k0 in range(0, H, BLOCK_K):
                    rk = k0 + tl.arange(0, BLOCK_K)
                    mk = rk < H
                    gzn = tl.load(GZ + (t + 1) * B * H + rb[:, None] * H + rk[None, :],
                                  mask=mb[:, None] & mk[None, :], other=0.0)
                    w = tl.load(W + rk[:, None] * H + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
                    acc += tl.dot(gzn, w.to(tl.float32), input_precision="ieee")
            if t >= 0:
                off = t * B * H + rb[:, None] * H + rn[None, :]
                gh = tl.load(G + off, mask=m2, other=0.0) + acc
                z = tl.load(Z + off, mask=m2, other=0.0)
                b = tl.load(BIAS + rn, mask=mn, other=0.0) if NL == 2 else 0.0  # [BLOCK_N], modReLU only
                tl.store(GZ + off, gh * phi_slope(z, b, OUT + off, m2, NL), mask=m2)
            else:
                tl.store(GH0 + rb[:, None] * H + rn[None, :], acc, mask=m2)
        tl.debug_barrier()  # step t's GZ visible to every thread before step t-1 reads it


class Config(NamedTuple):
    """One kernel choice: the tiled kernel or the on-chip one, ``block_b`` batch rows per program, the
    tiled kernel's ``block_n`` x ``block_k`` tiles of ``W``, and warps per program."""

    tiled: bool
    block_b: int = 16  # tl.dot needs every dimension >= 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4


# weight dtype -> rows (largest H, forward config, backward config); the first row with H <= largest H wins.
# Chosen from ptxas for sm_90 (benchmarks/triton_recurrence_ptxas.py, table in docs/mornn.md): no spills and
# shared memory under the 227 KiB an H100 gives one block for H in {64, 128, 256, 384, 512}.
# 4 warps spill 212 bytes in the H = 64 forward: compile_report(64, config=Config(False, num_warps=4))
ON_CHIP_CONFIG = Config(False, num_warps=8)
TILED_CONFIG = Config(True, block_b=16, block_n=64, block_k=64, num_warps=8)
_CONFIGS: dict[torch.dtype, tuple[tuple[int, Config, Config], ...]] = {
    torch.float32: ((64, ON_CHIP_CONFIG, ON_CHIP_CONFIG), (MAX_HIDDEN, TILED_CONFIG, TILED_CONFIG)),
    # a bf16 W saves nothing on chip (the compiler keeps the loop-invariant fp32 copy), so the same split
    torch.bfloat16: ((64, ON_CHIP_CONFIG, ON_CHIP_CONFIG), (MAX_HIDDEN, TILED_CONFIG, TILED_CONFIG)),
}


def config_for(hidden: int, weight_dtype: torch.dtype = torch.float32, backward: bool = False) -> Config:
    """The kernel configuration used for hidden size ``hidden`` (forward, or ``backward``)."""
    if weight_dtype not in _CONFIGS:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype}")
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"hidden size must be in [1, {MAX_HIDDEN}] for the Triton recurrence, got {hidden}")
    for largest, fwd, bwd in _CONFIGS[weight_dtype]:
        if hidden <= largest:
            return bwd if backward else fwd
    raise AssertionError("_CONFIGS must cover every H up to MAX_HIDDEN")


def kernel_plan(hidden: int, weight_dtype: torch.dtype, backward: bool, nonlinearity: str,
                has_h0: bool = True, config: Config | None = None) -> tuple[object, dict, int]:
    """``(kernel body, constexprs, num_warps)`` for one launch with ``config`` (default
    :func:`config_for`); shared by the ops and the ptxas benchmark."""
    cfg = config_for(hidden, weight_dtype, backward) if config is None else config
    consts = dict(NL=kernel_code(nonlinearity), BLOCK_B=cfg.block_b)
    if not backward:
        consts["HAS_H0"] = has_h0
    if cfg.tiled:
        consts.update(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        fn = _bwd_tiled_kernel if backward else _fwd_tiled_kernel
    else:
        consts["BLOCK_H"] = max(16, triton.next_power_of_2(hidden))
        fn = _bwd_kernel if backward else _fwd_kernel
    return fn, consts, cfg.num_warps


def _forward(xproj, weight, h0, bias, nonlinearity, weight_dtype):
    T, B, H = xproj.shape
    x = xproj.float().contiguous()                                         # [T, B, H]
    W = weight.to(weight_dtype).contiguous()                               # [H, H]
    b = bias.float().contiguous() if bias is not None else x.new_zeros(H)  # [H]
    h0c = h0.float().contiguous() if h0 is not None else x.new_zeros(1)    # [B, H], unread without h0
    out = torch.full_like(x, float("nan"))  # [T, B, H]; NaN-poisoned: an element the kernel skips shows up
    z = torch.full_like(x, float("nan"))    # [T, B, H] pre-activations
    fn, consts, warps = kernel_plan(H, weight_dtype, False, nonlinearity, h0 is not None)
    _launcher(fn, x.device)[(triton.cdiv(B, consts["BLOCK_B"]),)](x, W, h0c, b, out, z, T, B, H, **consts,
                                                                  num_warps=warps, enable_fp_fusion=True)
    return out, z


def _backward(grad_out, z, out, weight, h0, bias, nonlinearity, weight_dtype):
    T, B, H = z.shape
    g = grad_out.float().contiguous()                                      # [T, B, H]
    W = weight.to(weight_dtype).contiguous()                               # [H, H]
    b = bias.float().contiguous() if bias is not None else z.new_zeros(H)  # [H]
    gz = torch.full_like(z, float("nan"))   # [T, B, H] dL/dz_t, NaN-poisoned
    gh0 = z.new_full((B, H), float("nan"))  # [B, H] dL/dh0
    fn, consts, warps = kernel_plan(H, weight_dtype, True, nonlinearity)
    _launcher(fn, z.device)[(triton.cdiv(B, consts["BLOCK_B"]),)](g, z, out, W, b, gz, gh0, T, B, H, **consts,
                                                                  num_warps=warps, enable_fp_fusion=True)
    grad_W, grad_b = parameter_grads(gz, z, out, h0, nonlinearity)  # float32 whatever weight_dtype
    return gz, grad_W, gh0, grad_b


def _define_ops(name: str, weight_dtype: torch.dtype):
    """Register the forward/backward custom ops for one weight dtype (a dtype is not an argument of the
    shared autograd contract ``register_recurrence_autograd``, so each dtype is its own op)."""

    @torch.library.custom_op(f"matrec::{name}", mutates_args=())
    def fwd(xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
            nonlinearity: str) -> tuple[Tensor, Tensor]:
        return _forward(xproj, weight, h0, bias, nonlinearity, weight_dtype)

    @fwd.register_fake
    def _(xproj, weight, h0, bias, nonlinearity):
        return (torch.empty_like(xproj, dtype=torch.float32), torch.empty_like(xproj, dtype=torch.float32))

    @torch.library.custom_op(f"matrec::{name}_backward", mutates_args=())
    def bwd(grad_out: Tensor, z: Tensor, out: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
            nonlinearity: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _backward(grad_out, z, out, weight, h0, bias, nonlinearity, weight_dtype)

    @bwd.register_fake
    def _(grad_out, z, out, weight, h0, bias, nonlinearity):
        T, B, H = z.shape
        return torch.empty_like(z), z.new_empty(H, H), z.new_empty(B, H), z.new_empty(H)

    register_recurrence_autograd(fwd, bwd)
    return fwd


_OPS = {torch.float32: _define_ops("rnn_recurrence_triton", torch.float32),
        torch.bfloat16: _define_ops("rnn_recurrence_triton_bf16w", torch.bfloat16)}


KERNELS = ("auto", "rows", "split")


def triton_recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None = None,
                      bias: Tensor | None = None, nonlinearity: str = "modrelu", *,
                      weight_dtype: torch.dtype = torch.float32, kernel: str = "auto") -> Tensor:
    """Same contract as :func:`matrec.ops.rnn_recurrence.recurrence` (float32 state; float64 inputs are
    computed in float32 here), for ``1 <= H <= MAX_HIDDEN``.

    ``weight_dtype=torch.bfloat16`` runs the recurrence with ``W`` rounded to bf16 (stored in bf16, the
    products and the state in float32): a precision trade, relative weight error ~4e-3, for half the
    weight bytes. Gradients, ``dL/dW`` included, are float32 (taken at the rounded ``W``) and reach
    ``weight`` in its own dtype.

    ``kernel``: "rows" (this module's kernels: a program per ``BLOCK_B`` batch rows), "split" (the
    column-split persistent kernels of :mod:`.triton_split`, float32 ``W`` only; on a grid that cannot be
    co-resident they fall back to "rows" with a warning), or "auto": "split" on CUDA (compiled) for a
    float32 ``W``, else "rows".
    """
    check_inputs(xproj, weight, h0, bias, nonlinearity)
    if kernel_code(nonlinearity) is None:  # registered after this kernel was written
        raise ValueError(f"nonlinearity must be one of {kernel_nonlinearities()} for the Triton recurrence, "
                         f"got {nonlinearity!r}")
    config_for(xproj.shape[-1], weight_dtype)  # ValueError on a hidden size or weight dtype without kernels
    if xproj.numel() >= 2**31:  # the kernels index with 32-bit offsets
        raise ValueError(f"xproj must have fewer than 2**31 elements for the Triton recurrence, "
                         f"got {list(xproj.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if kernel == "split" and weight_dtype != torch.float32:
        raise ValueError(f"kernel='split' needs weight_dtype=torch.float32, got {weight_dtype}")
    if kernel == "auto":
        compiled = xproj.device.type == "cuda" and not interpret_requested()
        kernel = "split" if compiled and weight_dtype == torch.float32 else "rows"
    if kernel == "split":
        from .triton_split import split_op  # an import statement: torch.compile traces it

        return split_op(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)
    return _OPS[weight_dtype](xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


def compile_report(hidden: int, weight_dtype: torch.dtype = torch.float32, backward: bool = False,
                   nonlinearity: str = "modrelu", *, has_h0: bool = True, config: Config | None = None,
                   arch: int = 90) -> dict:
    """Compile the kernel a launch at ``hidden`` would use for ``sm_<arch>`` (no GPU needed) and return
    ptxas's verdict: ``registers`` per thread, ``spills`` (spill-store bytes), ``shared_kib`` per program,
    and the ``ptx`` text. What the interpreter cannot show; used by the tests and
    ``benchmarks/triton_recurrence_ptxas.py``."""
    fn, consts, warps = kernel_plan(hidden, weight_dtype, backward, nonlinearity, has_h0, config=config)
    wtype = "*bf16" if weight_dtype == torch.bfloat16 else "*fp32"

    def signature_of(arg: str) -> str:
        return "i32" if arg in ("T", "B", "H") else wtype if arg == "W" else "*fp32"

    kernel = compile_ahead(fn, signature_of, consts, warps, arch)  # the options of a launch
    return ptxas_report(kernel, arch) | dict(constexprs=consts, num_warps=warps)


def ptxas_report(kernel, arch: int = 90) -> dict:
    """ptxas's verdict on a kernel compiled by :func:`matrec.ops.triton_support.compile_ahead`:
    ``registers`` per thread, ``spills`` (spill-store bytes), ``shared_kib`` per program, and the ``ptx``."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        run = subprocess.run([get_ptxas(arch).path, "--gpu-name", sm, "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    report = run.stdout + run.stderr
    return dict(registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                spills=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
                shared_kib=kernel.metadata.shared / 1024, ptx=kernel.asm["ptx"])
