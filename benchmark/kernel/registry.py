"""One generic registry for every pluggable kind (datasets, defenses, attack models, encoders)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from benchmark.kernel.errors import PluginError
from benchmark.kernel.plugins import load_entry_points, plugins_disabled

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

    def __init__(self, kind: str, *, entry_point_group: str | None = None) -> None:
        """
        Args:
            kind: what the registry holds, for messages ("defense").
            entry_point_group: if set, third-party packages that declare entry points in
                this group are imported on the first lookup or listing (see
                `benchmark.kernel.plugins.load_entry_points`).
        """
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._plugins_loaded = entry_point_group is None
        # Entry-point name -> why its plugin could not be loaded.
        self._plugin_failures: dict[str, str] = {}

    def _load_plugins(self, requested: str | None = None) -> None:
        if self._plugins_loaded:
            return
        # Set first: a plugin module that looks something up must not recurse.
        self._plugins_loaded = True
        assert self.entry_point_group is not None
        self._plugin_failures = load_entry_points(self, self.entry_point_group, requested=requested)

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
        """The component called `name`.

        Raises:
            RegistryError: unknown name (with the closest match and what exists).
            PluginError: `name` belongs to an installed plugin that failed to load.
        """
        self._load_plugins(requested=name)
        try:
            return self._entries[name]
        except KeyError:
            if name in self._plugin_failures:
                raise PluginError(self._plugin_failures[name]) from None
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        self._load_plugins()
        available = ", ".join(sorted(self._entries)) or "(none)"
        close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown {self.kind} {name!r}{hint} available: {available}"
        if self.entry_point_group is not None:
            if plugins_disabled():
                message += f" (plugins of group {self.entry_point_group!r} are disabled by BENCHMARK_DISABLE_PLUGINS)"
        return message

    def capability(self, name: str, attribute: str) -> Any:
        """An optional attribute of the entry `name`, e.g. its `check` hook or `needs_public_data` flag.

        Builders declare what they need as attributes, so callers can ask before
        building anything. None when the entry does not declare it.
        """
        return getattr(self.get(name), attribute, None)

    def check(self, name: str, request: object) -> None:
        """Run the entry's cheap `check(request)` hook, if it has one, before any expensive work.

        Raises:
            whatever the hook raises (ConfigError or ModelError naming the fix).
        """
        hook = self.capability(name, "check")
        if hook is not None:
            hook(request)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._entries[name]

    def plugin_failures(self) -> dict[str, str]:
        """Entry points of this registry's group that failed to load, with the reason."""
        self._load_plugins()
        return dict(self._plugin_failures)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)
