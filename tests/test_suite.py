"""The suite: grid runs that resume, split work between concurrent suites, and fail clearly."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from attacks.scenarios import Scenario
from benchmark.app.cli import main
from benchmark.app.config import profile
from benchmark.app.suite import SuiteSpec, cell_key, finished_cells, run_suite, unit_lock
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import load_record


def _spec(tmp_path: Path, **changes: Any) -> SuiteSpec:
    config = profile("micro").replace(
        results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", bootstrap_resamples=0
    )
    fields = {
        "config": config,
        "defenses": ("none", "lora.r1"),
        "scenarios": (Scenario.I, Scenario.III),
        "attack_models": ("threshold", "distribution"),
        "seeds": (0,),
    }
    return SuiteSpec(**{**fields, **changes})


class _Recorder:
    """Stands in for run_matrix: notes the cells it was asked for and fails where told."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self.fail_on = fail_on

    def __call__(self, config, *, scenarios, attack_models, **_: Any) -> list[Any]:  # type: ignore[no-untyped-def]
        self.calls.append((config.defense, tuple(s.value for s in scenarios), tuple(attack_models)))
        if config.defense == self.fail_on:
            raise RuntimeError("boom")
        return []


def test_real_suite_writes_every_cell_then_resumes_without_redoing_any(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    report = run_suite(spec, show_progress=False)
    assert len(report.written) == 8 and report.skipped == 0 and not report.failed
    records = [load_record(p) for p in report.written]
    assert {
        (r["components"]["defense"]["name"], r["attack"]["scenario"], r["attack"]["attack_model"]) for r in records
    } == {(d, s, a) for d in ("none", "lora") for s in ("I", "III") for a in ("threshold", "distribution")}
    assert {"fine-tune target", "attack: target", "utility"} <= set(report.stage_seconds)
    assert finished_cells(spec.config.results_dir) == {cell_key(c) for u in spec.units() for c in spec.cells(u)}

    recorder = _Recorder()
    again = run_suite(spec, show_progress=False, run_matrix=recorder)
    assert recorder.calls == [] and again.skipped == 8 and not again.written


def test_interrupted_suite_runs_only_missing_cells(tmp_path: Path) -> None:
    spec = _spec(tmp_path, defenses=("none",))
    first = run_suite(spec, show_progress=False)
    # Lose one cell (as if the suite died before writing it) and corrupt another.
    lost = next(
        p for p in first.written if "III" in p.parts and load_record(p)["attack"]["attack_model"] == "threshold"
    )
    lost.unlink()
    corrupt = next(
        p for p in first.written if "I" in p.parts and load_record(p)["attack"]["attack_model"] == "distribution"
    )
    corrupt.write_text("{ not json")
    recorder = _Recorder()
    run_suite(spec, show_progress=False, run_matrix=recorder)
    assert sorted(recorder.calls) == [("none", ("I",), ("distribution",)), ("none", ("III",), ("threshold",))]


def test_a_unit_another_suite_holds_is_left_then_waited_for(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    units = spec.units()
    recorder = _Recorder()
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(
        target=_hold_lock, args=(spec.config.results_dir, units[0], ready, release)
    )
    holder.start()
    try:
        assert ready.wait(30)
        with unit_lock(spec.config.results_dir, units[0], wait=False) as held:
            assert held is False
        # Release the other suite's lock shortly after this suite has passed the unit over.
        import threading

        threading.Timer(1.0, release.set).start()
        report = run_suite(spec, show_progress=False, run_matrix=recorder)
    finally:
        release.set()
        holder.join(30)
    # lora first (the free unit), then none once the other suite let go of it.
    assert [c[0] for c in recorder.calls] == ["lora.r1", "none"]
    assert not report.failed and report.skipped == 0


def _hold_lock(results_dir: Path, unit: Any, ready: Any, release: Any) -> None:
    with unit_lock(results_dir, unit, wait=True):
        ready.set()
        release.wait(30)


def test_two_suites_at_once_write_each_cell_once(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, attack_models=("threshold",), scenarios=(Scenario.III,), defenses=("none", "lora.r1", "augment.flip")
    )
    # Build the shared base model first so that the two suites only race for units.
    run_suite(
        _spec(tmp_path, attack_models=("threshold",), scenarios=(Scenario.III,), defenses=("none",)),
        show_progress=False,
    )
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_suite_process, args=(spec,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    files = sorted(spec.config.results_dir.rglob("*.json"))
    keys = [cell_key(load_record(f)["config"]) for f in files]
    assert len(keys) == len(set(keys)) == 3, [f.name for f in files]


def _suite_process(spec: SuiteSpec) -> None:
    import torch

    torch.set_num_threads(1)
    run_suite(spec, show_progress=False)


def test_a_failing_unit_is_reported_and_the_rest_still_runs(tmp_path: Path) -> None:
    recorder = _Recorder(fail_on="none")
    report = run_suite(_spec(tmp_path), show_progress=False, run_matrix=recorder)
    assert [c[0] for c in recorder.calls] == ["none", "lora.r1"]
    assert report.failed == [("none seed 0", "RuntimeError: boom")]


def test_bad_unit_fails_before_anything_runs(tmp_path: Path) -> None:
    recorder = _Recorder()
    with pytest.raises(ConfigError, match="did you mean 'dpsgd'"):
        run_suite(_spec(tmp_path, defenses=("none", "dpgsd")), show_progress=False, run_matrix=recorder)
    assert recorder.calls == []


def test_unwritable_results_folder(tmp_path: Path) -> None:
    # /proc refuses new folders even to root, unlike a chmod-ed folder.
    spec = _spec(tmp_path)
    spec = SuiteSpec(**{**spec.__dict__, "config": spec.config.replace(results_dir=Path("/proc/benchmark-results"))})
    with pytest.raises(ConfigError, match="not writable.*--results-dir"):
        run_suite(spec, show_progress=False, run_matrix=_Recorder())


def test_results_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable.*--results-dir"):
        run_suite(_spec(tmp_path), show_progress=False, run_matrix=_Recorder())


def test_cell_key_ignores_where_results_and_caches_live(tmp_path: Path) -> None:
    config = profile("micro")
    moved = config.replace(results_dir=tmp_path / "elsewhere", cache_dir=tmp_path / "other-cache")
    assert cell_key(config) == cell_key(moved)
    assert cell_key(config) != cell_key(config.replace(seed=1))
    assert cell_key(config) != cell_key(config.replace(attack_model="classifier"))
    assert cell_key(config) == cell_key(config.to_dict())


def test_cli_suite_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["suite", "--profile", "micro", "--results-dir", str(tmp_path / "r"), "--quiet"]
    assert main([*base, "--seeds", "zero"]) == 2
    assert "--seeds 'zero' is not a comma list of integers" in capsys.readouterr().err
    assert main([*base, "--defenses", ","]) == 2
    assert "--defenses is empty" in capsys.readouterr().err
    assert main([*base, "--scenarios", "V"]) == 2
    assert "V" in capsys.readouterr().err


def test_cli_suite_runs_and_writes_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = tmp_path / "summary.json"
    argv = [
        "suite", "--profile", "micro", "--defenses", "none", "--scenarios", "III", "--attack-models", "threshold",
        "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--quiet", "--summary", str(summary),
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 written, 0 already done" in err and "wall clock" in err
    import json

    data = json.loads(summary.read_text())
    assert len(data["written"]) == 1 and data["stage_seconds"]["fine-tune target"] >= 0
    assert main(argv) == 0
    assert "0 written, 1 already done" in capsys.readouterr().err


def test_interrupted_suite_keeps_finished_cells_and_releases_its_locks(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import benchmark.app.runner

    real = benchmark.app.runner.run_matrix

    def interrupt_second_unit(config, **kwargs):  # type: ignore[no-untyped-def]
        if config.defense != "none":
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(benchmark.app.runner, "run_matrix", interrupt_second_unit)
    argv = [
        "suite", "--profile", "micro", "--defenses", "none,lora.r1", "--scenarios", "III",
        "--attack-models", "threshold", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
        "--quiet",
    ]  # fmt: skip
    assert main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(finished_cells(tmp_path / "r")) == 1
    spec = _spec(tmp_path, defenses=("lora.r1",), scenarios=(Scenario.III,), attack_models=("threshold",))
    spec = SuiteSpec(
        **{**spec.__dict__, "config": spec.config.replace(results_dir=tmp_path / "r", bootstrap_resamples=1000)}
    )
    for unit in spec.units():
        with unit_lock(tmp_path / "r", unit, wait=False) as held:
            assert held, "the interrupted suite's lock was released"
