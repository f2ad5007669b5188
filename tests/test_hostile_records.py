"""Hostile records and results folders: each reader skips the bad item with a reason and goes on.

The three readers of a results folder (the leaderboard build, the suite's scan of
finished cells, `reproduce`) share one reader, `read_record`, for plain and
compacted (`*.json.xz`) records alike. For every crafted
item below the leaderboard is still built from the good records with the item
listed as skipped, the suite does not count it (and does not hang), and
`reproduce` exits 2 with one line naming the problem, without a traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from benchmark.app.cli import main as benchmark_main
from benchmark.app.config import profile
from benchmark.app.suite import cell_key, finished_cells
from benchmark.pipeline.records import (
    MAX_NESTING,
    MAX_RECORD_BYTES,
    RecordError,
    ResultRecord,
    check_consistency,
    compress,
    encode,
    validate,
)
from leaderboard.build import build, escape
from tests.factories import make_record

# Generous for a shared CPU; a FIFO read by a blocking open would never return.
TIMEOUT_S = 120.0
MATHTEXT = r"$\\frac{a}{b}$"  # matplotlib's mathtext parser rejects it: it used to abort the whole build


def _config(seed: int, **changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps(profile("micro").replace(defense="none", seed=seed).to_dict(), default=str)) | changes


def _record(seed: int, **changes: Any) -> ResultRecord:
    return make_record(defense="none", seed=seed, config=_config(seed), **changes)


def _data(seed: int = 5) -> dict[str, Any]:
    return json.loads(json.dumps(_record(seed).to_dict()))


def _put(folder: Path, name: str, text: str) -> Path:
    path = folder / "scenes" / "I" / "none" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _put_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / "scenes" / "I" / "none" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`, failing the test (not hanging it) if it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------- the crafted items


def _forged_auc(folder: Path) -> Path:
    data = _data()
    data["privacy"]["auc"] = round(1.0 - data["privacy"]["auc"] / 2, 3)
    return _put(folder, "forged-auc.json", encode(data))


def _forged_tpr(folder: Path) -> Path:
    data = _data()
    data["privacy"]["tpr_at_fpr"][0]["tpr"] = 0.9
    return _put(folder, "forged-tpr.json", encode(data))


def _nan(folder: Path) -> Path:
    data = _data()
    data["privacy"]["auc"] = float("nan")
    text = json.dumps(data)  # json writes NaN, and json.loads reads it back
    assert "NaN" in text and json.loads(text)
    return _put(folder, "nan.json", text)


def _deep_json(folder: Path) -> Path:
    depth = 200_000  # past the interpreter's recursion limit: json.loads raises RecursionError
    return _put(folder, "deep.json", "[" * depth + "]" * depth)


def _deep_details(folder: Path) -> Path:
    data = _data()
    nested: Any = "bottom"
    for _ in range(MAX_NESTING + 10):
        nested = {"x": nested}
    data["components"]["defense"]["details"]["nested"] = nested
    return _put(folder, "deep-details.json", json.dumps(data))


def _oversized(folder: Path) -> Path:
    path = _put(folder, "huge.json", "")
    with path.open("r+b") as handle:
        handle.truncate(MAX_RECORD_BYTES + 1)  # sparse: quick to make, refused before reading
    return path


def _fifo(folder: Path) -> Path:
    path = folder / "scenes" / "I" / "none" / "fifo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _dev_zero(folder: Path) -> Path:
    path = folder / "scenes" / "I" / "none" / "zero.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to("/dev/zero")
    return path


def _truncated(folder: Path) -> Path:
    text = encode(_data())
    return _put(folder, "truncated.json", text[: len(text) // 2])


def _packed() -> bytes:
    return compress(encode(_data()).encode())


def _xz_truncated(folder: Path) -> Path:
    packed = _packed()
    return _put_bytes(folder, "truncated.json.xz", packed[: len(packed) // 2])


def _xz_corrupt(folder: Path) -> Path:
    packed = bytearray(_packed())
    packed[len(packed) // 2] ^= 0xFF  # xz checks a CRC64 of the whole record
    return _put_bytes(folder, "corrupt.json.xz", bytes(packed))


def _xz_not_xz(folder: Path) -> Path:
    return _put(folder, "plain.json.xz", encode(_data()))


def _xz_trailing(folder: Path) -> Path:
    return _put_bytes(folder, "trailing.json.xz", _packed() + b"more")


@lru_cache(maxsize=1)
def _bomb() -> bytes:
    # 16 MiB of spaces pack into a few KB: the reader must stop at the limit, not inflate it all.
    return compress(b"{" + b" " * MAX_RECORD_BYTES + b"}")


def _xz_bomb(folder: Path) -> Path:
    return _put_bytes(folder, "bomb.json.xz", _bomb())


def _wrong_schema(folder: Path) -> Path:
    data = _data()
    data["schema_version"] = 3
    return _put(folder, "future.json", encode(data))


# name: (make the item, what the reason says)
BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "forged AUC": (_forged_auc, "field privacy/auc is stored as"),
    "forged TPR": (_forged_tpr, "field privacy/tpr_at_fpr/0/tpr is stored as 0.9 but its per-query scores give"),
    "NaN": (_nan, "field privacy/auc: NaN or infinite numbers are not allowed"),
    "deeply nested JSON": (_deep_json, f"nested deeper than {MAX_NESTING} levels"),
    "deeply nested details": (_deep_details, f"nested deeper than {MAX_NESTING} levels"),
    "oversized": (_oversized, f"{MAX_RECORD_BYTES + 1} bytes, over the {MAX_RECORD_BYTES}-byte limit"),
    "FIFO": (_fifo, "not a regular file"),
    "symlink to /dev/zero": (_dev_zero, "not a regular file"),
    "truncated JSON": (_truncated, "not valid JSON"),
    "wrong schema version": (_wrong_schema, "schema_version 3 is not supported"),
    "truncated xz": (_xz_truncated, "the compressed record is truncated"),
    "corrupt xz": (_xz_corrupt, "not a readable xz-compressed record"),
    "plain JSON named .json.xz": (_xz_not_xz, "not a readable xz-compressed record"),
    "bytes after the xz stream": (_xz_trailing, "bytes after the end of the compressed record"),
    "xz bomb": (_xz_bomb, f"over the {MAX_RECORD_BYTES}-byte limit for a record once decompressed"),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two good records (seeds 0 and 1 of the undefended cell), one plain and one compacted."""
    results = tmp_path / "results"
    plain, packed = _record(0), _record(1)
    _put(results, f"{plain.run_id}.json", encode(plain.to_dict()))
    _put_bytes(results, f"{packed.run_id}.json.xz", compress(encode(packed.to_dict()).encode()))
    return results


