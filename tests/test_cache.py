"""The content-addressed artefact cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.kernel.cache import (
    CACHE_ENV,
    COMPLETE_MARKER,
    CacheIntegrityWarning,
    cache_key,
    cached,
    cached_arrays,
    default_cache_dir,
    file_sha256,
    rebuild_log,
)


class Builder:
    def __init__(self, payload: str = "artefact") -> None:
        self.payload = payload
        self.builds = 0
        self.loads = 0

    def build(self, folder: Path) -> None:
        self.builds += 1
        (folder / "data.txt").write_text(self.payload)

    def load(self, folder: Path) -> str:
        self.loads += 1
        return (folder / "data.txt").read_text()


def test_builds_once_then_hits(tmp_path: Path) -> None:
    builder = Builder()
    value, hit, entry = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit) == ("artefact", False)
    assert builder.builds == 1
    assert entry == tmp_path / "thing" / cache_key({"a": 1})
    marker = json.loads((entry / COMPLETE_MARKER).read_text())
    assert marker == {"kind": "thing", "inputs": {"a": 1}, "files": {"data.txt": file_sha256(entry / "data.txt")}}

    value, hit, entry2 = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit, entry2) == ("artefact", True, entry)
    assert builder.builds == 1 and builder.loads == 2
    assert sorted(p.name for p in (tmp_path / "thing").iterdir()) == [entry.name]


def test_different_inputs_get_different_entries(tmp_path: Path) -> None:
    builder = Builder()
    _, _, a = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    _, hit, b = cached(tmp_path, "thing", {"a": 2}, builder.build, builder.load)
    assert not hit and a != b and builder.builds == 2


def test_cache_key_is_order_independent_and_sensitive() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 1.5})
    assert cache_key({"p": Path("/x")}) == cache_key({"p": "/x"})


def test_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    builder = Builder()
    _, _, entry = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    (entry / "data.txt").unlink()  # the entry claims to be complete but cannot be loaded
    value, hit, entry2 = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit, entry2) == ("artefact", False, entry)
    assert builder.builds == 2
    value, hit, _ = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit) == ("artefact", True)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda e: (e / "data.txt").write_text("artefacT"), id="same-size edit"),
        pytest.param(lambda e: (e / "extra.bin").write_bytes(b"x"), id="file added"),
        pytest.param(lambda e: (e / "data.txt").unlink(), id="file removed"),
        pytest.param(
            lambda e: (e / COMPLETE_MARKER).write_text(json.dumps({"kind": "thing", "inputs": {"a": 1}})),
            id="marker without manifest",
        ),
    ],
)
def test_tampered_entry_is_detected_rebuilt_and_reported(tmp_path: Path, tamper) -> None:  # type: ignore[no-untyped-def]
    builder = Builder()
    _, _, entry = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    tamper(entry)
    with rebuild_log() as rebuilt, pytest.warns(CacheIntegrityWarning, match="was rebuilt"):
        value, hit, _ = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit, builder.builds) == ("artefact", False, 2)
    assert len(rebuilt) == 1 and f"thing/{entry.name}" in rebuilt[0]
    # The rebuilt entry is trusted again, silently.
    with rebuild_log() as rebuilt_again:
        assert cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)[:2] == ("artefact", True)
    assert rebuilt_again == []


def test_reordered_rows_of_cached_arrays_are_detected(tmp_path: Path) -> None:
    """Reordered score rows are still a valid array; only the content hash tells."""
    calls = []

    def compute() -> tuple[dict[str, np.ndarray], dict[str, object]]:
        calls.append(1)
        return {"scores": np.arange(12.0).reshape(4, 3)}, {"n": 4}

    arrays, meta = cached_arrays(tmp_path, "scores", {"q": 1}, compute)
    [entry] = (tmp_path / "scores").iterdir()
    np.save(entry / "scores.npy", arrays["scores"][::-1], allow_pickle=False)
    with pytest.warns(CacheIntegrityWarning):
        again, meta_again = cached_arrays(tmp_path, "scores", {"q": 1}, compute)
    assert len(calls) == 2 and np.array_equal(again["scores"], arrays["scores"]) and meta_again == meta == {"n": 4}


def test_entry_without_marker_is_rebuilt(tmp_path: Path) -> None:
    entry = tmp_path / "thing" / cache_key({"a": 1})
    entry.mkdir(parents=True)
    (entry / "data.txt").write_text("stale, never finished")
    builder = Builder()
    value, hit, _ = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit) == ("artefact", False)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    def build(folder: Path) -> None:
        (folder / "half-written.bin").write_bytes(b"x")
        raise error

    with pytest.raises(type(error)):
        cached(tmp_path, "thing", {"a": 1}, build, Builder().load)
    kind_dir = tmp_path / "thing"
    assert not kind_dir.exists() or list(kind_dir.iterdir()) == [], "no entry, no staging folder"
    # The next call builds from scratch and succeeds.
    builder = Builder()
    value, hit, _ = cached(tmp_path, "thing", {"a": 1}, builder.build, builder.load)
    assert (value, hit) == ("artefact", False)
    assert [p.name for p in kind_dir.iterdir()] == [cache_key({"a": 1})]


def test_default_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == (tmp_path / "c").resolve()
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "diffusion-mia-bench"


def test_preset_cache_dir_follows_env_set_after_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmark.app.config import RunConfig, profile

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "late"))
    assert RunConfig().cache_path == (tmp_path / "late").resolve()  # a fresh instance does follow it
    assert profile("micro").cache_path == (tmp_path / "late").resolve()
