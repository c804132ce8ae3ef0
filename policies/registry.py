"""A registry of strategies of one kind, by name (self-edit policies, rewards, ...).

A ``Registry`` is a read-only mapping name -> strategy (iteration, ``in`` and
indexing work as on a dict, in registration order), plus ``register``, which refuses
a name that is taken (as peft's ``register_peft_method`` does), and ``get``, which
names the known ones when a name is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T]):
    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind  # e.g. "selection policy", as the error messages say it
        self._entries: dict[str, T] = {}
        for name, obj in (entries or {}).items():
            self.register(name, obj)

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` and return it; without ``obj``, a decorator that
        does so. A name that is already registered is refused."""
        if obj is None:
            def decorate(o: T) -> T:
                return self.register(name, o)

            return decorate
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:  # type: ignore[override]  # no default: an unknown name is an error
        """The strategy registered as ``name``; a ValueError naming the known ones if
        there is none (unlike ``dict.get``, which would return None)."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

