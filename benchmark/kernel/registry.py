"""One generic registry for every pluggable kind (datasets, models, defenses, attack models, encoders, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from benchmark.kernel.errors import PluginError
from benchmark.kernel.plugins import builtin_entry_points, load_entry_points, plugins_disabled

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
            entry_point_group: if set, the entry points of this group (the built-ins this
                project declares and those of third-party packages) are imported on the
                first lookup or listing (see `benchmark.kernel.plugins.load_entry_points`).
        """
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        # Name -> capabilities declared at registration (`check`, `needs_public_data`, ...).
        self._capabilities: dict[str, dict[str, Any]] = {}
        self._plugins_loaded = entry_point_group is None
        # Entry-point name -> why its plugin could not be loaded.
        self._plugin_failures: dict[str, str] = {}
        # A built-in that failed to load: raised again on every use, never half a registry.
        self._builtin_failure: PluginError | None = None

    def _load_plugins(self, requested: str | None = None) -> None:
        if self._builtin_failure is not None:
            raise PluginError(str(self._builtin_failure))
        if self._plugins_loaded:
            return
        # Set first: a plugin module that looks something up must not recurse.
        self._plugins_loaded = True
        assert self.entry_point_group is not None
        try:
            self._plugin_failures = load_entry_points(self, self.entry_point_group, requested=requested)
        except PluginError as exc:
            self._builtin_failure = exc
            raise

    def register(self, name: str, *, origin: str | None = None, **capabilities: Any) -> Callable[[T], T]:
        """Decorator: register the object under `name`.

        Args:
            name: registry name.
            origin: the registering module (default: the object's `__module__`), which
                `component_origin` maps to its distribution.
            capabilities: what callers may ask before building anything, e.g.
                `check=fn` (cheap validation of a request) or `needs_public_data=True`.
                A class can declare them as attributes instead.
        """

        def decorator(obj: T) -> T:
            self.add(name, obj, origin=origin or getattr(obj, "__module__", None) or "builtin", **capabilities)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, origin: str = "builtin", **capabilities: Any) -> None:
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"invalid {self.kind} name {name!r}: use letters, digits, '_', '-' or '.'")
        if name in self._entries:
            raise RegistryError(
                f"duplicate {self.kind} {name!r}: already registered by {self._origins[name]}; pick another name"
            )
        self._entries[name] = obj
        self._origins[name] = origin
        if capabilities:
            self._capabilities[name] = dict(capabilities)

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
            if not self._entries and not builtin_entry_points(self.entry_point_group):
                # Built-ins arrive through entry points too: a checkout that was never
                # installed (or installed before its pyproject.toml changed) has none.
                message += (
                    f" (nothing is installed in group {self.entry_point_group!r}; in a checkout of "
                    "diffusion-mia-bench, run `pip install -e .` to install its built-ins)"
                )
        return message

    def capability(self, name: str, attribute: str) -> Any:
        """An optional capability of the entry `name`, e.g. its `check` hook or `needs_public_data` flag.

        Builders declare what they need at registration (`register(name, check=...)`)
        or as attributes, so callers can ask before building anything. None when the
        entry does not declare it.
        """
        entry = self.get(name)
        declared = self._capabilities.get(name, {})
        return declared[attribute] if attribute in declared else getattr(entry, attribute, None)

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
