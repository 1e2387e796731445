"""A name -> object table, the one mechanism behind every "pick by name" choice in matrec.

Scan backends, state-matrix constructions, orthogonal maps, initialisations, mixers, models and
tasks are all looked up through a :class:`Registry`, so users extend matrec by registering, and an
unknown name always fails the same way: naming the argument and listing the valid choices.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar, overload

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind.

    Args:
        kind: what the entries are, for messages (e.g. ``"scan backend"``).
        argument: the user-facing argument that selects an entry (e.g. ``"backend"``).

    Example::

        ACTIVATIONS = Registry("activation", argument="nonlinearity")

        @ACTIVATIONS.register("tanh")
        def _tanh(x): return x.tanh()

        ACTIVATIONS.get("tanh")   # -> _tanh
        ACTIVATIONS.get("nope")   # ValueError: nonlinearity must be one of ['tanh'], got 'nope'
    """

    def __init__(self, kind: str, *, argument: str | None = None) -> None:
        self.kind = kind
        self.argument = argument or kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name, obj=None, *, overwrite=False):
        """Add ``obj`` under ``name``; without ``obj``, return a decorator that does."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty str, got {name!r}")

        def add(o: T) -> T:
            if name in self._items and not overwrite:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held (for tests and plug-ins that clean up after themselves)."""
        if name not in self._items:
            raise ValueError(f"{self.kind} {name!r} is not registered; registered: {self.names()}")
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"{self.argument} must be one of {self.names()}, got {name!r}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
