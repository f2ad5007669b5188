"""The import layers: kernel <- pipeline <- attacks, defenses <- applications, and no cycles.

`python tests/test_layers.py` prints the graph between the layers and any cycle, so
anyone can look at the structure these tests hold the code to.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "attacks", "defenses", "leaderboard")

# Each layer may import the layers listed for it (and itself), nothing else of the project.
ALLOWED: dict[str, set[str]] = {
    "benchmark": {"benchmark.kernel"},  # the top package only records the version
    "benchmark.kernel": set(),
    "benchmark.pipeline": {"benchmark.kernel"},
    "attacks": {"benchmark.kernel", "benchmark.pipeline"},
    "defenses": {"benchmark.kernel", "benchmark.pipeline"},
    "benchmark.app": {"benchmark.kernel", "benchmark.pipeline", "attacks", "defenses"},
    "leaderboard": {"benchmark.kernel", "benchmark.pipeline"},
}


def layer_of(module: str) -> str:
    """The layer a module belongs to: `benchmark.<layer>` inside benchmark/, else its top package."""
    parts = module.split(".")
    if parts[0] == "benchmark" and len(parts) > 1 and parts[1] in ("kernel", "pipeline", "app"):
        return ".".join(parts[:2])
    if parts[0] == "benchmark" and len(parts) > 1 and parts[1] == "__main__":
        return "benchmark.app"
    return parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if "reference" not in p.relative_to(ROOT).parts
    }


def first_party_imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every first-party import."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inner.update(id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                names = [f"{base}.{node.module}" if node.module else base]
            else:
                names = [node.module or ""]
            # `from leaderboard import plots` imports the module leaderboard.plots.
            names += [f"{names[0]}.{alias.name}" for alias in node.names]
        found += [(name, id(node) in inner) for name in names if name.split(".")[0] in PACKAGES]
    return found


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> first-party modules it imports, [(module, import) made inside a function])."""
    mods = sources()
    edges: dict[str, set[str]] = defaultdict(set)
    inner = []
    for module, path in mods.items():
        for name, in_function in first_party_imports(path, module):
            target = name
            while target not in mods and "." in target:
                target = target.rpartition(".")[0]
            if target != module and target in mods:
                edges[module].add(target)
            if in_function and name in mods:
                inner.append((module, name))
    return edges, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted({*edges, *(w for ws in edges.values() for w in ws)}):
        if v not in index:
            visit(v)
    return found


def layer_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for a, targets in edges.items():
        for b in targets:
            if layer_of(a) != layer_of(b):
                out[layer_of(a)].add(layer_of(b))
    return out


EDGES, INNER = graph()


def test_every_module_belongs_to_a_known_layer() -> None:
    assert {layer_of(m) for m in sources()} <= set(ALLOWED)


def test_kernel_imports_nothing_of_the_project() -> None:
    offending = {
        m: sorted(t)
        for m, t in EDGES.items()
        if layer_of(m) == "benchmark.kernel" and any(layer_of(x) != "benchmark.kernel" for x in t)
    }
    assert not offending, offending


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_the_layers_below(layer: str) -> None:
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in EDGES.items()
        if layer_of(m) == layer
        for t in targets
        if layer_of(t) != layer and layer_of(t) not in ALLOWED[layer]
    )
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer])}: {bad}"


def test_no_import_cycles_between_modules() -> None:
    assert not cycles(EDGES), cycles(EDGES)


def test_no_import_cycles_between_layers() -> None:
    assert not cycles(layer_edges(EDGES))


def test_no_first_party_imports_inside_functions() -> None:
    assert not INNER, f"first-party imports inside functions (hoist them; only optional dependencies may hide): {INNER}"


def test_checks_catch_a_cycle_and_a_layer_violation() -> None:
    """The checks above must be able to fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("benchmark.app.runner") == "benchmark.app"
    assert layer_of("defenses.dpsgd") == "defenses"
    assert "benchmark.app" not in ALLOWED["defenses"]
    edges = {"defenses.x": {"benchmark.app.config"}}
    assert layer_edges(edges) == {"defenses": {"benchmark.app"}}


if __name__ == "__main__":  # pragma: no cover
    print("layer graph (importer -> imported):")
    for layer, targets in sorted(layer_edges(EDGES).items()):
        print(f"  {layer} -> {', '.join(sorted(targets))}")
    print(f"module cycles: {cycles(EDGES) or 'none'}")
    print(f"layer cycles: {cycles(layer_edges(EDGES)) or 'none'}")
    print(f"first-party imports inside functions: {len(INNER)}")
    for module, name in INNER:
        print(f"  {module}: {name}")
