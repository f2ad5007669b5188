"""The recomputation check for contributed records: a record reproduces; a tampered one does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.app.cli import main
from benchmark.app.config import RunConfig, profile
from benchmark.app.reproduce import Comparison, Tolerance, figures, reproduce
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import RecordError, TrainingRecord
from tests.factories import make_record


def test_run_config_round_trips_through_json() -> None:
    for name in ("default", "micro", "full"):
        config = profile(name).replace(
            defense="dpsgd", defense_args=(("target_epsilon", "4"),), dataset_path=Path("/x")
        )
        back = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert back.to_dict() == config.to_dict()
        assert back.finetune == config.finetune and back.scenario is config.scenario


def test_run_config_from_dict_rejects_unknown_settings() -> None:
    data = profile("micro").to_dict()
    data["turbo"] = True
    with pytest.raises(ConfigError, match="unknown run setting.*turbo"):
        RunConfig.from_dict(data)


def test_a_record_reproduces_from_an_empty_cache(micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Everything (base model, target, shadow) is trained again: nothing reused.
    result = reproduce(micro_run.outcome.path, cache_dir=tmp_path / "fresh-cache", show_progress=False)
    assert result.same_data
    assert {c.metric for c in result.comparisons} >= {"attack_auc", "fid", "clip_score"}
    assert result.ok, result.comparisons


def test_a_tampered_record_does_not_reproduce(micro_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # A figure the record cannot recompute itself (FID needs the model): only a re-run shows the change.
    data = json.loads(micro_run.outcome.path.read_text())
    assert data["utility"] is not None
    data["utility"]["target"]["fid"] *= 3
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    code = main(["reproduce", str(forged), "--cache-dir", str(micro_run.cache_dir), "--quiet"])
    out = capsys.readouterr().err
    assert code == 1
    assert "NOT reproduced" in out and "outside" in out


def test_a_forged_auc_is_refused_before_anything_runs(micro_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # The AUC follows from the stored scores: a changed one is caught on reading (exit 2), nothing is re-run.
    data = json.loads(micro_run.outcome.path.read_text())
    auc = data["privacy"]["auc"]
    data["privacy"]["auc"] = auc - 0.3 if auc > 0.5 else auc + 0.3
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(data))
    assert main(["reproduce", str(forged), "--cache-dir", str(tmp_path / "unused-cache"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "field privacy/auc is stored as" in err and "contradicts itself" in err
    assert "Traceback" not in err and "NOT reproduced" not in err


def test_tolerances_are_absolute_for_auc_and_relative_for_fid() -> None:
    t = Tolerance(auc=0.1, fid_relative=0.2)
    assert t.allowed("attack_auc", 0.9) == 0.1
    assert t.allowed("fid", 50.0) == pytest.approx(10.0)
    assert Comparison("fid", 50.0, 59.9, 10.0).ok and not Comparison("fid", 50.0, 60.1, 10.0).ok
    assert not Comparison("epsilon", 8.0, None, 0.08).ok
    assert Comparison("epsilon", None, None, 0.0).ok


def test_figures_read_epsilon_from_the_defense_report() -> None:
    record = make_record(
        fid=None, training=TrainingRecord(target={"defense_details": {"dpsgd": {"epsilon": 3.99}}}, shadow={})
    )
    assert figures(record)["epsilon"] == 3.99 and figures(record)["fid"] is None


def test_corrupt_or_foreign_records_are_clear_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(RecordError, match="not valid JSON"):
        reproduce(bad)
    assert main(["reproduce", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_a_record_from_a_missing_plugin_names_what_to_install(micro_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(micro_run.outcome.path.read_text())
    data["config"]["defense"] = "someones_defense.v1"
    data["components"]["defense"]["origin"] = "someones-defense==1.0"
    path = tmp_path / "plugin.json"
    path.write_text(json.dumps(data))
    assert main(["reproduce", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "someones_defense" in err and "someones-defense==1.0" in err


def test_negative_tolerance_is_rejected(micro_run, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["reproduce", str(micro_run.outcome.path), "--auc-tolerance", "-1"]) == 2
    assert "tolerance auc must be >= 0" in capsys.readouterr().err


def test_tolerances_come_from_the_pooled_seed_spread() -> None:
    """Two cells of three seeds: the AUC tolerance is 2.77 x the pooled sd; FID's is relative, from the logs."""
    import math

    import numpy as np

    from benchmark.app.reproduce import SPREAD_MULTIPLIER

    cells = {"none": [(0.90, 10.0), (0.94, 12.0), (0.98, 11.0)], "dpsgd": [(0.50, 30.0), (0.56, 33.0), (0.53, 27.0)]}
    records = [
        make_record(defense=name, seed=seed, auc=auc, fid=fid, config={"defense": name, "seed": seed})
        for name, draws in cells.items()
        for seed, (auc, fid) in enumerate(draws)
    ]
    tolerance = Tolerance.from_seed_spread(records)
    aucs = [np.array([r.privacy.auc for r in records if r.config["defense"] == n]) for n in cells]
    pooled = math.sqrt(sum(((a - a.mean()) ** 2).sum() for a in aucs) / 4)
    assert tolerance.auc == pytest.approx(SPREAD_MULTIPLIER * pooled)
    logs = [np.log([fid for _, fid in draws]) for draws in cells.values()]
    pooled_log = math.sqrt(sum(((x - x.mean()) ** 2).sum() for x in logs) / 4)
    assert tolerance.fid_relative == pytest.approx(math.expm1(SPREAD_MULTIPLIER * pooled_log))
    assert tolerance.basis["attack_auc"] == {"sd": pytest.approx(pooled), "cells": 2, "records": 6}
    # Epsilon is not a seed-driven figure: it keeps the fixed tolerance.
    assert tolerance.epsilon_relative == Tolerance().epsilon_relative


def test_without_repeated_seeds_the_fixed_tolerances_stay() -> None:
    records = [make_record(defense=n, config={"defense": n, "seed": 0}) for n in ("none", "dpsgd")]
    tolerance = Tolerance.from_seed_spread(records)
    assert tolerance == Tolerance() and tolerance.basis == {}


def test_reproduce_names_what_differs_in_the_machine() -> None:
    import dataclasses

    from benchmark.app.reproduce import environment_differences

    stored = make_record()
    here = dataclasses.replace(
        stored,
        provenance=dataclasses.replace(stored.provenance, threads=2, processor="Xeon", libraries={"torch": "2.13.0"}),
    )
    notes = environment_differences(stored, here)
    assert "threads: not recorded -> 2" in notes and "processor: not recorded -> Xeon" in notes
    assert "torch: not recorded -> 2.13.0" in notes
    assert environment_differences(here, here) == []
