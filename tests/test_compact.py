"""Compacted records (`*.json.xz`): the reader, `python -m benchmark compact`, and the suite's resume over them."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path
from typing import Any

import pytest

import benchmark.app.compact as compact_module
import benchmark.pipeline.records as records
from attacks.scenarios import Scenario
from benchmark.app.cli import main
from benchmark.app.compact import compact
from benchmark.app.config import profile
from benchmark.app.migrate import migrate
from benchmark.app.suite import SuiteSpec, cell_key, finished_cells, run_suite
from benchmark.pipeline.records import (
    COMPACT_SUFFIX,
    RecordError,
    compress,
    encode,
    load_record,
    read_record,
    record_files,
    write_record,
)
from leaderboard.build import build
from tests.factories import make_record

V1_FILE = Path(__file__).parent / "data" / "record_v1.json"


def _spec(results: Path) -> SuiteSpec:
    return SuiteSpec(
        config=profile("micro").replace(results_dir=results, cache_dir=results.parent / "cache"),
        defenses=("none",),
        scenarios=(Scenario.I, Scenario.III),
        attack_models=("threshold", "distribution"),
        seeds=(0,),
    )


def _write_cells(spec: SuiteSpec) -> list[Path]:
    """One valid record per cell of `spec`, each carrying its cell's configuration (as a run writes it)."""
    paths = []
    for unit in spec.units():
        for cell in spec.cells(unit):
            record = make_record(
                defense=cell.defense,
                seed=cell.seed,
                scenario=cell.scenario.value,
                attack_model=cell.attack_model,
                config=json.loads(json.dumps(cell.to_dict(), default=str)),
            )
            paths.append(write_record(record, spec.config.results_dir))
    return paths


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Four plain records (the cells of `_spec`)."""
    folder = tmp_path / "results"
    _write_cells(_spec(folder))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plain(snapshot: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot with every compacted file's name and bytes as the plain file it holds."""
    return {
        name.removesuffix(".xz"): lzma.decompress(data) if name.endswith(COMPACT_SUFFIX) else data
        for name, data in snapshot.items()
    }


# ---------------------------------------------------------------- the reader


def test_a_compacted_record_reads_as_its_plain_file(tmp_path: Path) -> None:
    plain = write_record(make_record(seed=3), tmp_path)
    packed = plain.with_name(plain.name + ".xz")
    packed.write_bytes(compress(plain.read_bytes()))
    assert load_record(packed) == load_record(plain)
    assert read_record(packed) == read_record(plain)
    # A standard xz stream: `xz -d` gives the plain file back.
    assert lzma.decompress(packed.read_bytes()) == plain.read_bytes()


def test_compression_is_deterministic() -> None:
    raw = encode(make_record(seed=4).to_dict()).encode()
    assert compress(raw) == compress(raw)


def test_a_stream_asking_for_more_memory_than_the_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "record.json.xz"
    path.write_bytes(compress(encode(make_record().to_dict()).encode()))  # preset 6: an 8 MiB dictionary
    monkeypatch.setattr(records, "XZ_MEMORY_LIMIT", 1024 * 1024)
    with pytest.raises(RecordError, match=rf"^{path}: not a readable xz-compressed record \(.*[Mm]emory"):
        load_record(path)


def test_record_files_lists_both_forms_once(results: Path) -> None:
    plain = sorted(results.rglob("*.json"))
    left_over = plain[0].with_name(plain[0].name + ".xz")  # as an interrupted `compact` leaves it
    left_over.write_bytes(compress(plain[0].read_bytes()))
    packed = plain[1].with_name(plain[1].name + ".xz")
    packed.write_bytes(compress(plain[1].read_bytes()))
    plain[1].unlink()
    (results / ".tmp-host-1-x.json.xz").write_bytes(b"a write in progress")
    (results / "folder.json").mkdir()
    assert record_files(results) == sorted(
        [plain[0], packed, *plain[2:]], key=lambda p: p.relative_to(results).as_posix()
    )


# ---------------------------------------------------------------- compact


