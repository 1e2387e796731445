"""The mixer protocol: what every sequence-mixing layer of :mod:`matrec.nn` implements.

A *mixer* maps ``x [B, T, E]`` to ``y [B, T, E]`` causally, carrying a state from one call to the
next. Three things make one (docs/architecture.md, "The mixer protocol")::

    y, state = mixer(x, state=None, *, mask=None)   # state None: the sequence starts here
    mixer.init_weights(std, residual_std)            # GPT-2-style init of its projections
    mixer.state_spec() -> list[StateSpec]            # what `state` holds, tensor by tensor

- ``mask [B, T]`` (bool, optional): False marks padding. A padded step leaves the state as it was
  (its output is computed but meaningless), so a row padded at the end returns the state after its
  valid tokens. A layer that cannot honour a mask raises :class:`NoExportForm` (a
  ``NotImplementedError``) naming itself.
- ``state``: None (a stateless layer), one tensor, or a tuple of tensors, in the order of
  :meth:`state_spec`. When the layer is called with a ``mask`` it returns its state in exactly that
  layout, which is what lets :func:`flatten_state` / :func:`unflatten_state` turn the states of a
  whole model into a flat list of tensors and back (``matrec.export`` does nothing else with them).
- Packed documents, ``starts [B, T]`` (bool, optional keyword of the layers that support it): True
  at the first token of each document packed into a row (as flash-attention's ``cu_seqlens`` mark
  them; :func:`starts_from_cu_seqlens` converts). The state restarts from its initial value there,
  so each document computes as if run alone, gradients included: the MRU and linear-attention scans
  become segmented scans, attention a block-diagonal causal mask, the recurrences restart from a zero
  state. A call continues the last document of the previous call unless its first token is a start.
- Optional: ``for_inference()`` returns the layer for inference-only graphs (a training-time
  parametrisation materialised as constants); ``as_masked_state(state)`` turns the state an
  unmasked call returned into the :meth:`state_spec` layout, when the two differ.

Calling in chunks and passing the state along equals one call on the whole sequence, with or
without a mask.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..ops.backends import NoExportForm

__all__ = ["StateSpec", "Mixer", "NoExportForm", "STATE_INITS", "flatten_state", "unflatten_state",
           "missing_protocol", "check_mask", "for_inference", "as_masked_state", "starts_from_cu_seqlens",
           "takes_starts"]

#: how a state tensor starts: all zeros, the identity over its last two dims, all False
STATE_INITS = ("zeros", "identity", "false")
BATCH, SLOTS = "B", "P"


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: its ``name``, its ``shape`` with ``"B"`` for the batch dim and ``"P"`` for a
    cache's slots (a KV cache: each call appends its ``T`` tokens there), how it starts (``init``, one
    of :data:`STATE_INITS`) and its ``dtype``."""

    name: str
    shape: tuple
    init: str = "zeros"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.init not in STATE_INITS:
            raise ValueError(f"init must be one of {list(STATE_INITS)}, got {self.init!r}")
        if not all(isinstance(n, int) or n in (BATCH, SLOTS) for n in self.shape):
            raise ValueError(f"shape entries must be ints, {BATCH!r} or {SLOTS!r}, got {self.shape}")

    @property
    def grows(self) -> int | None:
        """The dim that grows by ``T`` per call (a cache's slots), or None."""
        return self.shape.index(SLOTS) if SLOTS in self.shape else None

    def sizes(self, batch_size: int, slots: int = 1) -> tuple[int, ...]:
        """The concrete shape for ``batch_size`` rows and ``slots`` cache slots."""
        return tuple(batch_size if n == BATCH else slots if n == SLOTS else n for n in self.shape)

    def initial(self, batch_size: int, slots: int = 1, device=None) -> Tensor:
        """The state before the first token (a cache's ``slots`` are placeholders: zeros, or False
        in its validity mask, so nothing ever attends to them)."""
        shape = self.sizes(batch_size, slots)
        if self.init == "identity":
            return torch.eye(shape[-1], dtype=self.dtype, device=device).expand(shape).clone()
        return torch.zeros(shape, dtype=self.dtype, device=device)


