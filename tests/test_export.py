"""Records as a DataFrame (`leaderboard.load_results`), `python -m leaderboard export`, and stage lines in logs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.records import ComponentRecord, load_record, record_files, write_record
from leaderboard import load_results
from leaderboard.cli import main as leaderboard_main
from leaderboard.frame import skipped_files
from tests.factories import make_record


def _records() -> dict[str, object]:
    """One record of every kind, keyed by what it is."""
    plain = make_record(defense="none", auc=0.9, fid=10.0, clip=30.0)
    control = dataclasses.replace(plain.privacy, auc=0.5, auc_ci=(0.4, 0.6))
    composed_defense = ComponentRecord(
        name="dpsgd+lora",
        version="1",
        origin="test",
        details={"components": [{"name": "dpsgd", "preset": "eps8"}, {"name": "lora", "preset": "r4"}]},
    )
    composed = make_record(defense="dpsgd+lora", epsilon=8.0, auc=0.6, fid=12.0, scenario="III")
    plugin = make_record(defense="weight_decay", preset="wd01", auc=0.7, fid=11.0, scenario="II")
    return {
        "plain": plain,
        "matrix": make_record(defense="none", scenario="IV", attack_model="classifier", auc=0.75, fid=10.0),
        "dp": make_record(defense="dpsgd", preset="eps1", epsilon=1.0, auc=0.55, fid=13.0, scenario="III"),
        "composed": dataclasses.replace(
            composed, components={**composed.components, "defense": composed_defense}, run_id="r-composed"
        ),
        "plugin": dataclasses.replace(
            plugin,
            components={
                **plugin.components,
                "defense": dataclasses.replace(plugin.components["defense"], origin="mia-bench-weight-decay 0.1.0"),
            },
        ),
        "control": dataclasses.replace(plain, control=control, run_id="r-with-control", config={"members": 8}),
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    for record in _records().values():
        write_record(record, folder)  # type: ignore[arg-type]
    return folder


def _row(frame: pd.DataFrame, run_id: str) -> pd.Series:
    rows = frame[frame["run_id"] == run_id]
    assert len(rows) == 1
    return rows.iloc[0]


def test_load_results_gives_one_row_per_record_with_known_values(results: Path) -> None:
    frame = load_results(results)
    kinds = _records()
    assert len(frame) == len(kinds)
    assert frame.attrs["skipped"] == []
    assert list(frame["path"]) == sorted(frame["path"])  # deterministic order

    plain = _row(frame, kinds["plain"].run_id)  # type: ignore[attr-defined]
    assert plain["defense"] == "none" and plain["scenario"] == "I" and plain["attack_model"] == "threshold"
    assert plain["privacy.auc"] == pytest.approx(0.9, abs=1e-3)
    assert plain["privacy.auc.ci_low"] == pytest.approx(plain["privacy.auc"] - 0.1)
    assert plain["utility.fid"] == 10.0 and plain["utility.clip_score"] == 30.0
    assert plain["utility.feature_network"] == "clip-ref"
    assert pd.isna(plain["epsilon"]) and pd.isna(plain["control.auc"])
    assert plain["privacy.tpr@fpr=0.01.n_nonmembers"] == 8
    assert not plain["privacy.tpr@fpr=0.01.supported"]

    matrix = _row(frame, kinds["matrix"].run_id)  # type: ignore[attr-defined]
    assert (matrix["scenario"], matrix["attack_model"]) == ("IV", "classifier")
    assert matrix["component.attack_model.name"] == "classifier"

    dp = _row(frame, kinds["dp"].run_id)  # type: ignore[attr-defined]
    assert dp["defense"] == "dpsgd.eps1" and dp["epsilon"] == 1.0 and dp["utility.fid"] == 13.0

    composed = _row(frame, "r-composed")
    assert composed["defense"] == "dpsgd.eps8+lora.r4" and composed["epsilon"] == 8.0

    plugin = _row(frame, kinds["plugin"].run_id)  # type: ignore[attr-defined]
    assert plugin["defense"] == "weight_decay.wd01"
    assert plugin["component.defense.origin"] == "mia-bench-weight-decay 0.1.0"

    control = _row(frame, "r-with-control")
    assert control["control.auc"] == 0.5
    assert (control["control.auc.ci_low"], control["control.auc.ci_high"]) == (0.4, 0.6)
    assert control["config.members"] == 8


def test_load_results_skips_corrupt_and_foreign_files_and_says_which(results: Path) -> None:
    (results / "corrupt.json").write_text("{not json")
    (results / "foreign.json").write_text(json.dumps({"hello": "world"}))
    frame = load_results(results)
    assert len(frame) == len(_records())
    skipped = {s.path: s.reason for s in skipped_files(frame)}
    assert set(skipped) == {"corrupt.json", "foreign.json"}
    assert "not valid JSON" in skipped["corrupt.json"]


def test_reference_records_hold_no_machine_paths() -> None:
    folder = Path(__file__).resolve().parents[1] / "leaderboard" / "reference" / "results"
    paths = record_files(folder)
    assert paths, "the committed reference records are missing"
    for path in paths:
        config = load_record(path)["config"]
        assert (config["results_dir"], config["cache_dir"]) == ("<results>", "<cache>"), path
        for name in ("dataset_path", "model_path", "encoder_path", "captioner_path", "clip_model", "fid_weights"):
            assert config[name] is None or not str(config[name]).startswith("/"), (path, name)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_export_round_trips(results: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="parquet export needs pyarrow (in the test extra)")
    output = tmp_path / f"out.{fmt}"
    assert leaderboard_main(["export", "--results-dir", str(results), "--format", fmt, "--output", str(output)]) == 0
    assert f"{len(_records())} record(s)" in capsys.readouterr().out
    frame = load_results(results)
    # CSV and JSON carry no column types: text columns are read as text ("1" is a version, not a number).
    text = {c: str for c in frame.columns if pd.api.types.is_string_dtype(frame[c])}
    if fmt == "csv":
        back = pd.read_csv(output, dtype=text)
    elif fmt == "parquet":
        back = pd.read_parquet(output)
    else:
        back = pd.read_json(output, orient="records", lines=True, dtype=text)
    assert list(back.columns) == list(frame.columns)
    if fmt == "parquet":
        pd.testing.assert_frame_equal(back, frame)
    else:  # a column with nothing in it comes back as NaN rather than None: missing is missing
        pd.testing.assert_frame_equal(_missing_as_none(back), _missing_as_none(frame), check_dtype=False, rtol=1e-12)


def _missing_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def test_export_refuses_unknown_format_and_unwritable_output(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "--results-dir", str(results), "--output"]
    assert leaderboard_main([*args, str(tmp_path / "x.xml"), "--format", "xml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown export format 'xml'" in err and "csv" in err
    assert leaderboard_main([*args, str(tmp_path / "missing" / "x.csv"), "--format", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write" in err and "--output" in err
    assert not (tmp_path / "missing").exists()


def test_export_names_the_files_it_skipped(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (results / "corrupt.json").write_text("{not json")
    output = tmp_path / "out.jsonl"
    assert (
        leaderboard_main(["export", "--results-dir", str(results), "--format", "jsonl", "--output", str(output)]) == 0
    )
    captured = capsys.readouterr()
    assert "skipped corrupt.json" in captured.err and "skipped 1 file(s)" in captured.out
    assert len(output.read_text().splitlines()) == len(_records())


def test_stage_timer_writes_lines_without_a_terminal() -> None:
    out = io.StringIO()
    with StageTimer(Console(file=out, force_terminal=False)) as timer:
        with timer.stage("fine-tune target", total=4) as advance:
            advance(4)
        with pytest.raises(RuntimeError), timer.stage("attack"):
            raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert [line.split(" (elapsed")[0] for line in lines] == [
        "[stage] fine-tune target: started, 4 steps",
        "[stage] fine-tune target: done in 0.0s",
        "[stage] attack: started",
        "[stage] attack: stopped after 0.0s",
    ]


def test_stage_timer_on_a_terminal_draws_no_stage_lines() -> None:
    out = io.StringIO()
    with StageTimer(Console(file=out, force_terminal=True)) as timer, timer.stage("fine-tune target"):
        pass
    assert "[stage]" not in out.getvalue()
    assert "fine-tune target" in out.getvalue()  # the progress bar


def test_run_without_a_terminal_logs_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmark.app.cli import main

    code = main(
        [
            "run",
            "--profile",
            "micro",
            "--defense",
            "none",
            "--results-dir",
            str(tmp_path / "results"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[stage] ")]
    started = [line for line in lines if ": started" in line]
    ended = [line for line in lines if ": done in" in line]
    assert started and len(started) == len(ended)
    assert any("fine-tune target" in line for line in started)
    assert all("(elapsed " in line for line in lines)
