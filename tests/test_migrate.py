"""Schema migration (v1 -> v2) and the typed record's round trip.

tests/data/record_v1.json is a committed v1 reference record (scenes / III / none,
as written before the `metrics` dict went), kept verbatim.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from benchmark.app.cli import main
from benchmark.app.config import INTRODUCED_SETTINGS
from benchmark.app.migrate import migrate, upgrade
from benchmark.pipeline.records import (
    SCHEMA_VERSION,
    ComponentRecord,
    RecordError,
    ResultRecord,
    TrainingRecord,
    find_epsilon,
    read_record,
)
from tests.factories import make_record

V1_FILE = Path(__file__).parent / "data" / "record_v1.json"

# Each v1 `metrics` entry and the v2 figure that now holds it.
V1_FIGURES = {
    "attack_auc": "privacy.auc",
    "attack_balanced_accuracy": "privacy.balanced_accuracy",
    "attack_tpr_at_1pct_fpr": "privacy.tpr@fpr=0.01",
    "attack_tpr_at_0.1pct_fpr": "privacy.tpr@fpr=0.001",
    "control_auc_base_model": "control.auc",
    "baseline_auc_model_free": "baseline.auc",
    "fid": "utility.fid",
    "kid": "utility.kid_mean",
    "clip_score": "utility.clip_score",
    "control_fid_base_model": "utility.base_model.fid",
    "control_clip_score_base_model": "utility.base_model.clip_score",
}


def _v1() -> dict[str, Any]:
    return json.loads(V1_FILE.read_text())


def _plain(value: Any) -> Any:
    """As JSON would hold it (tuples become lists)."""
    return json.loads(json.dumps(value))


def _folder_with(tmp_path: Path, **records: dict[str, Any]) -> dict[str, Path]:
    folder = tmp_path / "results"
    paths = {}
    for name, data in records.items():
        path = folder / "scenes" / "III" / "none" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
        paths[name] = path
    return paths


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fixture_is_a_v1_record_with_every_figure() -> None:
    v1 = _v1()
    assert v1["schema_version"] == 1
    assert set(v1["metrics"]) == set(V1_FIGURES)
    upgrade_hint = r"schema_version 1 is not supported .*upgrade it with `python -m benchmark migrate"
    with pytest.raises(RecordError, match=upgrade_hint):
        ResultRecord.from_dict(v1)


def test_v1_to_v2_keeps_every_figure() -> None:
    v1 = _v1()
    original = copy.deepcopy(v1)
    record = ResultRecord.from_dict(upgrade(v1, source="v1"))
    assert v1 == original, "upgrade() must not change its input"
    assert record.schema_version == SCHEMA_VERSION == 2

    # Every v1 headline figure, read from its one v2 home.
    figures = {f.name: f for f in record.figures()}
    for name, figure in V1_FIGURES.items():
        assert figures[figure].value == v1["metrics"][name]["value"], name
        assert figures[figure].higher_is_better == v1["metrics"][name]["higher_is_better"], name
        ci = v1["metrics"][name]["ci"]
        if figure.startswith(("privacy.", "control.", "baseline.")):
            assert figures[figure].ci == (None if ci is None else tuple(ci)), name

    # The privacy sections, field by field.
    assert record.privacy.auc == v1["privacy"]["auc"] == 1.0
    assert record.privacy.balanced_accuracy == v1["privacy"]["balanced_accuracy"]
    assert [t.tpr for t in record.privacy.tpr_at_fpr] == [t["tpr"] for t in v1["privacy"]["tpr_at_fpr"]]
    assert [t.target_fpr for t in record.privacy.tpr_at_fpr] == [0.01, 0.001]
    assert record.control is not None and record.baseline is not None
    assert record.control.auc == v1["control"]["auc"]
    assert record.baseline.auc == v1["baseline"]["auc"]
    for home in ("privacy", "control", "baseline"):
        assert _plain(getattr(record, home).to_dict()) == v1[home], home
    assert _plain(record.attack.shadow_fit.to_dict()) == v1["attack"]["shadow_fit"]

    # Utility: the target's figures and the base model's, and the protocol behind them.
    assert record.utility is not None and record.utility.base_model is not None
    for key in ("fid", "kid_mean", "kid_std", "clip_score"):
        assert getattr(record.utility.target, key) == v1["utility"][key], key
        assert getattr(record.utility.base_model, key) == v1["utility"]["base_model"][key], key
    for key in ("n_real", "n_generated", "kid_subset_size", "kid_subsets", "seed"):
        assert getattr(record.utility, key) == v1["utility"][key], key
    assert record.utility.feature_network.weights_sha256 == v1["utility"]["feature_network"]["weights_sha256"]
    assert record.utility.clip_model.details["training"] == v1["utility"]["clip_model"]["training"]

    # Everything else is carried over unchanged.
    assert record.training.to_dict() == v1["training"]
    assert record.training.epsilon is None and find_epsilon(v1["training"]["target"]["defense_details"]) is None
    attack = _plain(record.attack.to_dict())
    # Every v1 field unchanged; the fields v1 had not (the attack family and its access) take their defaults.
    assert {k: v for k, v in attack.items() if k in v1["attack"]} == v1["attack"]
    assert attack["family"] == "pang-wang" and set(attack) - set(v1["attack"]) == {
        "family",
        "family_version",
        "access",
        "hyperparameters",
        "cost_per_query",
        "unet_calls",
    }
    assert record.splits == v1["splits"] and record.seeds == v1["seeds"]
    assert record.notes == v1["notes"] and record.timings_s == v1["timings_s"]
    assert record.config["profile"] == v1["config"]["preset"] and "preset" not in record.config
    # Settings added after v1 are written with the value that gives v1's behaviour.
    assert {k: v for k, v in record.config.items() if k != "profile"} == {
        **{k: v for k, v in v1["config"].items() if k != "preset"},
        **INTRODUCED_SETTINGS,
    }
    for name, entry in v1["components"].items():
        component = record.components[name]
        assert (component.name, component.version, component.origin) == (
            entry["name"],
            entry["version"],
            entry["origin"],
        ), name
        assert component.from_cache == entry.get("from_cache"), name
        assert component.details == {
            k: v for k, v in entry.items() if k not in ("name", "version", "origin", "from_cache")
        }, name
    assert record.components["attack_model"].details["threshold"] == v1["components"]["attack_model"]["threshold"]


def test_v1_dp_record_keeps_its_epsilon() -> None:
    # The fixture is undefended; give it the DP-SGD report of a v1 dpsgd.eps1 record.
    v1 = _v1()
    for which in ("target", "shadow"):
        v1["training"][which]["defense_details"] = {
            "dpsgd": {"epsilon": 0.9971075143907493, "delta": 0.003125, "target_epsilon": 1.0}
        }
    v1["components"]["defense"] = {
        "name": "dpsgd",
        "version": "1",
        "preset": "dpsgd.eps1",
        "config": {"target_epsilon": 1.0},
        "origin": "diffusion-mia-bench==0.1.0",
    }
    record = ResultRecord.from_dict(upgrade(v1))
    assert record.training.epsilon == find_epsilon(v1["training"]["target"]["defense_details"]) == 0.9971075143907493
    assert record.components["defense"].label == "dpsgd.eps1"
    assert record.privacy.auc == v1["metrics"]["attack_auc"]["value"]


def test_migration_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _folder_with(tmp_path, one=_v1())["one"]
    folder = tmp_path / "results"

    report = migrate(folder)
    assert report.upgraded == [path] and report.current == []
    once = _snapshot(folder)
    assert list(once) == [path], "no temporary file is left behind"
    record = read_record(path)  # valid v2, through the one reader
    assert record.privacy.auc == _v1()["metrics"]["attack_auc"]["value"]

    again = migrate(folder)
    assert again.upgraded == [] and again.current == [path]
    assert _snapshot(folder) == once, "a second migration changes nothing"

    assert main(["migrate", str(folder)]) == 0
    assert "0 record(s) upgraded to schema 2, 1 already current" in capsys.readouterr().err
    assert _snapshot(folder) == once


def test_unknown_schema_version_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    future = {**_v1(), "schema_version": 7}
    # `a-…` sorts first: a migratable record beside the unknown one is not written either.
    paths = _folder_with(tmp_path, **{"a-v1": _v1(), "b-future": future})
    folder = tmp_path / "results"
    before = _snapshot(folder)

    with pytest.raises(RecordError) as info:
        migrate(folder)
    message = str(info.value)
    assert str(paths["b-future"]) in message
    assert "schema_version 7 is unknown" in message and "nothing was written" in message
    assert _snapshot(folder) == before

    assert main(["migrate", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "schema_version 7 is unknown" in err and "nothing was written" in err
    assert _snapshot(folder) == before


def test_v1_record_whose_metrics_contradict_privacy_is_refused(tmp_path: Path) -> None:
    v1 = _v1()
    v1["metrics"]["attack_auc"]["value"] = 0.75
    assert v1["privacy"]["auc"] == 1.0
    with pytest.raises(RecordError, match=r"metrics/attack_auc is 0\.75 but privacy/auc is 1\.0"):
        upgrade(copy.deepcopy(v1), source="contradictory")

    path = _folder_with(tmp_path, bad=v1)["bad"]
    before = path.read_bytes()
    with pytest.raises(RecordError, match="contradicts itself"):
        migrate(tmp_path / "results")
    assert path.read_bytes() == before
    assert json.loads(path.read_text())["schema_version"] == 1


def _composed() -> ResultRecord:
    record = make_record(defense="dpsgd+lora")
    parts = [
        {"name": "dpsgd", "version": "1", "preset": "dpsgd.eps8", "config": {"target_epsilon": 8.0}},
        {"name": "lora", "version": "1", "preset": "lora.r4", "config": {"rank": 4}},
    ]
    defense = ComponentRecord(
        name="dpsgd+lora", version="1", origin="test", details={"preset": None, "components": parts}
    )
    details = {"dpsgd": {"epsilon": 7.93, "delta": 1e-3}, "lora": {"rank": 4}}
    return dataclasses.replace(
        record,
        components={**record.components, "defense": defense},
        training=TrainingRecord(target={"defense_details": details}, shadow={"defense_details": details}),
    )


def _kinds() -> dict[str, ResultRecord]:
    plain = make_record()
    return {
        "plain": plain,
        "control and baseline": make_record(
            control=dataclasses.replace(plain.privacy, auc=0.52, auc_ci=(0.4, 0.64)),
            baseline=dataclasses.replace(plain.privacy, auc=0.47, auc_ci=None, balanced_accuracy=None),
            notes=["a note"],
        ),
        "dp with epsilon": make_record(defense="dpsgd", preset="dpsgd.eps4", epsilon=3.99),
        "composed defense": _composed(),
        "no utility": make_record(fid=None),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_record_round_trips_through_its_dict(kind: str) -> None:
    record = _kinds()[kind]
    assert ResultRecord.from_dict(record.to_dict()) == record
    # And through the file's JSON text (tuples read back as the same typed values).
    assert ResultRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_round_trip_kinds_are_what_they_say() -> None:
    kinds = _kinds()
    assert kinds["plain"].control is None and kinds["plain"].utility is not None
    assert kinds["control and baseline"].control is not None and kinds["control and baseline"].baseline is not None
    assert kinds["dp with epsilon"].training.epsilon == 3.99
    assert kinds["composed defense"].training.epsilon == 7.93
    assert kinds["composed defense"].components["defense"].label == "dpsgd.eps8+lora.r4"
    assert kinds["no utility"].utility is None
    assert not any(f.name.startswith("utility") for f in kinds["no utility"].figures())
