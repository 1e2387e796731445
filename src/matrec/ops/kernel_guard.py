"""First-use proof of a fused kernel on the device at hand, before ``backend="auto"`` relies on it.

A Triton kernel that compiles is not yet a kernel that computes the right thing on every GPU,
Triton release and driver a user may have. So before ``auto`` hands a fused kernel its first real
input on a (device, dtype, size) it has not seen, :func:`proven` runs the op's registered check: a
tiny random problem through the kernel and through the plain PyTorch reference, outputs and every
gradient compared. On a mismatch or any error (a compile failure, an unsupported instruction) it
warns once with the reason and answers False for that key for the rest of the process, and the
caller uses its PyTorch backend instead. An explicit ``backend="triton"`` is not guarded: that is
the user's choice, and benchmarks time the kernel itself.

Set ``MATREC_KERNEL_CHECK=0`` to skip the checks (every kernel counts as proven).
The cost of one check is measured by ``benchmarks/gpu_check.py`` (part ``guard``).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from ..registry import Registry

__all__ = ["ENV_VAR", "KERNEL_CHECKS", "enabled", "proven", "verdicts", "reset"]

ENV_VAR = "MATREC_KERNEL_CHECK"

# op name -> check(device, dtype, size) -> None when the kernel agrees with the reference, else the
# reason it does not. Exceptions raised by a check count as failures (their message is the reason).
KERNEL_CHECKS: Registry[Callable[[torch.device, torch.dtype, int], Optional[str]]] = Registry(
    "kernel check", argument="op"
)

# (op, device, dtype, size) -> (ok, reason)
_VERDICTS: dict[tuple, tuple[bool, str]] = {}


def enabled() -> bool:
    """False when ``MATREC_KERNEL_CHECK`` is set to 0 / false / off / no."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def proven(op: str, device: torch.device, dtype: torch.dtype, size: int) -> bool:
    """Whether the fused kernel of ``op`` may serve inputs of ``dtype`` and order/width ``size`` on
    ``device``: runs the registered check the first time a key is seen, then answers from memory.

    Under ``torch.compile`` tracing the check cannot run (it calls autograd itself), so an unseen
    key counts as not proven there and the traced graph uses the PyTorch backend; one eager call
    with the same (device, dtype, size) before compiling proves the kernel for the compiled graph.
    """
    if not enabled():
        return True
    key = (op, _device_key(device), dtype, int(size))
    if key in _VERDICTS:
        return _VERDICTS[key][0]
    if torch.compiler.is_compiling():
        return False
    check = KERNEL_CHECKS.get(op)
    try:
        reason = check(torch.device(key[1]), dtype, int(size))
    except Exception as err:  # any failure to run is as disqualifying as a wrong answer
        reason = f"{type(err).__name__}: {err}"
    _VERDICTS[key] = (reason is None, reason or "agrees with the PyTorch reference")
    if reason is not None:
        warnings.warn(
            f"matrec: the fused {op} kernel failed its first-use check on {key[1]} "
            f"({dtype}, size {size}): {reason}. backend='auto' uses PyTorch instead for the rest of "
            f"this process; set {ENV_VAR}=0 to skip the check.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _VERDICTS[key][0]


def verdicts() -> dict[tuple, tuple[bool, str]]:
    """Every key checked so far: ``(op, device, dtype, size) -> (ok, reason)``."""
    return dict(_VERDICTS)


def reset() -> None:
    """Forget every verdict (tests; a process that reloaded its kernels)."""
    _VERDICTS.clear()