GOOD_KEYS = {cell_key(_config(0)), cell_key(_config(1))}


@pytest.mark.parametrize("case", list(BAD))
def test_leaderboard_skips_the_item_and_builds_the_rest(case: str, folder: Path) -> None:
    make, reason = BAD[case]
    rel = make(folder).relative_to(folder).as_posix()
    board = _within(TIMEOUT_S, lambda: build(folder, plots=True))
    assert [s.path for s in board.skipped] == [rel]
    assert reason in board.skipped[0].reason and board.skipped[0].reason.startswith(rel)
    assert sorted(e.seed for e in board.entries) == [0, 1]
    assert f"| {rel} |" in board.markdown.split("## Skipped files")[1]
    assert any(name.startswith("leaderboard_plots/roc-") for name in board.plots)


@pytest.mark.parametrize("case", list(BAD))
def test_suite_does_not_count_the_item(case: str, folder: Path) -> None:
    make, _ = BAD[case]
    make(folder)
    assert _within(TIMEOUT_S, lambda: finished_cells(folder)) == GOOD_KEYS


@pytest.mark.parametrize("case", list(BAD))
def test_reproduce_refuses_the_item_in_one_line(
    case: str, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make, reason = BAD[case]
    path = make(folder)
    monkeypatch.setenv("COLUMNS", "1000")  # rich would wrap the line at 80 columns
    assert _within(TIMEOUT_S, lambda: benchmark_main(["reproduce", str(path), "--quiet"])) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path}") and reason in lines[0]
    assert "Traceback" not in captured.err + captured.out


# ---------------------------------------------------------------- names that matplotlib would interpret


def _mathtext_defense(folder: Path) -> Path:
    record = make_record(defense=MATHTEXT, seed=2, config=_config(2, defense=MATHTEXT), run_id="mathtext-defense")
    return _put(folder, "mathtext-defense.json", encode(record.to_dict()))


def _mathtext_dataset(folder: Path) -> Path:
    record = make_record(defense="none", seed=2, config=_config(2, dataset=MATHTEXT))
    components = {**record.components, "dataset": dataclasses.replace(record.components["dataset"], name=MATHTEXT)}
    record = dataclasses.replace(record, components=components)
    return _put(folder, "mathtext-dataset.json", encode(record.to_dict()))


