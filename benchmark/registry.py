"""One generic registry for every pluggable kind (datasets, defenses, attack models, encoders)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message says what exists."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> component, filled by decorators next to each definition.

    A duplicate name is an error (timm only warns, and a silent override is how a
    benchmark ends up measuring the wrong defense).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, *, origin: str = "builtin") -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, origin=origin)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, origin: str = "builtin") -> None:
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"invalid {self.kind} name {name!r}: use letters, digits, '_', '-' or '.'")
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} {name!r}: already registered by {self._origins[name]}; pick another name"
            )
        self._entries[name] = obj
        self._origins[name] = origin

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        available = ", ".join(sorted(self._entries)) or "(none)"
        close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} available: {available}"

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