@runtime_checkable
class Mixer(Protocol):
    """The protocol (see the module docstring); ``isinstance(layer, Mixer)`` checks the names only,
    :func:`missing_protocol` the ``mask`` keyword too."""

    def forward(self, x: Tensor, state: Any = None, *, mask: Tensor | None = None) -> tuple[Tensor, Any]: ...

    def init_weights(self, std: float, residual_std: float) -> None: ...

    def state_spec(self) -> list[StateSpec]: ...


def missing_protocol(mixer: nn.Module) -> list[str]:
    """What ``mixer`` lacks of the protocol, in words ([] when it implements it)."""
    missing = []
    try:
        params = inspect.signature(mixer.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "mask" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        missing.append("forward(x, state=None, *, mask=None) (its forward takes no mask)")
    for name, what in (("init_weights", "init_weights(std, residual_std)"),
                       ("state_spec", "state_spec() -> list[StateSpec]")):
        if not callable(getattr(mixer, name, None)):
            missing.append(what)
    return missing


def flatten_state(specs: list[StateSpec], state) -> list[Tensor]:
    """``state`` (None, a tensor or a tuple, laid out as ``specs``) as a list of tensors."""
    tensors = [] if state is None else [state] if isinstance(state, Tensor) else list(state)
    if len(tensors) != len(specs) or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"state must hold the tensors {[s.name for s in specs]}, got "
                         f"{[type(t).__name__ for t in tensors]}")
    return tensors


def unflatten_state(specs: list[StateSpec], tensors):
    """The inverse of :func:`flatten_state`: None, the one tensor, or a tuple."""
    tensors = list(tensors)
    if len(tensors) != len(specs):
        raise ValueError(f"expected {len(specs)} state tensors {[s.name for s in specs]}, got {len(tensors)}")
    return None if not specs else tensors[0] if len(specs) == 1 else tuple(tensors)


def check_mask(mask: Tensor | None, x: Tensor, argument: str = "mask") -> None:
    """``mask`` (or ``starts``) must be None or bool ``[B, T]`` matching ``x [B, T, ...]``."""
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != tuple(x.shape[:2])):
        raise ValueError(f"{argument} must be None or a bool tensor [B, T] = {list(x.shape[:2])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")


def for_inference(mixer: nn.Module) -> nn.Module:
    """``mixer.for_inference()`` where the layer defines it, else the layer itself."""
    make = getattr(mixer, "for_inference", None)
    return make() if callable(make) else mixer


def as_masked_state(mixer: nn.Module, state):
    """``state`` in the layout of ``mixer.state_spec()`` (see ``as_masked_state`` in the module docstring)."""
    convert = getattr(mixer, "as_masked_state", None)
    return convert(state) if callable(convert) and state is not None else state


def starts_from_cu_seqlens(cu_seqlens: Tensor, T: int | None = None) -> Tensor:
    """``starts [1, T]`` from flash-attention's cumulative lengths ``cu_seqlens [n + 1]`` (``0, l_1,
    l_1 + l_2, ..., T``) of ``n`` documents packed into one row."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [n + 1] of cumulative lengths, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got {cu.tolist()}")
    T = int(cu[-1]) if T is None else T
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {int(cu[-1])}")
    starts = torch.zeros(1, T, dtype=torch.bool, device=cu.device)
    starts[0, cu[:-1]] = True
    return starts


def takes_starts(mixer: nn.Module) -> bool:
    """Whether ``mixer.forward`` takes ``starts=`` (packed documents)."""
    try:
        return "starts" in inspect.signature(mixer.forward).parameters
    except (TypeError, ValueError):
        return False
