"""The recomputation check for contributed records: a record reproduces; a tampered one does not."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.app.cli import main
from benchmark.app.config import RunConfig, profile
from benchmark.app.reproduce import Comparison, Tolerance, figures, reproduce
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import RecordError, ResultRecord, TrainingRecord
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
    assert tolerance.basis["attack_auc"] == {"sd": pytest.approx(pooled), "cells": 2, "records": 6, "scope": "folder"}
    # Epsilon is not a seed-driven figure: it keeps the fixed tolerance.
    assert tolerance.epsilon_relative == Tolerance().epsilon_relative


def test_without_repeated_seeds_the_fixed_tolerances_stay() -> None:
    records = [make_record(defense=n, config={"defense": n, "seed": 0}) for n in ("none", "dpsgd")]
    tolerance = Tolerance.from_seed_spread(records)
    assert tolerance == Tolerance() and tolerance.basis == {}


def _grid(
    auc: dict[str, list[float]], fid: dict[str, list[float]], scenarios: dict[str, list[str]]
) -> list[ResultRecord]:
    """Records of each defense over its scenarios x two attack models x seeds; FID is the target's, per seed."""
    return [
        make_record(
            defense=name,
            seed=seed,
            scenario=scenario,
            attack_model=model,
            # Each cell's draws shift by its position, so cells differ in level but not in spread.
            auc=draws + 0.005 * i,
            fid=fid[name][seed],
            config={"defense": name, "seed": seed, "scenario": scenario, "attack_model": model},
        )
        for name, aucs in auc.items()
        for i, (scenario, model) in enumerate((s, m) for s in scenarios[name] for m in ("threshold", "classifier"))
        for seed, draws in enumerate(aucs)
    ]


def _pooled_sd(groups: list[list[float]]) -> float:
    squares = sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups)
    return float(np.sqrt(squares / sum(len(g) - 1 for g in groups)))


def test_like_pools_the_spread_over_the_records_own_defense() -> None:
    """A steady defense beside a noisy one: its own tolerance is its own spread, not the folder's."""
    from benchmark.app.reproduce import SPREAD_MULTIPLIER

    records = _grid(
        auc={"none": [0.900, 0.902, 0.898], "captions.all": [0.60, 0.80, 0.70]},
        fid={"none": [10.0, 10.5, 9.5], "captions.all": [9.0, 18.0, 12.0]},
        scenarios={"none": ["I", "III"], "captions.all": ["I", "III"]},
    )
    none = [r for r in records if r.config["defense"] == "none"]
    cells = [
        [r.privacy.auc for r in none if (r.config["scenario"], r.config["attack_model"]) == cell]
        for cell in {(r.config["scenario"], r.config["attack_model"]) for r in none}
    ]
    own_sd = _pooled_sd(cells)
    tolerance = Tolerance.from_seed_spread(records, like=none[0])
    assert tolerance.auc == pytest.approx(SPREAD_MULTIPLIER * own_sd)
    assert tolerance.basis["attack_auc"] == {"sd": pytest.approx(own_sd), "cells": 4, "records": 12, "scope": "defense"}
    folder = Tolerance.from_seed_spread(records)
    assert folder.basis["attack_auc"]["scope"] == "folder" and folder.basis["attack_auc"]["cells"] == 8
    assert tolerance.auc < folder.auc / 10
    # One configuration's utility over three seeds is 2 degrees of freedom: too few, the folder's spread stands.
    assert tolerance.basis["fid"]["scope"] == "folder" and tolerance.fid_relative == folder.fid_relative
    json.dumps(tolerance.basis)


def test_a_defense_absent_from_the_folder_gets_the_folder_spread() -> None:
    records = _grid(
        auc={"none": [0.900, 0.902, 0.898], "captions.all": [0.60, 0.80, 0.70]},
        fid={"none": [10.0, 10.5, 9.5], "captions.all": [9.0, 18.0, 12.0]},
        scenarios={"none": ["I", "III"], "captions.all": ["I", "III"]},
    )
    stranger = make_record(defense="dpsgd", config={"defense": "dpsgd", "seed": 0, "scenario": "I"})
    tolerance = Tolerance.from_seed_spread(records, like=stranger)
    folder = Tolerance.from_seed_spread(records)
    assert tolerance == folder
    assert tolerance.basis == folder.basis and {b["scope"] for b in tolerance.basis.values()} == {"folder"}


def test_utility_repeated_over_scenarios_and_attack_models_counts_once() -> None:
    """FID is the target's: one value per defense and seed, however many cells repeat it."""
    import math

    from benchmark.app.reproduce import SPREAD_MULTIPLIER

    fid = {"none": [10.0, 12.0, 11.0], "dpsgd": [30.0, 45.0, 20.0]}
    # `none` repeats its FID over 4 scenarios x 2 attack models, `dpsgd` over one scenario's 2.
    records = _grid(
        auc={"none": [0.90, 0.92, 0.94], "dpsgd": [0.50, 0.55, 0.52]},
        fid=fid,
        scenarios={"none": ["I", "II", "III", "IV"], "dpsgd": ["I"]},
    )
    tolerance = Tolerance.from_seed_spread(records)
    sd = _pooled_sd([list(np.log(v)) for v in fid.values()])
    assert tolerance.basis["fid"] == {"sd": pytest.approx(sd), "cells": 2, "records": 6, "scope": "folder"}
    assert tolerance.fid_relative == pytest.approx(math.expm1(SPREAD_MULTIPLIER * sd))
    # The attack is drawn per cell: its spread keeps every cell.
    assert tolerance.basis["attack_auc"]["cells"] == 10 and tolerance.basis["attack_auc"]["records"] == 30
    # Another attack family on the same targets (a gray-box suite beside the black-box one) adds no value.
    gray = [
        make_record(
            defense="none",
            seed=seed,
            scenario="III",
            fid=fid["none"][seed],
            config={"defense": "none", "seed": seed, "scenario": "III", "attack_model": "threshold", "attack": "clid"},
        )
        for seed in range(3)
    ]
    assert Tolerance.from_seed_spread(records + gray).basis["fid"] == tolerance.basis["fid"]


def test_the_measured_tolerances_name_their_scope() -> None:
    from rich.console import Console

    from benchmark.app.cli import _measured_tolerance

    records = _grid(
        auc={"none": [0.900, 0.902, 0.898], "captions.all": [0.60, 0.80, 0.70]},
        fid={"none": [10.0, 10.5, 9.5], "captions.all": [9.0, 18.0, 12.0]},
        scenarios={"none": ["I", "III"], "captions.all": ["I", "III"]},
    )
    out = io.StringIO()
    tolerance = _measured_tolerance(
        Path("reference"), records, records[0], Path("r.json"), Console(file=out, width=200)
    )
    err = out.getvalue()
    assert "attack_auc: seed-to-seed sd" in err and "over the record's defense: 4 cells, 12 records" in err
    assert "fid: seed-to-seed sd" in err and "pooled over the folder: 2 configurations, 6 records" in err
    assert tolerance.basis["attack_auc"]["scope"] == "defense"


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
