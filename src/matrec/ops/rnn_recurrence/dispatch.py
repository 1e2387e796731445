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

from ..backends import BackendRegistry, always_available
from ..triton_support import device_available
from .cpp import cpp_available, cpp_recurrence, cpp_supports
from .chunked import _rnn_recurrence_chunked, _rnn_recurrence_chunked_or_loop
from .fused import _rnn_recurrence
from .naive import check_inputs, recurrence_reference
from .nonlinearities import kernel_code


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
    """

    function: Callable[..., Tensor]
    available: Callable[[torch.device], tuple[bool, str]] = always_available
    supports: Callable[[str], bool] = _all


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
    """auto's rule where "cpp" cannot run (another device, no compiler): "chunked" or "torch". On CPU
    "cpp" beats both at every measured shape, identity included (benchmarks/results/cpu_recurrence.md)."""
    T, B, H = xproj.shape
    if (nonlinearity == "identity" and xproj.device.type == "cpu" and H <= AUTO_CHUNKED_MAX_HIDDEN
            and T >= max(64, 4 * H) and B * H * H <= AUTO_CHUNKED_MAX_WORK):
        return "chunked"
    return "torch"


def _auto_rule(device: torch.device, *, xproj: Tensor, nonlinearity: str) -> str:
    return _auto_backend(xproj, nonlinearity)


def _identity_only(nonlinearity: str) -> bool:
    return nonlinearity == "identity"


def _triton_supports(nonlinearity: str) -> bool:
    return kernel_code(nonlinearity) is not None


RECURRENCE_BACKENDS: BackendRegistry[RecurrenceBackend] = BackendRegistry(
    "recurrence backend", argument="recurrence_backend", auto=_auto_rule)
RECURRENCE_BACKENDS.register("torch", RecurrenceBackend(_torch_backend))
# the autograd loop: the reference, selectable so benchmarks time what the op replaces
RECURRENCE_BACKENDS.register("loop", RecurrenceBackend(recurrence_reference))
# the compiled CPU loop; "auto" picks it on CPU whenever it builds (benchmarks/results/cpu_recurrence.md)
RECURRENCE_BACKENDS.register("cpp", RecurrenceBackend(cpp_recurrence, available=cpp_available,
                                                     supports=cpp_supports))
RECURRENCE_BACKENDS.register("chunked", RecurrenceBackend(_chunked_backend, supports=_identity_only))
RECURRENCE_BACKENDS.register("triton", RecurrenceBackend(_triton_backend, available=_triton_available,
                                                         supports=_triton_supports))
# what "auto" runs when it picks "chunked": the same form, but it never refuses a W (it falls back
# to the sequential loop instead)
_AUTO_CHUNKED = RecurrenceBackend(_chunked_or_loop, supports=_identity_only)


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
            - "cpp": CPU only, the compiled loop of :mod:`matrec.ops.rnn_recurrence.cpp` (built at
              first use; every nonlinearity; bfloat16/float16 computed in float32);
            - "auto": on CPU "cpp" when it builds; otherwise "chunked" where measured faster than
              "torch" (:func:`_auto_backend`: identity, CPU, H <= 128, T >= max(64, 4H),
              B*H^2 <= 32768; on a W the chunked form cannot take it falls back to the sequential
              loop inside the op, with no error), else "torch".

    Returns:
        ``[T, B, H]`` all states ``h_1..h_T``, in ``xproj``'s dtype.
    """
    check_inputs(xproj, weight, h0, bias, nonlinearity)
    name, spec = _resolve(backend, xproj, nonlinearity)
    if not spec.supports(nonlinearity):
        raise ValueError(f"nonlinearity {nonlinearity!r} is not supported by backend={name!r} "
                         f"(use backend='torch', which runs every registered nonlinearity)")
    return spec.function(xproj, weight, h0, bias, nonlinearity)


def _resolve(backend: str, xproj: Tensor, nonlinearity: str) -> tuple[str, RecurrenceBackend]:
    name, spec = RECURRENCE_BACKENDS.resolve(backend, xproj.device, argument="backend",
                                             xproj=xproj, nonlinearity=nonlinearity)
    return name, (_AUTO_CHUNKED if backend == "auto" and name == "chunked" else spec)
