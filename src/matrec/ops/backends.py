"""One contract for every op that has several implementations ("backends").

An op keeps its implementations in a :class:`BackendRegistry`. Every entry answers
``available(device) -> (ok, reason)``; the registry owns the op's ``"auto"`` rule. So the three
things a caller can get wrong are handled here, once, for every op:

- an unknown name: ``ValueError`` naming the argument and listing every choice, ``"auto"`` included;
- a backend whose package or device is missing: ``RuntimeError`` naming the argument, the backend
  and the reason (e.g. ``recurrence_backend='triton' is not available on cpu: triton is not
  importable ...``) instead of an ``ImportError`` from deep inside;
- ``"auto"``: the op's rule, given the device and whatever else the op passes as context.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

from ..registry import Registry

T = TypeVar("T")

AUTO = "auto"


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
    """

    def __init__(self, kind: str, *, argument: str | None = None,
                 auto: Callable[..., str] | None = None) -> None:
        super().__init__(kind, argument=argument)
        self._auto = auto

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
        if name == AUTO:
            name = self._auto(device, **context)
        ok, reason = self.available(name, device)
        if not ok:
            raise RuntimeError(f"{argument} {name!r} is not available on {device}: {reason}")
        return name, super().get(name)