def test_compact_keeps_every_record_byte_for_byte(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(results)
    board = build(results, plots=False)
    assert main(["compact", str(results)]) == 0
    after = _snapshot(results)
    assert all(name.endswith(COMPACT_SUFFIX) for name in after) and len(after) == len(before) == 4
    assert _plain(after) == before
    plain_bytes, packed_bytes = sum(map(len, before.values())), sum(map(len, after.values()))
    assert packed_bytes < plain_bytes / 2
    out = capsys.readouterr().err
    assert f"4 record(s) compacted, 0 already compact; {plain_bytes:,} bytes before, {packed_bytes:,} after" in out
    again = build(results, plots=False)
    assert again.markdown == board.markdown and not again.skipped
    assert len(again.entries) == len(board.entries) == 4


def test_compact_is_idempotent(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compact(results)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.rglob("*") if p.is_file()}
    report = compact(results)
    assert report.compacted == [] and len(report.already_compact) == 4
    assert report.bytes_before == report.bytes_after == sum(len(data) for data, _ in files.values())
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.rglob("*") if p.is_file()} == files


def test_an_invalid_file_stops_compaction_before_anything_is_written(results: Path) -> None:
    (results / "scenes" / "summary.json").write_text(json.dumps({"written": []}))
    before = _snapshot(results)
    with pytest.raises(RecordError, match=r"summary\.json: .*nothing was written"):
        compact(results)
    assert _snapshot(results) == before


def test_a_crash_between_writing_and_removing_loses_nothing(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(results)
    board = build(results, plots=False)
    done = finished_cells(results)

    def crash(folder: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compact_module, "_sync_folder", crash)
    with pytest.raises(KeyboardInterrupt):
        compact(results)
    monkeypatch.undo()
    # One record is now in both forms: every reader still sees it once.
    both = [n for n in _snapshot(results) if n.endswith(COMPACT_SUFFIX)]
    assert len(both) == 1 and both[0].removesuffix(".xz") in _snapshot(results)
    assert build(results, plots=False).markdown == board.markdown
    assert finished_cells(results) == done
    # A second run finishes the job.
    report = compact(results)
    assert len(report.compacted) == 4
    assert _plain(_snapshot(results)) == before


def test_a_failed_write_keeps_the_plain_record_and_leaves_no_temporary_file(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(results)

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", full_disk)
    with pytest.raises(RecordError, match="No space left on device"):
        compact(results)
    assert _snapshot(results) == before


def test_a_compacted_file_that_differs_from_its_plain_one_is_kept_with_it(results: Path) -> None:
    plain = sorted(results.rglob("*.json"))[0]
    other = sorted(results.rglob("*.json"))[1]
    clash = plain.with_name(plain.name + ".xz")
    clash.write_bytes(compress(other.read_bytes()))
    with pytest.raises(RecordError, match="does not read back as .*both are kept"):
        compact(results)
    assert plain.exists() and clash.exists()


def test_compact_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compact", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder of result records" in capsys.readouterr().err


# ---------------------------------------------------------------- the suite, migrate


def test_the_suite_resumes_over_compacted_records(results: Path) -> None:
    spec = _spec(results)
    every_cell = {cell_key(c) for u in spec.units() for c in spec.cells(u)}
    assert finished_cells(results) == every_cell
    compact(results)
    assert not list(results.rglob("*.json"))
    assert finished_cells(results) == every_cell

    calls: list[tuple[str, ...]] = []

    def run_matrix(config: Any, *, scenarios: Any, attack_models: Any, **_: Any) -> list[Any]:
        calls.append((config.defense, *(s.value for s in scenarios), *attack_models))
        return []

    report = run_suite(spec, show_progress=False, run_matrix=run_matrix)
    assert calls == [] and report.skipped == 4
    # A lost compacted record is a missing cell again.
    lost = next(p for p in results.rglob(f"*{COMPACT_SUFFIX}") if load_record(p)["attack"]["scenario"] == "III")
    lost_model = load_record(lost)["attack"]["attack_model"]
    lost.unlink()
    run_suite(spec, show_progress=False, run_matrix=run_matrix)
    assert calls == [("none", "III", lost_model)]


def test_migrate_upgrades_a_compacted_record_in_its_compacted_form(tmp_path: Path) -> None:
    path = tmp_path / "scenes" / "III" / "none" / f"v1{COMPACT_SUFFIX}"
    path.parent.mkdir(parents=True)
    path.write_bytes(compress(V1_FILE.read_bytes()))
    report = migrate(tmp_path)
    assert report.upgraded == [path] and [p.name for p in path.parent.iterdir()] == [path.name]
    assert read_record(path).schema_version == records.SCHEMA_VERSION
    assert migrate(tmp_path).current == [path]
