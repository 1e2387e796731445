"""The recurrence's entry point: :func:`recurrence` and its backends, :data:`RECURRENCE_BACKENDS`.

``h_t = phi(xproj_t + h_{t-1} @ W^T)`` with nn.RNN's conventions: time-major ``xproj [T, B, H]`` (the
input projection with both biases already added), ``W [H, H]`` acting on row vectors as ``h @ W^T``,
``h0 [B, H]``. The state is carried in float32 whatever the I/O dtype (float64 stays float64;
:func:`matrec.ops.precision.compute_dtype`); the output has ``xproj``'s dtype.

Backends (one :class:`RecurrenceBackend` each): "torch" (:mod:`.fused`), "loop" (:mod:`.naive`, the
reference), "chunked" (:mod:`.chunked`, identity only), "cpp" (:mod:`.cpp`, a compiled CPU loop built
at first use) and "triton" (:mod:`.triton`, optional).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import kernel_guard
from ..backends import BackendRegistry, always_available
from ..triton_support import device_available
from .cpp import cpp_available, cpp_recurrence, cpp_supports
from .chunked import _rnn_recurrence_chunked, _rnn_recurrence_chunked_or_loop
from .fused import _rnn_recurrence
from .naive import check_inputs, check_mask, recurrence_reference, recurrence_scan
from .nonlinearities import kernel_code, modrelu


def _all(nonlinearity: str) -> bool:
    return True


@dataclass(frozen=True)
class RecurrenceBackend:
    """One way to run the recurrence.

    Attributes:
        function: ``(xproj, weight, h0, bias, nonlinearity) -> out [T, B, H]`` in ``xproj``'s dtype,
            differentiable on its own.
        available: ``device -> (ok, reason)``.
        supports: ``nonlinearity -> bool``; asked only once the backend is available.
        masks: whether ``function`` takes ``mask=`` (padded steps that keep the state) and
            ``resets=`` (packed documents).
    """

    function: Callable[..., Tensor]
    available: Callable[[torch.device], tuple[bool, str]] = always_available
    supports: Callable[[str], bool] = _all
    masks: bool = False


def _torch_backend(xproj, weight, h0, bias, nonlinearity):
    return _rnn_recurrence(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


def _chunked_backend(xproj, weight, h0, bias, nonlinearity):
    return _rnn_recurrence_chunked(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


def _chunked_or_loop(xproj, weight, h0, bias, nonlinearity):
    return _rnn_recurrence_chunked_or_loop(xproj, weight, h0, bias, nonlinearity)[0].to(xproj.dtype)


def _triton_module():
    from . import triton  # an import statement, not importlib: torch.compile traces it

    return triton


def _triton_backend(xproj, weight, h0, bias, nonlinearity):
    return _triton_module().triton_recurrence(xproj, weight, h0, bias, nonlinearity)


def _triton_available(device: torch.device) -> tuple[bool, str]:
    return device_available(device, cpu_needs_interpret=False)


# auto's rule for the chunked form, from benchmarks/recurrence_crossover.py (docs/mornn.md, "Speed";
# benchmarks/results/recurrence_crossover_cpu.md holds the measurements): CPU only (nothing measured
# on CUDA); per-step work B * H^2 <= AUTO_CHUNKED_MAX_WORK (above it the form's doubled GEMM work
# outweighs the per-step overhead it saves); H <= 128 and T >= max(64, 4 H), enough steps to repay
# the ~H^3 set-up (W's powers).
AUTO_CHUNKED_MAX_WORK = 8 * 64 * 64
AUTO_CHUNKED_MAX_HIDDEN = 128


def _auto_backend(xproj: Tensor, nonlinearity: str) -> str:
    """The backend "auto" runs: "cpp" on CPU when it builds (:func:`cpp_available` keeps the reason
    when it does not), else "chunked" (falling back to the loop on an unsuitable W) or "torch"."""
    T, B, H = xproj.shape
    if (xproj.device.type == "cpu" and cpp_supports(nonlinearity) and B * H < 2 ** 31
            and cpp_available(xproj.device)[0]):
        return "cpp"
    return _auto_without_cpp(xproj, nonlinearity)


def _auto_without_cpp(xproj: Tensor, nonlinearity: str) -> str:
    """auto's rule where "cpp" cannot run (another device, no compiler): "triton" on CUDA where
    :func:`_triton_auto` allows it, else "chunked" or "torch". On CPU "cpp" beats both at every measured
    shape, identity included (benchmarks/results/cpu_recurrence.md)."""
    T, B, H = xproj.shape
    if xproj.device.type == "cuda" and _triton_auto(xproj.device, xproj.dtype, xproj.shape, nonlinearity):
        return "triton"
    if (nonlinearity == "identity" and xproj.device.type == "cpu" and H <= AUTO_CHUNKED_MAX_HIDDEN
            and T >= max(64, 4 * H) and B * H * H <= AUTO_CHUNKED_MAX_WORK):
        return "chunked"
    return "torch"


# auto on CUDA: the Triton kernels (the column-split one, :mod:`.triton_split`) for the nonlinearities
# cuDNN does not have (tanh and relu run on cuDNN in MORNN); unmeasured on a GPU so far, see docs/kernel.md.
AUTO_TRITON_NONLINEARITIES = ("modrelu", "identity")
_AUTO_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 would be computed in float32


def _triton_auto(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], nonlinearity: str) -> bool:
    """Whether auto runs "triton" for an ``xproj`` of ``shape`` ``[T, B, H]``: a nonlinearity of
    AUTO_TRITON_NONLINEARITIES, an I/O dtype the kernel computes exactly enough (not float64), triton
    usable on ``device``, a size the kernels take, and the first-use check (:func:`check_triton_kernel`,
    via :mod:`matrec.ops.kernel_guard`) passed for (device, dtype, H)."""
    T, B, H = shape
    if (nonlinearity not in AUTO_TRITON_NONLINEARITIES or dtype not in _AUTO_TRITON_DTYPES
            or T * B * H >= 2**31 or not _triton_available(device)[0]):
        return False
    if not 1 <= H <= _triton_module().MAX_HIDDEN:
        return False
    return kernel_guard.proven("rnn_recurrence", device, dtype, H)


def check_triton_kernel(device: torch.device, dtype: torch.dtype, H: int) -> str | None:
    """The first-use check of the Triton recurrence (:mod:`matrec.ops.kernel_guard`): None if
    ``backend="triton"`` agrees with the float64 loop on a small problem (3 rows, 37 steps, hidden size
    ``H``, an initial state; outputs and every gradient) for each of AUTO_TRITON_NONLINEARITIES, else why
    not. The reference runs on the very inputs the kernel gets (rounded to ``dtype``); rows with a modReLU
    pre-activation within 1e-5 of its kink (where float32 and float64 may take different branches) are
    left out."""
    gen = torch.Generator().manual_seed(0)
    T, B = 37, 3
    W = torch.linalg.qr(torch.randn(H, H, generator=gen, dtype=torch.float64))[0].float()  # [H, H]
    x = torch.randn(T, B, H, generator=gen).to(dtype)   # [T, B, H]
    h0 = torch.randn(B, H, generator=gen).to(dtype)     # [B, H]
    G = torch.randn(T, B, H, generator=gen).to(dtype)   # [T, B, H] dL/d out
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # fp32 arithmetic; bf16/fp16 rounding of I/O
    if device.type == "cuda":  # the column-split kernel: every slice width a call at this H may get
        from . import triton_split

        for width in triton_split.widths_for(H):
            with triton_split.only_width(width):
                reason = _check_once(device, dtype, x, W, h0, G, tol, gen)
            if reason is not None:
                return f"{reason}, column slices of {width}"
        return None
    return _check_once(device, dtype, x, W, h0, G, tol, gen)


def _check_once(device, dtype, x, W, h0, G, tol, gen) -> str | None:
    H = W.shape[0]
    names = ("output", "d xproj", "d weight", "d h0", "d bias")
    for nonlinearity in AUTO_TRITON_NONLINEARITIES:
        b = -0.1 * torch.rand(H, generator=gen) if nonlinearity == "modrelu" else None  # [H]
        keep = _rows_off_the_kinks(x.double(), W.double(), h0.double(), None if b is None else b.double())
        inputs = (x[:, keep], W, h0[keep], b)
        ref_in = [None if t is None else t.double().requires_grad_() for t in inputs]
        dev_in = [None if t is None else t.to(device).requires_grad_() for t in inputs]
        ref = recurrence_reference(*ref_in, nonlinearity)
        out = recurrence(*dev_in, nonlinearity, backend="triton")
        ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t is not None], G[:, keep].double())
        grads = torch.autograd.grad(out, [t for t in dev_in if t is not None], G[:, keep].to(device))
        for name, got, want in zip(names, (out, *grads), (ref, *ref_grads)):
            err = ((got.detach().double().cpu() - want.detach()).abs().max() / want.abs().max()).item()
            if not err <= tol:  # NaN fails too
                return f"{name} relative error {err:.2e} > {tol:.0e} ({nonlinearity})"
    return None


def _rows_off_the_kinks(x: Tensor, W: Tensor, h0: Tensor, b: Tensor | None, eps: float = 1e-5) -> Tensor:
    """``[B]`` bool: the rows whose modReLU pre-activations all stay ``eps`` from ``|z| = -b`` (every row
    without a bias; every row if none would be left)."""
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    if b is None:
        return keep
    h = h0  # [B, H]
    for t in range(x.shape[0]):
        z = x[t] + h @ W.T  # [B, H]
        keep &= ~((z.abs() + b).abs() < eps).any(dim=1)
        h = modrelu(z, b)
    return keep if keep.any() else torch.ones_like(keep)


kernel_guard.KERNEL_CHECKS.register("rnn_recurrence", check_triton_kernel)


def _auto_rule(device: torch.device, *, xproj: Tensor, nonlinearity: str, masked: bool = False) -> str:
    # with a padding mask: the reference loop, the one training-capable backend that takes one
    # (packed documents alone run the usual backend between restarts: see _restarting)
    return "loop" if masked else _auto_backend(xproj, nonlinearity)


def _identity_only(nonlinearity: str) -> bool:
    return nonlinearity == "identity"


def _triton_supports(nonlinearity: str) -> bool:
    return kernel_code(nonlinearity) is not None


RECURRENCE_BACKENDS: BackendRegistry[RecurrenceBackend] = BackendRegistry(
    "recurrence backend", argument="recurrence_backend", auto=_auto_rule, export_safe="scan")
RECURRENCE_BACKENDS.register("torch", RecurrenceBackend(_torch_backend))
# the autograd loop: the reference, selectable so benchmarks time what the op replaces
RECURRENCE_BACKENDS.register("loop", RecurrenceBackend(recurrence_reference, masks=True))
# the compiled CPU loop; "auto" picks it on CPU whenever it builds (benchmarks/results/cpu_recurrence.md)
RECURRENCE_BACKENDS.register("cpp", RecurrenceBackend(cpp_recurrence, available=cpp_available,
                                                     supports=cpp_supports))
RECURRENCE_BACKENDS.register("chunked", RecurrenceBackend(_chunked_backend, supports=_identity_only))
RECURRENCE_BACKENDS.register("triton", RecurrenceBackend(_triton_backend, available=_triton_available,
                                                         supports=_triton_supports))
# the definition's step in PyTorch's scan op (a dynamic length under torch.export): the export path
RECURRENCE_BACKENDS.register("scan", RecurrenceBackend(recurrence_scan, masks=True))
# what "auto" runs when it picks "chunked": the same form, but it never refuses a W (it falls back
# to the sequential loop instead)
_AUTO_CHUNKED = RecurrenceBackend(_chunked_or_loop, supports=_identity_only)


def recurrence(xproj: Tensor, weight: Tensor, h0: Tensor | None = None, bias: Tensor | None = None,
               nonlinearity: str = "modrelu", *, backend: str = "auto", mask: Tensor | None = None,
               resets: Tensor | None = None) -> Tensor:
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
            - "triton": the persistent kernels of :mod:`matrec.ops.rnn_recurrence.triton` (hidden-size
              limit and dtypes: see there; on CUDA the column-split kernel of
              :mod:`matrec.ops.rnn_recurrence.triton_split`);
            - "cpp": CPU only, the compiled loop of :mod:`matrec.ops.rnn_recurrence.cpp` (built at
              first use; every nonlinearity; bfloat16/float16 computed in float32);
            - "scan": the definition's step in PyTorch's scan op, what an exported graph runs;
            - "auto": with a ``mask``, "loop"; on CUDA "triton" for modrelu/identity
              (float32/bf16/fp16 I/O, H <= 512) once its first-use check (:func:`check_triton_kernel`,
              :mod:`matrec.ops.kernel_guard`) has passed for (device, dtype, H); on CPU "cpp" when it
              builds; otherwise "chunked" where measured faster than "torch" (:func:`_auto_backend`:
              identity, CPU, H <= 128, T >= max(64, 4H),
              B*H^2 <= 32768; on a W the chunked form cannot take it falls back to the sequential
              loop inside the op, with no error), else "torch".

        mask: ``[T, B]`` bool or None: where unset, the step keeps the state (and outputs it), so
            ``h`` after a padded tail is the state after the valid prefix ("loop" and "scan").
        resets: ``[T, B]`` bool or None: packed documents; where set, the step starts from
            ``h = 0`` instead of the carried state ("loop" and "scan" natively; any other backend,
            without a ``mask``, runs once per stretch between the steps where some row restarts).

    Returns:
        ``[T, B, H]`` all states ``h_1..h_T``, in ``xproj``'s dtype.
    """
    check_inputs(xproj, weight, h0, bias, nonlinearity)
    check_mask(mask, xproj)
    check_mask(resets, xproj, "resets")
    name, spec = _resolve(backend, xproj, nonlinearity, mask is not None)
    if not spec.supports(nonlinearity):
        raise ValueError(f"nonlinearity {nonlinearity!r} is not supported by backend={name!r} "
                         f"(use backend='torch', which runs every registered nonlinearity)")
    if mask is None and resets is None:
        return spec.function(xproj, weight, h0, bias, nonlinearity)
    if mask is None and not spec.masks:
        return _restarting(spec.function, xproj, weight, h0, bias, nonlinearity, resets)
    if not spec.masks:
        raise ValueError(f"{'mask' if mask is not None else 'resets'} is not supported by backend={name!r} "
                         f"(backends that take one: "
                         f"{[n for n in RECURRENCE_BACKENDS.names() if RECURRENCE_BACKENDS.get(n).masks]})")
    return spec.function(xproj, weight, h0, bias, nonlinearity, mask=mask, resets=resets)


