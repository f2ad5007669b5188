"""Content-addressed cache for expensive artefacts (base models, shadow models).

An entry is a folder named by the hash of everything that produced it. It is
built in a temporary folder and renamed into place, so an interrupted build
leaves nothing behind. Its marker file lists the sha256 of every file it holds;
an entry whose files differ from that list (a flipped byte in a weights file,
reordered rows in a score array) or that fails to load is rebuilt with a
warning, never trusted, and the rebuild is reported to whoever listens
(`rebuild_log`), so a run can say so in its record.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmark.kernel.errors import CacheError
from benchmark.kernel.leftovers import sweep, temp_prefix

log = logging.getLogger(__name__)
T = TypeVar("T")
CACHE_ENV = "BENCHMARK_CACHE_DIR"
COMPLETE_MARKER = "cache-entry.json"
STAGING_TAG = "stage"
_READ_CHUNK = 1 << 20


class CacheIntegrityWarning(UserWarning):
    """A cache entry did not hold what was written into it, and was rebuilt."""


_REBUILDS: ContextVar[list[str] | None] = ContextVar("cache_rebuilds", default=None)


@contextmanager
def rebuild_log() -> Iterator[list[str]]:
    """Collect a message for every cache entry rebuilt inside the block because it failed its check."""
    rebuilt: list[str] = []
    token = _REBUILDS.set(rebuilt)
    try:
        yield rebuilt
    finally:
        _REBUILDS.reset(token)


def _report_rebuild(message: str) -> None:
    log.warning(message)
    warnings.warn(message, CacheIntegrityWarning, stacklevel=3)
    listening = _REBUILDS.get()
    if listening is not None:
        listening.append(message)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_manifest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under `folder`, the marker excepted."""
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.is_symlink() and path.name != COMPLETE_MARKER
    }


def check_entry(entry: Path) -> str | None:
    """Why `entry` cannot be trusted, or None when its files are exactly those its marker lists."""
    try:
        expected = json.loads((entry / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"its marker is unreadable ({exc})"
    if not isinstance(expected, dict):
        return "it has no content manifest (written by an older version)"
    actual = content_manifest(entry)
    if actual == expected:
        return None
    changed = sorted(set(actual) ^ set(expected) | {k for k in set(actual) & set(expected) if actual[k] != expected[k]})
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"{len(changed)} file(s) differ from what was written: {shown}"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "diffusion-mia-bench"


def cache_key(inputs: dict[str, object]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def entry_path(cache_dir: Path, kind: str, inputs: dict[str, object]) -> Path:
    """The folder of the entry for `inputs`, whether or not it exists yet."""
    return Path(cache_dir) / kind / cache_key(inputs)


def has_entry(entry: Path) -> bool:
    """Whether `entry` is complete and holds exactly what its marker lists, without loading or building it.

    `cached` would use such an entry unless it then failed to load.
    """
    return (entry / COMPLETE_MARKER).is_file() and check_entry(entry) is None


def entry_digest(entry: Path) -> str | None:
    """A digest of the files `entry` holds, as its marker lists them; None where it has no complete marker.

    It names what was built, not what it was built from: work keyed by it is not reused for
    an entry rebuilt with other contents. Reads the marker only; `has_entry` checks the files.
    """
    try:
        files = json.loads((entry / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return cache_key({"files": files}) if isinstance(files, dict) else None


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
    entry = entry_path(cache_dir, kind, inputs)
    key = entry.name
    if (entry / COMPLETE_MARKER).is_file():
        problem = check_entry(entry)
        if problem is None:
            try:
                return load(entry), True, entry
            except Exception as exc:  # any failure to load means the entry cannot be trusted
                problem = f"it failed to load ({type(exc).__name__}: {exc})"
        _report_rebuild(f"cache entry {kind}/{key} was rebuilt: {problem}")
        shutil.rmtree(entry, ignore_errors=True)
    elif entry.exists():
        shutil.rmtree(entry, ignore_errors=True)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # Staging folders of builds killed before they finished (SIGKILL skips every cleanup).
        sweep(entry.parent, STAGING_TAG)
        staging = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(STAGING_TAG)}{key}-", dir=entry.parent))
    except OSError as exc:
        raise _unwritable(cache_dir, exc) from None
    try:
        build(staging)
        marker = {"kind": kind, "inputs": inputs, "files": content_manifest(staging)}
        (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
        try:
            os.replace(staging, entry)
        except OSError:
            # Another process finished the same entry first; theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in _FULL_OR_READ_ONLY:
            raise _unwritable(cache_dir, exc) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load(entry), False, entry


# A build that fails with these failed for want of disk, not for a bug: say which folder and what to do.
_FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _unwritable(cache_dir: Path, exc: OSError) -> CacheError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there, or pass another --cache-dir (or set BENCHMARK_CACHE_DIR)"
    else:
        fix = f"pass a writable folder with --cache-dir (or set {CACHE_ENV})"
    return CacheError(f"cache folder {cache_dir} cannot be written ({exc.strerror or exc}); {fix}")


def check_cache_dir(cache_dir: Path) -> None:
    """Fail before any training if the cache folder cannot take entries (a file, read-only).

    Folders made only for the probe are removed again: a check leaves nothing behind.

    Raises:
        CacheError: naming the folder, `--cache-dir` and BENCHMARK_CACHE_DIR.
    """
    try:
        probe_writable(Path(cache_dir))
    except OSError as exc:
        raise _unwritable(Path(cache_dir), exc) from None


def probe_writable(folder: Path) -> None:
    """Make `folder` if needed and write a temporary file in it.

    Folders made only for the probe are removed again: a check leaves nothing behind.

    Raises:
        OSError: the folder cannot be made or written.
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".probe-", dir=folder):
            pass
    finally:
        for made in missing:  # innermost first
            try:
                made.rmdir()
            except OSError:
                pass


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
