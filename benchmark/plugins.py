"""Which distribution supplied each component (recorded with every result)."""

from __future__ import annotations

from benchmark.registry import Registry

BUILTIN_PACKAGES = ("benchmark", "defenses", "attacks", "leaderboard", "builtin")
DISTRIBUTION = "diffusion-mia-bench"


def component_origin(registry: Registry[object], name: str) -> str:
    """`distribution==version` for the package that registered `name`."""
    origin = registry.origin(name)
    if origin.split(".")[0] in BUILTIN_PACKAGES:
        from benchmark import __version__

        return f"{DISTRIBUTION}=={__version__}"
    return origin
