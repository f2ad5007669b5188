"""Components through entry points, and which distribution supplied each component.

Every registry with an entry-point group (`benchmark.datasets`, `benchmark.models`,
`benchmark.defenses`, `benchmark.attack_models`, `benchmark.encoders`,
`benchmark.distances`, `benchmark.captioners`) is filled from that group, built-ins
and plugins alike: this project's own `pyproject.toml` declares its built-ins there,
and a plugin is another installed distribution that declares its own, e.g.::

    [project.entry-points."benchmark.defenses"]
    weight_decay = "mia_weight_decay"

The entry point's name is the component's registry name and its value is the
module (or an object in it) whose import registers the component with the usual
decorator (`@register_defense("weight_decay")`). Entry points are imported lazily,
on the registry's first lookup or listing, and each plugin import is guarded: a
broken plugin nobody asked for is a warning naming its distribution, a requested
one is an error (`benchmark.kernel.errors.PluginError`). A built-in (an entry point
of this project's own distribution) that fails to load is always an error.
`BENCHMARK_DISABLE_PLUGINS=1` turns off third-party plugins, never the built-ins, for
reproducible runs that must not depend on what else is installed.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import lru_cache
from importlib import metadata
from typing import Any

from benchmark.kernel.errors import PluginError
from benchmark.kernel.version import __version__

BUILTIN_PACKAGES = ("benchmark", "defenses", "attacks", "leaderboard", "builtin")
DISTRIBUTION = "diffusion-mia-bench"
DISABLE_ENV = "BENCHMARK_DISABLE_PLUGINS"

log = logging.getLogger(__name__)

# Top-level module of each plugin loaded through an entry point -> "dist==version".
_PLUGIN_DISTRIBUTIONS: dict[str, str] = {}


class PluginWarning(UserWarning):
    """An installed plugin nobody asked for could not be loaded and was skipped."""


def plugins_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _distribution_label(dist: Any) -> str:
    if dist is None:
        return "an unknown distribution"
    return f"{dist.metadata['Name']}=={dist.version}"


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def is_builtin(ep: metadata.EntryPoint) -> bool:
    """Whether `ep` is declared by this project's own distribution (a built-in component)."""
    dist = getattr(ep, "dist", None)
    if dist is None:  # no distribution attached: fall back to where the module lives
        return ep.module.split(".")[0] in BUILTIN_PACKAGES
    return _normalized(dist.metadata["Name"]) == _normalized(DISTRIBUTION)


def builtin_entry_points(group: str) -> list[str]:
    """Names of the built-in components this project's installed metadata declares in `group`."""
    return sorted(ep.name for ep in metadata.entry_points(group=group) if is_builtin(ep))


def load_entry_points(registry: Any, group: str, *, requested: str | None = None) -> dict[str, str]:
    """Import every entry point of `group`; return {name: failure message} for plugins that failed.

    Built-ins (entry points of this project's distribution) are always loaded, and one
    that fails raises. Third-party failures are warnings (`PluginWarning`, naming the
    distribution), except for `requested`: the registry raises `PluginError` for that
    one instead. With `BENCHMARK_DISABLE_PLUGINS` set, third-party entry points are skipped.

    Args:
        registry: the registry the entry points register into (checked afterwards).
        group: entry-point group, e.g. "benchmark.defenses".
        requested: the name the caller is looking up, if any.

    Raises:
        PluginError: a built-in failed to load (a bug or a broken install, never skipped).
    """
    disabled = plugins_disabled()
    failures: dict[str, str] = {}
    skipped = 0
    for ep in metadata.entry_points(group=group):
        builtin = is_builtin(ep)
        if disabled and not builtin:
            skipped += 1
            continue
        label = _distribution_label(getattr(ep, "dist", None))
        if not builtin:
            _PLUGIN_DISTRIBUTIONS.setdefault(ep.module.split(".")[0], label)
        try:
            ep.load()
            if ep.name not in registry._entries:
                raise LookupError(f"importing {ep.value!r} registered no {registry.kind} named {ep.name!r}")
        except Exception as exc:  # any failure in third-party code is contained here
            message = (
                f"{registry.kind} plugin {ep.name!r} from distribution {label} "
                f"(entry point {group}: {ep.value}) failed to load: {type(exc).__name__}: {exc}"
            )
            if builtin:
                raise PluginError(
                    f"built-in {registry.kind} {ep.name!r} (entry point {group}: {ep.value}) failed to load: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            failures[ep.name] = message
            if ep.name != requested:
                warnings.warn(
                    f"{message}; skipped. Fix or uninstall {label}, or set {DISABLE_ENV}=1.",
                    PluginWarning,
                    stacklevel=2,
                )
    if skipped:
        log.info("%d plugin(s) of %s not loaded: disabled by %s", skipped, group, DISABLE_ENV)
    return failures


@lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _module_origin(module: str) -> str:
    top = module.split(".")[0]
    if top in BUILTIN_PACKAGES:
        return f"{DISTRIBUTION}=={__version__}"
    if top in _PLUGIN_DISTRIBUTIONS:
        return _PLUGIN_DISTRIBUTIONS[top]
    for dist in _packages_distributions().get(top, []):
        try:
            return f"{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return module  # registered from a script or a test: the module is all we know


def component_origin(registry: Any, name: str) -> str:
    """`distribution==version` for the package that registered `name`.

    Preset names (`dpsgd.eps8`) resolve to their component (`dpsgd`), and composed
    names (`dpsgd+lora`) list each distinct origin once, joined by " + ".
    """
    origins: list[str] = []
    for part in name.split("+"):
        origin = _module_origin(registry.origin(_component_name(registry, part.strip())))
        if origin not in origins:
            origins.append(origin)
    return " + ".join(origins)


def _component_name(registry: Any, name: str) -> str:
    """`name` itself if registered, else the component of a `name.tag` preset."""
    candidate = name
    while candidate not in registry and "." in candidate:
        candidate = candidate.rsplit(".", 1)[0]
    return candidate if candidate in registry else name
