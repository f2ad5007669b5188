"""Content-addressed cache for expensive artefacts (base models, shadow models).

An entry is a folder named by the hash of everything that produced it. It is
built in a temporary folder and renamed into place, so an interrupted build
leaves nothing behind; an entry that fails to load is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")
CACHE_ENV = "BENCHMARK_CACHE_DIR"
COMPLETE_MARKER = "cache-entry.json"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "diffusion-mia-bench"


def cache_key(inputs: dict[str, object]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cached(
    cache_dir: Path,
    kind: str,
    inputs: dict[str, object],
    build: Callable[[Path], None],
    load: Callable[[Path], T],
) -> tuple[T, bool, Path]:
    """Load the entry for `inputs`, building it first if absent or unreadable.

    Returns:
        (loaded object, whether it came from the cache, entry folder)
    """
    key = cache_key(inputs)
    entry = cache_dir / kind / key
    if (entry / COMPLETE_MARKER).is_file():
        try:
            return load(entry), True, entry
        except Exception as exc:  # any failure to load means the entry cannot be trusted
            log.warning("cache entry %s is unreadable (%s); rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    elif entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
    try:
        build(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"kind": kind, "inputs": inputs}, indent=2, default=str))
        try:
            os.replace(staging, entry)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load(entry), False, entry


def cached_json(
    cache_dir: Path,
    kind: str,
    inputs: dict[str, object],
    compute: Callable[[], dict[str, Any]],
    *,
    filename: str = "value.json",
) -> dict[str, Any]:
    """A JSON object computed once per `inputs` and kept on disk."""

    def build(folder: Path) -> None:
        (folder / filename).write_text(json.dumps(compute()))

    value, _, _ = cached(cache_dir, kind, inputs, build, lambda folder: json.loads((folder / filename).read_text()))
    return value


def cached_arrays(
    cache_dir: Path,
    kind: str,
    inputs: dict[str, object],
    compute: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
    *,
    meta_name: str = "scored.json",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Named arrays (one .npy each, loaded without pickle) and a JSON object, computed once per `inputs`."""

    def build(folder: Path) -> None:
        arrays, meta = compute()
        for name, array in arrays.items():
            np.save(folder / f"{name}.npy", array, allow_pickle=False)
        (folder / meta_name).write_text(json.dumps({"arrays": sorted(arrays), **meta}))

    def load(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta = json.loads((folder / meta_name).read_text())
        names = meta.pop("arrays")
        return {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in names}, meta

    value, _, _ = cached(cache_dir, kind, inputs, build, load)
    return value
