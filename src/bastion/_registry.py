"""A small name -> factory registry shared by datasets, models, attacks and defenses.

The registries drive the CLI choices, `bastion list` and the parametrized tests, so adding a
component is one decorator away from being listed, tested and reachable from the command line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps lower-case names to objects (usually factories) with a one-line summary each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._summaries: dict[str, str] = {}

    def register(self, name: str, summary: str | None = None) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._summaries[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            valid = ", ".join(self.names())
            near = difflib.get_close_matches(key, self.names(), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {valid}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def summary(self, name: str) -> str:
        return self._summaries[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
