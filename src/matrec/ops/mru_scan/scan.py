"""MRU prefix-product scan: ``H_t = H_{t-1} @ M_t`` (docs/design.md §2).

One associative-scan machinery serves both directions:

* forward: the elements are the matrices ``M_t`` (``H_0`` folded into the first one) and the
  operator is the matrix product;
* backward: the reverse recurrence ``B_t = G_t + B_{t+1} @ M_{t+1}^T`` is a chain of affine maps
  ``X -> X @ U + L``. An affine map is stored as the ``2d x d`` stack ``[U; L]`` (the first block
  column of ``[[U, 0], [L, I]]``) and two of them compose as ``[U1; L1] @ U2 + [0; L2]`` -- the same
  ``a @ b`` product as the forward plus one add. So every scan *pattern* of :mod:`.patterns` (sequential,
  Hillis-Steele, Brent-Kung, Sklansky, chunked) is written once over "stacked elements"
  ``[N, T, r, d]`` with ``r = d`` (forward) or ``r = 2d`` (backward), and one
  :class:`torch.autograd.Function` uses the chosen pattern for both passes.

Backends live in :data:`SCAN_BACKENDS`. A backend is either a *pattern* (gets the shared autograd
above) or a *self-differentiating function* (e.g. the Triton kernel in ``matrec.ops.mru_scan.triton``,
imported lazily). Users may register their own of either kind.

Numerics: the scan runs in float32 for bf16/fp16 inputs (and with autocast disabled), and in the
input precision for float32/float64. Products of many unconstrained matrices can overflow to inf/NaN
(docs/design.md §2.3); nothing here masks
that -- use a norm-preserving construction (``matrec.ops.state_matrix``: cayley, expm, householder,
or the det-1 ones) or shorter chunks with a carried state for very long sequences.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...checks import check_int
from .. import kernel_guard
from ..backends import BackendRegistry, always_available
from ..precision import compute_dtype
from .naive import naive_mru_scan, scan_mru_scan
from .segmented import SegmentedPatternScan
from .patterns import brent_kung_scan, chunked_scan, hillis_steele_scan, sequential_scan, sklansky_scan

__all__ = ["mru_scan", "naive_mru_scan", "SCAN_BACKENDS", "ScanBackend", "auto_backend"]


# ---------------------------------------------------------------------------------------------
# The one autograd implementation (docs/design.md §2.2) shared by every pattern backend.


class _PatternScan(torch.autograd.Function):
    """Forward and backward of ``H_t = H_{t-1} @ M_t`` with one scan pattern for both passes.

    Inputs are flat: ``states [N, T, d, d]``, ``initial_state [N, d, d]`` or None.
    """

    @staticmethod
    def forward(ctx, states, initial_state, pattern, chunk_size):
        with torch.autocast(device_type=states.device.type, enabled=False):
            x = states.clone()  # [N, T, d, d]; the pattern scans it in place
            if initial_state is not None:
                x[:, 0] = initial_state @ states[:, 0]  # fold H_0 into the first element
            H = pattern(x, chunk_size)  # [N, T, d, d]
        ctx.save_for_backward(states, initial_state, H)
        ctx.pattern, ctx.chunk_size = pattern, chunk_size
        return H

    @staticmethod
    @once_differentiable
    def backward(ctx, G):  # G: [N, T, d, d] = dL/dH_t from outside the scan
        states, H0, H = ctx.saved_tensors
        N, T, d, _ = states.shape
        with torch.autocast(device_type=states.device.type, enabled=False):
            # Reverse time so the reverse recurrence becomes a forward scan over affine maps:
            # X_s = X_{s-1} @ U_s + L_s, X_0 = 0, U_s = M^T of the step after, L_s = G (reversed).
            E = G.new_empty(N, T, 2 * d, d)  # [N, T, 2d, d]: stacked [U; L]
            E[:, 0, :d] = 0  # acts on X_0 = 0: never matters
            E[:, 1:, :d] = states[:, 1:].flip(1).mT
            E[:, :, d:] = G.flip(1)
            B = ctx.pattern(E, ctx.chunk_size)[:, :, d:].flip(1)  # [N, T, d, d]: total adjoints B_t
            dM = dH0 = None
            if ctx.needs_input_grad[0]:
                dM = torch.empty_like(states)  # dL/dM_t = H_{t-1}^T @ B_t
                dM[:, 1:] = H[:, :-1].mT @ B[:, 1:]
                dM[:, 0] = B[:, 0] if H0 is None else H0.mT @ B[:, 0]
            if H0 is not None and ctx.needs_input_grad[1]:
                dH0 = B[:, 0] @ states[:, 0].mT  # dL/dH_0 = B_1 @ M_1^T
        return dM, dH0, None, None


# ---------------------------------------------------------------------------------------------
# Backends.


@dataclass(frozen=True)
class ScanBackend:
    """A way to compute the scan. Exactly one of ``pattern`` / ``function`` is set.

    Attributes:
        pattern: ``(x [N, T, r, d], chunk_size) -> prefix [N, T, r, d]`` over the stacked elements of
            :func:`matrec.ops.mru_scan.patterns.combine`; gets the shared autograd (forward and backward both use it).
        function: ``(states [N, T, d, d], initial_state [N, d, d] | None) -> H [N, T, d, d]``,
            differentiable on its own (a fused kernel with its own backward).
        uses_chunk_size: whether ``chunk_size`` means something to this backend (a ``function``
            backend then also gets ``chunk_size=`` as a keyword).
        available: ``device -> (ok, reason)``.
        low_precision_io: a ``function`` backend that takes bf16/fp16 tensors as they are (and
            computes in float32 itself), saving the up-cast copy; otherwise it gets float32.
        resets: a ``function`` backend that takes ``resets=`` (packed documents); every pattern
            backend does, through the segmented scan of :mod:`.segmented`.
    """

    pattern: Optional[Callable[[Tensor, Optional[int]], Tensor]] = None
    function: Optional[Callable[..., Tensor]] = None
    uses_chunk_size: bool = False
    available: Callable[[torch.device], tuple[bool, str]] = always_available
    low_precision_io: bool = False
    resets: bool = False

    def __post_init__(self):
        if (self.pattern is None) == (self.function is None):
            raise ValueError("ScanBackend needs exactly one of pattern= or function=")


SCAN_BACKENDS: BackendRegistry[ScanBackend] = BackendRegistry("scan backend", argument="backend",
                                                               export_safe="scan")
SCAN_BACKENDS.register("sequential", ScanBackend(pattern=sequential_scan))
SCAN_BACKENDS.register("hillis_steele", ScanBackend(pattern=hillis_steele_scan))
SCAN_BACKENDS.register("brent_kung", ScanBackend(pattern=brent_kung_scan))
SCAN_BACKENDS.register("sklansky", ScanBackend(pattern=sklansky_scan))
SCAN_BACKENDS.register("chunked", ScanBackend(pattern=chunked_scan, uses_chunk_size=True))


def _triton_module():
    from . import triton as triton_scan  # an import statement, not importlib: torch.compile traces it

    return triton_scan


def _triton_function(states: Tensor, initial_state: Tensor | None, chunk_size: int | None = None) -> Tensor:
    return _triton_module().mru_scan_triton(states, initial_state, chunk_size=chunk_size)


def _triton_available(device: torch.device) -> tuple[bool, str]:
    try:
        module = _triton_module()
    except ImportError as e:  # triton itself, or the kernel module, is missing
        return False, f"matrec.ops.mru_scan.triton could not be imported ({e})"
    return module.triton_available(device)


SCAN_BACKENDS.register(
    "triton",
    ScanBackend(
        function=_triton_function,
        uses_chunk_size=True,
        available=_triton_available,
        low_precision_io=True,
    ),
)
# the definition's step in PyTorch's scan op: what an exported graph runs (dynamic T); autograd
# differentiates the loop (no fused backward), so it is the export path, not a training one
SCAN_BACKENDS.register("scan", ScanBackend(function=scan_mru_scan, resets=True))



def check_triton_kernel(device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """The first-use check of the fused kernel (:mod:`matrec.ops.kernel_guard`): None if it agrees
    with the float64 reference on a small random problem, else why not.

    Five sequences of 37 rotations with an initial state (more than one program's group of sequences
    at d >= 16, a partial group at every d), once as one chunk and once in chunks of 8 (so the
    chunk-total and carry phases run too); outputs and the gradients of both inputs.
    """
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(5, 37, d, d, generator=gen, dtype=torch.float64)
    M = torch.linalg.matrix_exp((A - A.mT) * (0.3 / d**0.5))  # [5, 37, d, d]
    A0 = torch.randn(5, d, d, generator=gen, dtype=torch.float64)
    H0 = torch.linalg.matrix_exp(A0 - A0.mT)  # [5, d, d]
    G = torch.randn(5, 37, d, d, generator=gen, dtype=torch.float64)
    ref_in = (M.clone().requires_grad_(), H0.clone().requires_grad_())
    ref = _PatternScan.apply(*ref_in, sequential_scan, None)
    ref_grads = torch.autograd.grad(ref, ref_in, G)
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # fp32 arithmetic; bf16/fp16 rounding of I/O
    for chunk_size in (37, 8):  # one chunk per sequence (no totals), and split into 5
        x = M.to(device, dtype).requires_grad_()
        h = H0.to(device, dtype).requires_grad_()
        out = _triton_function(x, h, chunk_size=chunk_size)
        grads = torch.autograd.grad(out, (x, h), G.to(device, dtype))
        named = zip(("output", "d states", "d initial_state"), (out, *grads), (ref, *ref_grads))
        for name, got, want in named:
            err = ((got.detach().double().cpu() - want.detach()).abs().max() / want.abs().max()).item()
            if not err <= tol:  # NaN fails too
                return f"{name} relative error {err:.2e} > {tol:.0e} (chunk_size={chunk_size})"
    return None


kernel_guard.KERNEL_CHECKS.register("mru_scan", check_triton_kernel)

# auto off CUDA (measured on CPU with benchmarks/scan.py, see docs/mru.md). Every parallel pattern
# does at least 2T products against the loop's T, so it only pays where the loop is bound by per-step
# overhead, not arithmetic: short-T or large per-step work (batch * d^3) -> the loop; otherwise
# Brent-Kung (~2T products in ~2 log2 T steps) up to about a thousand steps, the chunked pattern
# (one pass over contiguous chunks) beyond.
AUTO_SEQUENTIAL_MAX_T = 8
AUTO_SEQUENTIAL_MIN_WORK = 65536  # batch * d^3 per step
AUTO_BRENT_KUNG_MAX_T = 1024
# auto on CUDA without Triton: fewest dependent steps (ceil(log2 T)), since launches dominate there.
AUTO_CUDA_FALLBACK = "sklansky"


def auto_backend(
    device: torch.device,
    T: int,
    batch: int = 1,
    d: int = 1,
    dtype: torch.dtype = torch.float32,
    io_dtype: torch.dtype | None = None,
) -> str:
    """The backend ``backend="auto"`` uses for ``batch`` sequences of length ``T`` and order ``d``.

    ``dtype`` is the compute dtype (float32 for bf16/fp16 inputs). CUDA: ``"triton"`` for float32
    and ``d <= 64`` when :func:`matrec.ops.mru_scan.triton.triton_available` says so, else
    ``"sklansky"`` (with a warning naming the reason when Triton is what is missing; float64 and
    larger d go to ``"sklansky"`` silently: the fused kernel computes in float32 and takes
    ``d <= 64`` only). Triton is chosen only once the kernel has passed its first-use check for
    (device, ``io_dtype`` (the inputs' dtype, default ``dtype``), ``d``) -- see
    :mod:`matrec.ops.kernel_guard`; a kernel that fails it is replaced by ``"sklansky"`` with a
    warning. Elsewhere: ``"sequential"`` for ``T <= 8`` or ``batch * d**3 >= 65536``;
    else ``"brent_kung"`` for ``T <= 1024`` and ``"chunked"`` above.
    """
    if device.type == "cuda":
        if dtype != torch.float32:
            return AUTO_CUDA_FALLBACK
        ok, reason = _triton_available(device)
        if ok:
            if d > getattr(_triton_module(), "MAX_DIM", 64):
                return AUTO_CUDA_FALLBACK
            # the first use per (device, I/O dtype, d) runs the kernel against the reference
            proven = kernel_guard.proven("mru_scan", device, io_dtype or dtype, d)
            return "triton" if proven else AUTO_CUDA_FALLBACK
        warnings.warn(
            f"mru_scan(backend='auto'): Triton kernel unavailable on {device} ({reason}); "
            f"using the PyTorch '{AUTO_CUDA_FALLBACK}' backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return AUTO_CUDA_FALLBACK
    if T <= AUTO_SEQUENTIAL_MAX_T or batch * d**3 >= AUTO_SEQUENTIAL_MIN_WORK:
        return "sequential"
    return "brent_kung" if T <= AUTO_BRENT_KUNG_MAX_T else "chunked"


# ---------------------------------------------------------------------------------------------
# Public entry point.


def _validate(states, initial_state, chunk_size) -> None:
    if not isinstance(states, Tensor):
        raise TypeError(f"states must be a torch.Tensor, got {type(states).__name__}")
    if not states.is_floating_point():
        raise TypeError(f"states must have a floating-point dtype, got {states.dtype}")
    if states.dim() < 3:
        raise ValueError(
            f"states must have shape [..., T, d, d] (at least 3 dims), got {tuple(states.shape)}"
        )
    if states.shape[-1] != states.shape[-2]:
        raise ValueError(
            f"states must hold square matrices [..., T, d, d], got {tuple(states.shape)}"
        )
    if states.shape[-1] < 1:
        raise ValueError(f"states must have matrix order d >= 1, got {tuple(states.shape)}")
    if states.shape[-3] < 1:
        raise ValueError(f"states must have sequence length T >= 1, got {tuple(states.shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, Tensor):
            raise TypeError(
                f"initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}"
            )
        want = states.shape[:-3] + states.shape[-2:]
        if initial_state.shape != want:
            raise ValueError(
                f"initial_state must have shape {tuple(want)} (states' batch dims + [d, d]), "
                f"got {tuple(initial_state.shape)}"
            )
        if initial_state.dtype != states.dtype:
            raise TypeError(
                f"initial_state must have the dtype of states ({states.dtype}), got {initial_state.dtype}"
            )
        if initial_state.device != states.device:
            raise ValueError(
                f"initial_state must be on the device of states ({states.device}), "
                f"got {initial_state.device}"
            )
    check_int("chunk_size", chunk_size, allow_none=True)


def _auto_rule(device: torch.device, *, T: int, batch: int, d: int, dtype: torch.dtype,
               io_dtype: torch.dtype) -> str:
    return auto_backend(device, T, batch, d, dtype, io_dtype=io_dtype)


SCAN_BACKENDS.set_auto(_auto_rule)


def _resolve(backend, states: Tensor) -> tuple[str, ScanBackend]:
    *lead, T, d, _ = states.shape
    return SCAN_BACKENDS.resolve(backend, states.device, T=T, batch=math.prod(lead), d=d,
                                 dtype=compute_dtype(states.dtype), io_dtype=states.dtype)


def mru_scan(
    states: Tensor,
    initial_state: Tensor | None = None,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    resets: Tensor | None = None,
) -> Tensor:
    """All prefix products ``H_t = H_{t-1} @ M_t`` (``H_0 = initial_state``, identity if None).

    Args:
        states: ``[..., T, d, d]`` the input state matrices ``M_t``; any leading batch dims, any
            ``T >= 1``, any ``d >= 1``; float32/float64 (bf16/fp16 are computed in float32).
        initial_state: ``[..., d, d]`` (same batch dims, dtype and device) or None.
        backend: ``"auto"`` or a name in :data:`SCAN_BACKENDS` (``sequential``, ``hillis_steele``,
            ``brent_kung``, ``sklansky``, ``chunked``, ``triton``).
        chunk_size: chunk length for the ``chunked`` backend (default ``ceil(sqrt(T))``); an error
            for backends that have no chunks.
        resets: ``[..., T]`` bool or None: packed documents; where set a document starts and
            ``H_t = M_t`` (the product restarts; ``initial_state`` only feeds the first document).
            Every pattern backend and ``"scan"`` take it (:mod:`.segmented`); the Triton kernel
            does not (NotImplementedError; ``"auto"`` then picks ``"sklansky"`` on CUDA).
    Returns:
        ``[..., T, d, d]``: every ``H_t``, in the dtype of ``states``. Differentiable wrt ``states``
        and ``initial_state`` (first order; the backward is itself an associative scan).
    """
    _validate(states, initial_state, chunk_size)
    *lead, T, d, _ = states.shape
    N = math.prod(lead)
    if resets is not None and (not isinstance(resets, Tensor) or resets.dtype != torch.bool
                               or tuple(resets.shape) != (*lead, T)):
        raise ValueError(f"resets must be None or a bool tensor {[*lead, T]} (states' batch dims + [T]), got "
                         f"{getattr(resets, 'dtype', type(resets).__name__)} {list(getattr(resets, 'shape', []))}")
    name, spec = _resolve(backend, states)
    if resets is not None and spec.function is not None and not spec.resets:
        if backend != "auto":
            raise NotImplementedError(f"backend {name!r} does not take resets (packed documents); the "
                                      f"pattern backends ('sequential', 'sklansky', ...) and 'scan' do")
        name, spec = AUTO_CUDA_FALLBACK, SCAN_BACKENDS.get(AUTO_CUDA_FALLBACK)
    if chunk_size is not None and not spec.uses_chunk_size:
        raise ValueError(f"chunk_size applies to backends with chunks only, not backend {name!r}")

    dtype = states.dtype
    compute = compute_dtype(dtype)
    if spec.function is not None and spec.low_precision_io:
        compute = dtype
    x = states.reshape(N, T, d, d).to(compute).contiguous()  # [N, T, d, d]
    h0 = None
    if initial_state is not None:
        h0 = initial_state.reshape(N, d, d).to(compute).contiguous()  # [N, d, d]
    r = None if resets is None else resets.reshape(N, T)
    with torch.autocast(device_type=states.device.type, enabled=False):
        if spec.function is not None:
            kw = {"chunk_size": chunk_size} if spec.uses_chunk_size else {}
            H = spec.function(x, h0, **kw) if r is None else spec.function(x, h0, resets=r, **kw)
        elif r is not None:
            H = SegmentedPatternScan.apply(x, h0, r, spec.pattern, chunk_size)
        else:
            H = _PatternScan.apply(x, h0, spec.pattern, chunk_size)
    return H.reshape(*lead, T, d, d).to(dtype)
