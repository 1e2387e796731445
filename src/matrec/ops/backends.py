"""One contract for every op that has several implementations ("backends").

An op keeps its implementations in a :class:`BackendRegistry`. Every entry answers
``available(device) -> (ok, reason)``; the registry owns the op's ``"auto"`` rule. So the three
things a caller can get wrong are handled here, once, for every op:

- an unknown name: ``ValueError`` naming the argument and listing every choice, ``"auto"`` included;
- a backend whose package or device is missing: ``RuntimeError`` naming the argument, the backend
  and the reason (e.g. ``recurrence_backend='triton' is not available on cpu: triton is not
  importable ...``) instead of an ``ImportError`` from deep inside;
- ``"auto"``: the op's rule, given the device and whatever else the op passes as context.

An op whose graph must also export (``torch.export`` -> ONNX / ExecuTorch, dynamic length) names
one entry ``export_safe``. Inside :func:`export_safe` every registry resolves to that entry whatever
name the layer was built with, so ``matrec.export`` runs the model's own forward; a registry without
one raises :class:`NoExportForm` naming the argument.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

from ..registry import Registry

T = TypeVar("T")

AUTO = "auto"


class NoExportForm(NotImplementedError):
    """An op, a construction or a layer option has no export-safe form (``matrec.export`` names the layer)."""


_EXPORT = threading.local()


@contextmanager
def export_safe(unrolled: bool = False) -> Iterator[None]:
    """Within: every :class:`BackendRegistry` resolves to its ``export_safe`` entry, and ops and
    layers take their export-safe paths (:func:`exporting`). ``unrolled=True``: loops over time run
    as Python loops (a static length: the one-token step graph) instead of PyTorch's ``scan`` op."""
    before = getattr(_EXPORT, "mode", None)
    _EXPORT.mode = (bool(unrolled),)
    try:
        yield
    finally:
        _EXPORT.mode = before


def exporting() -> bool:
    """Whether the caller runs inside :func:`export_safe`."""
    return getattr(_EXPORT, "mode", None) is not None


def export_unrolled() -> bool:
    """Inside :func:`export_safe`: whether loops over time unroll (False outside)."""
    mode = getattr(_EXPORT, "mode", None)
    return bool(mode and mode[0])


def always_available(device: torch.device) -> tuple[bool, str]:
    """The availability of a pure-PyTorch backend: any device."""
    return True, "pure PyTorch"


class BackendRegistry(Registry[T]):
    """A :class:`~matrec.registry.Registry` of one op's backends, with the op's ``"auto"`` rule.

    Entries may define ``available(device) -> (ok, reason)``; entries without it run anywhere.

    Args:
        kind: what the entries are, for messages (``"scan backend"``).
        argument: the argument users pass a name through (``"backend"``).
        auto: ``rule(device, **context) -> name``; None when the op has no ``"auto"``.
        export_safe: the entry :func:`export_safe` selects (one that traces with a dynamic length);
            None when the op has none.
    """

    def __init__(self, kind: str, *, argument: str | None = None,
                 auto: Callable[..., str] | None = None, export_safe: str | None = None) -> None:
        super().__init__(kind, argument=argument)
        self._auto = auto
        self.export_safe = export_safe

    def set_auto(self, rule: Callable[..., str]) -> Callable[..., str]:
        """Install ``rule(device, **context) -> name`` as ``"auto"`` (usable as a decorator)."""
        self._auto = rule
        return rule

    def choices(self) -> list[str]:
        """Every name a user may pass: ``"auto"`` (when the op has a rule) and the registered ones."""
        return ([AUTO] if self._auto is not None else []) + self.names()

    def check(self, name: object, argument: str | None = None) -> str:
        """``name`` if it is one of :meth:`choices`, else a ValueError naming ``argument``."""
        if not isinstance(name, str) or name not in self.choices():
            raise ValueError(f"{argument or self.argument} must be one of {self.choices()}, got {name!r}")
        return name

    def get(self, name: str) -> T:
        if name == AUTO and self._auto is not None:
            raise ValueError(f"{self.argument}='auto' is chosen per call: use resolve(), not get()")
        self.check(name)
        return super().get(name)

    def available(self, name: str, device: torch.device) -> tuple[bool, str]:
        """Whether backend ``name`` can run on ``device``, and if not, why."""
        entry = self.get(name)
        check = getattr(entry, "available", None)
        return always_available(device) if check is None else check(torch.device(device))

    def resolve(self, name: str, device: torch.device, *, argument: str | None = None,
                **context) -> tuple[str, T]:
        """The backend to run for ``name`` on ``device``: ``(name, entry)``, ``"auto"`` resolved.

        ``context`` goes to the auto rule only (shapes, dtypes: whatever the op's rule reads).
        Raises ValueError for a name outside :meth:`choices`, RuntimeError for one that cannot run.
        """
        argument = argument or self.argument
        self.check(name, argument)
        device = torch.device(device)
        if exporting():
            if self.export_safe is None:
                raise NoExportForm(f"{argument} has no export-safe {self.kind} (registered: {self.names()})")
            return self.export_safe, super().get(self.export_safe)
        if name == AUTO:
            name = self._auto(device, **context)
        ok, reason = self.available(name, device)
        if not ok:
            raise RuntimeError(f"{argument} {name!r} is not available on {device}: {reason}")
        return name, super().get(name)
