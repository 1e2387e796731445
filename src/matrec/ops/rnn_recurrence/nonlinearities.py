"""The recurrence's nonlinearities: the one definition every backend uses.

The PyTorch backends ("torch", "loop", "chunked") call :data:`NONLINEARITIES` entries directly. The
Triton kernels cannot call Python, so they implement the entries they know by name
(:data:`matrec.ops.rnn_recurrence.triton._CODES`); a nonlinearity registered later runs on the
PyTorch backends and is refused by name by the Triton one (see ``RecurrenceBackend.supports``).
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