NAMES = {"defense": _mathtext_defense, "dataset": _mathtext_dataset}


@pytest.mark.parametrize("where", list(NAMES))
def test_mathtext_in_a_name_is_drawn_verbatim(where: str, folder: Path) -> None:
    path = NAMES[where](folder)
    board = build(folder, plots=True)
    assert board.skipped == []
    assert sorted(e.seed for e in board.entries) == [0, 1, 2]
    assert escape(MATHTEXT) in board.markdown
    roc_plots = [name for name in board.plots if name.startswith("leaderboard_plots/roc-")]
    trade_plots = [name for name in board.plots if name.startswith("leaderboard_plots/tradeoff-")]
    assert len(roc_plots) == (2 if where == "dataset" else 1) and trade_plots
    # A valid record: the suite counts its cell.
    stored = json.loads(path.read_text())["config"]
    assert finished_cells(folder) == GOOD_KEYS | {cell_key(stored)}


@pytest.mark.parametrize("where", list(NAMES))
def test_reproduce_names_the_missing_component(
    where: str, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = NAMES[where](folder)
    monkeypatch.setenv("COLUMNS", "1000")
    assert benchmark_main(["reproduce", str(path), "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and repr(MATHTEXT) in lines[0], captured.err
    assert "Traceback" not in captured.err


# ---------------------------------------------------------------- consistency


def test_a_record_whose_auc_disagrees_with_its_scores_is_refused(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _record(5)
    check_consistency(record)  # the factory's records follow from their scores
    forged = dataclasses.replace(record, privacy=dataclasses.replace(record.privacy, auc=record.privacy.auc - 0.1))
    data = forged.to_dict()
    validate(copy.deepcopy(data))  # the schema alone cannot see it
    message = rf"forged: field privacy/auc is stored as {forged.privacy.auc!r} but its per-query scores give "
    with pytest.raises(RecordError, match=message.replace(".", r"\.") + r"0\.8.*contradicts itself"):
        ResultRecord.from_dict(data, source="forged")

    path = _put(folder, "forged.json", encode(data))
    board = build(folder, plots=False)
    assert [s.path for s in board.skipped] == ["scenes/I/none/forged.json"]
    assert "field privacy/auc" in board.skipped[0].reason
    assert sorted(e.seed for e in board.entries) == [0, 1]

    monkeypatch.setenv("COLUMNS", "1000")
    assert benchmark_main(["reproduce", str(path), "--quiet"]) == 2
    assert "field privacy/auc is stored as" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda r: {"privacy": dataclasses.replace(r.privacy, balanced_accuracy=0.99)}, "privacy/balanced_accuracy"),
        (lambda r: {"privacy": dataclasses.replace(r.privacy, balanced_accuracy=None)}, "privacy/balanced_accuracy"),
        (lambda r: {"privacy": dataclasses.replace(r.privacy, n_members=3)}, "privacy/n_members"),
        (
            lambda r: {
                "privacy": dataclasses.replace(
                    r.privacy,
                    tpr_at_fpr=(
                        dataclasses.replace(r.privacy.tpr_at_fpr[0], threshold=-1.0),
                        *r.privacy.tpr_at_fpr[1:],
                    ),
                )
            },
            "privacy/tpr_at_fpr/0/threshold",
        ),
        (lambda r: {"control": dataclasses.replace(r.privacy, n_nonmembers=3, auc=0.5)}, "control/n_nonmembers"),
        (lambda r: {"baseline": dataclasses.replace(r.privacy, n_members=1)}, "baseline/n_members"),
        (
            lambda r: {"attack": dataclasses.replace(r.attack, predictions=r.attack.predictions[:-1])},
            "per-query lists differ in length",
        ),
    ],
)
def test_every_recomputable_figure_is_checked(change: Callable[[ResultRecord], dict[str, Any]], where: str) -> None:
    record = _record(5)
    bad = dataclasses.replace(record, **change(record))
    with pytest.raises(RecordError, match=where):
        ResultRecord.from_dict(bad.to_dict())


def test_a_difference_within_the_tolerance_is_accepted() -> None:
    record = _record(5)
    close = dataclasses.replace(record, privacy=dataclasses.replace(record.privacy, auc=record.privacy.auc + 1e-12))
    assert ResultRecord.from_dict(close.to_dict()).privacy.auc == close.privacy.auc