def _restarting(function, xproj: Tensor, weight: Tensor, h0: Tensor | None, bias: Tensor | None,
                nonlinearity: str, resets: Tensor) -> Tensor:
    """``function`` (a backend without resets) over the stretches of time between the steps where
    some row restarts, that row's state zeroed there: exact, and one call (the backend's own speed)
    when no row restarts inside ``xproj [T, B, H]``. ``resets [T, B]``."""
    cuts = set(resets.any(1).nonzero().flatten().tolist())  # one host sync per call
    bounds = sorted(cuts | {0, xproj.shape[0]})
    h, pieces = h0, []
    for a, b in zip(bounds, bounds[1:]):
        if a in cuts and h is not None:
            h = h.masked_fill(resets[a, :, None], 0.0)  # [B, H]
        pieces.append(function(xproj[a:b], weight, h, bias, nonlinearity))  # [b - a, B, H]
        h = pieces[-1][-1]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _resolve(backend: str, xproj: Tensor, nonlinearity: str,
             masked: bool = False) -> tuple[str, RecurrenceBackend]:
    name, spec = RECURRENCE_BACKENDS.resolve(backend, xproj.device, argument="backend",
                                             xproj=xproj, nonlinearity=nonlinearity, masked=masked)
    return name, (_AUTO_CHUNKED if backend == "auto" and name == "chunked" else spec)
