"""The recurrence's nonlinearities: the one definition every backend uses.

The PyTorch backends ("torch", "loop", "chunked") call :data:`NONLINEARITIES` entries directly. The
compiled kernels (C++ and Triton) cannot call Python: each entry they implement carries its number
in them (``kernel_code``, the enum ``Phi`` of cpu_kernel.cpp and the Triton kernels' ``NL``) and
its slope as they compute it, from the output alone (``slope_from_output``). A nonlinearity
registered later without a code runs on the PyTorch backends and is refused by name by the compiled
ones (see ``RecurrenceBackend.supports``).
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
    ``kernel_code``: its number in the compiled kernels (None: the PyTorch backends only);
    ``slope_from_output(h) -> dh/dz`` as those kernels compute it (they keep ``h``, not ``z``).
    """

    forward: Callable[[Tensor, Tensor | None], Tensor]
    slope: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    bias_grad: Callable[[Tensor, Tensor], Tensor] | None = None
    kernel_code: int | None = None
    slope_from_output: Callable[[Tensor], Tensor] | None = None


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


# kernel codes: the compiled kernels' numbering (cpu_kernel.cpp's enum Phi, triton.py's phi and phi_slope)
NONLINEARITIES.register("tanh", Phi(lambda z, b: torch.tanh(z), lambda z, h, b: 1 - h * h,
                                    kernel_code=0, slope_from_output=lambda h: 1 - h * h))
NONLINEARITIES.register("relu", Phi(lambda z, b: torch.relu(z), lambda z, h, b: (z > 0).to(z.dtype),
                                    kernel_code=1, slope_from_output=lambda h: (h > 0).to(h.dtype)))
NONLINEARITIES.register("modrelu", Phi(modrelu, _modrelu_slope, _modrelu_bias_grad,
                                       kernel_code=2, slope_from_output=lambda h: (h != 0).to(h.dtype)))
NONLINEARITIES.register("identity", Phi(lambda z, b: z, lambda z, h, b: torch.ones_like(z),
                                        kernel_code=3, slope_from_output=torch.ones_like))


def kernel_code(nonlinearity: str) -> int | None:
    """``nonlinearity``'s number in the compiled kernels, None when they do not implement it."""
    return NONLINEARITIES.get(nonlinearity).kernel_code if nonlinearity in NONLINEARITIES else None


def kernel_nonlinearities() -> list[str]:
    """The nonlinearities the compiled kernels implement."""
    return [n for n in NONLINEARITIES.names() if kernel_code(n) is not None]
