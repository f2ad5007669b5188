"""The privacy regression gate (`python -m benchmark compare`, `assert_privacy_within`) on synthetic records."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmark.app.cli import main
from benchmark.app.compare import (
    IMPROVEMENT,
    NO_CHANGE,
    NOT_TESTED,
    REGRESSION,
    ComparisonReport,
    assert_privacy_within,
    compare,
)
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline import statistics as stats
from benchmark.pipeline.records import ResultRecord, write_record
from tests.factories import make_record

CELL = "scenes / I / none / pang-wang threshold"
SEEDS = (0, 1, 2)
FAST = ["--resamples", "400"]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tables at 80 columns wrap the cell names the assertions look for.
    monkeypatch.setenv("COLUMNS", "250")


def records(seeds: Sequence[int] = SEEDS, **figures: Any) -> list[ResultRecord]:
    return [make_record(seed=seed, **figures) for seed in seeds]


def folder(path: Path, recs: Sequence[ResultRecord]) -> Path:
    for record in recs:
        write_record(record, path)
    return path


def run_compare(capsys: pytest.CaptureFixture[str], new: Path, old: Path, *flags: str) -> tuple[int, str]:
    code = main(["compare", str(new), str(old), *FAST, *flags])
    return code, " ".join(capsys.readouterr().err.split())


def verdicts(path: Path) -> dict[str, str]:
    [cell] = json.loads(path.read_text())["cells"]
    return {m["metric"]: m["verdict"] for m in cell["metrics"]}


def test_identical_sets_show_no_significant_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    same = folder(tmp_path / "old", records())
    code, out = run_compare(capsys, same, same, "--json", str(tmp_path / "c.json"))
    assert code == 0
    assert "no significant change" in out and "regression(s)" not in out
    assert set(verdicts(tmp_path / "c.json").values()) == {NO_CHANGE}
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["cells"][0]["pairing"] == "paired by seed (0,1,2)" and not report["failed"]


def test_a_leakier_new_fails_naming_the_cell_and_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = folder(tmp_path / "new", records(auc=0.95, tpr1=0.5))
    old = folder(tmp_path / "old", records(auc=0.55, tpr1=0.05))
    code, out = run_compare(capsys, new, old, "--json", str(tmp_path / "c.json"))
    assert code == 1
    assert f"regression: {CELL}: attack AUC 0.550" in out and "-> 0.950" in out
    assert f"regression: {CELL}: TPR@1%FPR" in out
    found = verdicts(tmp_path / "c.json")
    assert found["attack AUC"] == found["TPR@1%FPR"] == REGRESSION
    auc = json.loads((tmp_path / "c.json").read_text())["cells"][0]["metrics"][0]
    assert auc["metric"] == "attack AUC" and auc["method"].startswith(stats.PAIRED)
    assert auc["change"] == pytest.approx(0.4, abs=1e-3)


def test_a_more_private_new_passes_as_an_improvement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = folder(tmp_path / "new", records(auc=0.55, tpr1=0.05))
    old = folder(tmp_path / "old", records(auc=0.95, tpr1=0.5))
    code, out = run_compare(capsys, new, old, "--json", str(tmp_path / "c.json"))
    assert code == 0 and "improvement" in out
    assert verdicts(tmp_path / "c.json")["attack AUC"] == IMPROVEMENT


def test_a_utility_regression_fails_unless_privacy_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = folder(tmp_path / "new", [make_record(seed=s, fid=20.0 + s, clip=20.0 - s) for s in SEEDS])
    old = folder(tmp_path / "old", [make_record(seed=s, fid=10.0 + s, clip=25.0 + s) for s in SEEDS])
    code, out = run_compare(capsys, new, old, "--json", str(tmp_path / "c.json"))
    assert code == 1
    assert f"regression: {CELL}: FID" in out and f"regression: {CELL}: CLIP score" in out
    found = verdicts(tmp_path / "c.json")
    assert found["FID"] == found["CLIP score"] == REGRESSION and found["attack AUC"] == NO_CHANGE
    code, out = run_compare(capsys, new, old, "--privacy-only")
    assert code == 0 and "no significant privacy regression" in out and "regression" in out


def test_seeds_that_do_not_pair_use_the_unpaired_tests(tmp_path: Path) -> None:
    new = folder(tmp_path / "new", [make_record(seed=s, auc=0.95, fid=20.0 + s) for s in (3, 4, 5)])
    old = folder(tmp_path / "old", [make_record(seed=s, auc=0.55, fid=10.0 + s) for s in SEEDS])
    report = compare(new, old, resamples=400)
    [cell] = report.cells
    methods = {m.metric: m.method for m in cell.metrics}
    assert cell.pairing.startswith("unpaired: other seeds")
    assert methods["attack AUC"].startswith(stats.UNPAIRED) and methods["FID"] == stats.WELCH_T
    assert report.failed


def test_one_record_a_side_tests_utility_by_its_own_intervals(tmp_path: Path) -> None:
    def with_interval(record: ResultRecord, fid: tuple[float, float]) -> ResultRecord:
        assert record.utility is not None
        utility = dataclasses.replace(record.utility, details={"intervals": {"fid": list(fid)}})
        return dataclasses.replace(record, utility=utility)

    new = folder(tmp_path / "new", [with_interval(make_record(fid=20.0), (19.0, 21.0))])
    old = folder(tmp_path / "old", [with_interval(make_record(fid=10.0), (9.0, 11.0))])
    [cell] = compare(new, old, resamples=400).cells
    fid, clip = (next(m for m in cell.metrics if m.metric == name) for name in ("FID", "CLIP score"))
    assert fid.method == stats.FROM_INTERVALS and fid.verdict == REGRESSION
    assert fid.new is not None and (fid.new.low, fid.new.high) == (19.0, 21.0)
    # No interval stored for the CLIP score: shown, not tested.
    assert clip.verdict == NOT_TESTED and clip.p_value is None and "not tested" in clip.method


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "NEW {tmp}/nowhere does not exist"),
        ("empty", "NEW {tmp}/empty: no result records (no *.json or *.json.xz)"),
        ("junk", "NEW {tmp}/junk: no result records (1 *.json / *.json.xz file(s), none a valid record"),
        ("mismatch", "nothing to compare: none of NEW's 1 cell(s)"),
        ("alpha", "--alpha must lie between 0 and 1"),
        ("json-folder", "--json {tmp} is a folder"),
        ("ignore-typo", "--ignore 'defence_args': no record has that setting; did you mean 'defense_args'?"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    old = folder(tmp_path / "old", records(config={"defense_args": []}))
    new = tmp_path / "new"
    flags: list[str] = []
    if setup == "missing":
        new = tmp_path / "nowhere"
    elif setup == "empty":
        new = tmp_path / "empty"
        new.mkdir()
    elif setup == "junk":
        new = tmp_path / "junk"
        new.mkdir()
        (new / "summary.json").write_text("{}")
    elif setup == "mismatch":
        folder(new, records(config={"defense_args": [["strength", "0.2"]]}))
    else:
        folder(new, records(config={"defense_args": []}))
        flags = {
            "alpha": ["--alpha", "1.5"],
            "json-folder": ["--json", str(tmp_path)],
            "ignore-typo": ["--ignore", "defence_args"],
        }[setup]
    code, out = run_compare(capsys, new, old, *flags)
    assert code == 2
    assert message.format(tmp=tmp_path) in out
    assert "Traceback" not in out


def test_nothing_matching_names_the_setting_and_ignore_compares_across_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = folder(tmp_path / "old", records(config={"defense_args": []}))
    new = folder(tmp_path / "new", records(config={"defense_args": [["strength", "0.2"]]}, auc=0.99))
    code, out = run_compare(capsys, new, old)
    assert code == 2 and "differ in defense_args" in out and "--ignore defense_args" in out
    code, out = run_compare(capsys, new, old, "--ignore", "defense_args")
    assert code == 1 and f"regression: {CELL}: attack AUC" in out


def test_cells_on_one_side_only_are_listed_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    both = records()
    extra = records(scenario="III", config={"scenario": "III"})
    new = folder(tmp_path / "new", [*both, *extra])
    old = folder(tmp_path / "old", both)
    code, out = run_compare(capsys, new, old)
    assert code == 0
    assert "only in NEW (not compared): scenes / III / none / pang-wang threshold" in out
    assert "in 1 cell(s)" in out


def test_the_json_round_trips_and_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = folder(tmp_path / "new", [make_record(seed=s, auc=0.7 + 0.02 * s, fid=10.0 + s) for s in SEEDS])
    old = folder(tmp_path / "old", [make_record(seed=s, auc=0.65, fid=11.0 - s) for s in SEEDS])
    first, second = tmp_path / "a.json", tmp_path / "b" / "b.json"
    run_compare(capsys, new, old, "--json", str(first))
    run_compare(capsys, new, old, "--json", str(second))
    assert first.read_text() == second.read_text()
    data = json.loads(first.read_text())
    report = ComparisonReport.from_dict(data)
    assert report == compare(new, old, resamples=400)
    assert report.to_dict() == data


def test_the_pytest_assertion_fails_on_a_leaky_record_and_passes_on_a_private_one(tmp_path: Path) -> None:
    leaky, private = make_record(auc=0.95), make_record(auc=0.5)
    with pytest.raises(
        AssertionError,
        match=rf"significantly above the baseline by more than 0.02 in 1 cell\(s\):\n  {CELL}: AUC 0.950",
    ):
        assert_privacy_within([leaky], 0.6, resamples=400)
    [check] = assert_privacy_within([private], 0.6, resamples=400)
    assert not check.leaks_more and check.change.value == pytest.approx(-0.1, abs=1e-3)
    # Against baseline records (a folder, as a committed baseline would be), paired by seed and query.
    baseline = folder(tmp_path / "baseline", records(auc=0.55))
    with pytest.raises(AssertionError, match=re.escape(stats.PAIRED)):
        assert_privacy_within(records(auc=0.95), baseline, resamples=400)
    assert_privacy_within(records(auc=0.55), baseline, resamples=400)
    # A margin allows that much more leakage.
    assert_privacy_within([leaky], 0.6, margin=0.4, resamples=400)
    with pytest.raises(ConfigError, match="no cell like"):
        assert_privacy_within(records(scenario="II", config={"scenario": "II"}), baseline)
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        assert_privacy_within([private], 60)


def test_a_change_within_the_margin_is_no_regression_however_well_resolved(tmp_path: Path) -> None:
    # 2,000 non-members per seed resolve 0.80 -> 0.81 well; the default margin of 0.02 says that is no change.
    new = folder(tmp_path / "new", records(auc=0.81, n_nonmembers=2000))
    old = folder(tmp_path / "old", records(auc=0.80, n_nonmembers=2000))
    report = compare(new, old, resamples=400)
    [cell] = report.cells
    auc = next(m for m in cell.metrics if m.metric == "attack AUC")
    assert auc.change == pytest.approx(0.01, abs=1e-3) and auc.verdict == NO_CHANGE and not report.failed
    assert auc.margin == 0.02 and auc.p_value is not None and auc.p_value > 0.5
    strict = compare(new, old, resamples=400, margin=0.0)
    assert next(m for m in strict.cells[0].metrics if m.metric == "attack AUC").verdict == REGRESSION


def test_the_correction_counts_a_shared_utility_once_and_is_recorded(tmp_path: Path) -> None:
    # Two cells (two attack models) of one target: the same utility figures, one test each for FID and CLIP.
    def two_cells(**figures: Any) -> list[ResultRecord]:
        return [
            make_record(seed=s, attack_model=m, config={"attack_model": m}, **figures)
            for s in SEEDS
            for m in ("threshold", "distribution")
        ]

    new = folder(tmp_path / "new", two_cells(auc=0.8, fid=12.0))
    old = folder(tmp_path / "old", two_cells(auc=0.8, fid=10.0))
    report = compare(new, old, resamples=400)
    assert len(report.cells) == 2 and report.n_tests == 2 * 2 + 2  # AUC and TPR per cell, FID and CLIP once
    assert report.correction == "holm" and report.to_dict()["n_tests"] == report.n_tests


def _relabelled(record: ResultRecord, like: ResultRecord) -> ResultRecord:
    """`record`'s evidence filed under `like`'s defense: a planted swap of one defense's targets for another's."""
    config = {**record.config, "defense": like.config["defense"], "defense_args": like.config["defense_args"]}
    return dataclasses.replace(
        record, config=config, components={**record.components, "defense": like.components["defense"]}
    )


REFERENCE_III = Path(__file__).resolve().parents[1] / "leaderboard" / "reference" / "results" / "scenes" / "III"


def test_on_the_reference_a_planted_leak_is_flagged_and_nothing_else(tmp_path: Path) -> None:
    """Committed records (deterministic): `none`'s records filed as `dpsgd.eps8`'s, scenario III,
    the black-box attack (42 cells). The gate must flag dpsgd.eps8's cells, after Holm over all
    of them, and no other; the same records against themselves flag nothing."""
    from benchmark.pipeline.records import read_record, record_files

    reference = [r for p in record_files(REFERENCE_III) if (r := read_record(p)).attack.family == "pang-wang"]
    dp = next(r for r in reference if r.config["defense"] == "dpsgd.eps8")
    planted = [r for r in reference if r.config["defense"] != "dpsgd.eps8"]
    planted += [_relabelled(r, dp) for r in reference if r.config["defense"] == "none"]
    old = folder(tmp_path / "old", reference)
    report = compare(folder(tmp_path / "new", planted), old, resamples=1000)
    flagged = {cell.cell for cell, _ in report.regressions()}
    dp_cells = {c.cell for c in report.cells if "/ dpsgd.eps8 /" in c.cell}
    assert len(dp_cells) == 3 and len(report.cells) == 42
    assert flagged == dp_cells, sorted(flagged)
    assert not compare(old, old, resamples=1000).regressions()
