"""Result records: schema, atomic never-overwriting writes, helpful errors on bad files."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from benchmark.pipeline.records import (
    SCHEMA_VERSION,
    RecordError,
    ResultRecord,
    load_record,
    record_path,
    validate,
    write_record,
)


@pytest.fixture(scope="module")
def record(micro_run) -> ResultRecord:  # type: ignore[no-untyped-def]
    return micro_run.outcome.record


@pytest.fixture(scope="module")
def data(micro_run) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return load_record(micro_run.outcome.path)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_session_record_validates(micro_run, data: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["run_id"] == micro_run.outcome.record.run_id
    # The file holds exactly what the in-memory record says.
    assert data == json.loads(json.dumps(micro_run.outcome.record.to_dict()))


def test_record_content(micro_run, data: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
    attack = data["attack"]
    n = len(attack["query_ids"])
    assert n == 16
    for key in ("labels", "scores", "membership_scores", "predictions"):
        assert len(attack[key]) == n, key
    assert all(len(row) == attack["generations_per_query"] == 2 for row in attack["scores"])
    assert sorted(set(attack["labels"])) == [0, 1]

    splits = data["splits"]
    assert len(splits["members"]) == 8 and len(splits["nonmembers"]) == 8
    assert {"auxiliary", "utility", "shadow_members", "shadow_nonmembers"} <= set(splits)

    timings = data["timings_s"]
    for stage in ("data", "base model", "fine-tune target", "fine-tune shadow", "attack: shadow", "attack: target"):
        assert stage in timings and timings[stage] >= 0
    assert data["peak_memory_mb"] > 0

    prov = data["provenance"]
    assert prov["package"] == "diffusion-mia-bench"
    assert set(prov["libraries"]) >= {"torch", "diffusers", "transformers", "numpy", "scikit-learn"}
    assert prov["python"].count(".") == 2
    # What moves results between machines is kept: thread counts, processor, deterministic mode.
    assert prov["threads"] >= 1 and prov["interop_threads"] >= 1
    assert isinstance(prov["processor"], str) and prov["processor"]
    assert isinstance(prov["deterministic_algorithms"], bool)

    # Each figure has one home; its direction comes from the home's type.
    assert "metrics" not in data
    figures = {f.name: f for f in micro_run.outcome.record.figures()}
    assert figures["privacy.auc"].value == data["privacy"]["auc"] and figures["privacy.auc"].higher_is_better is False
    assert figures["utility.clip_score"].higher_is_better is True
    # One reader: the file reads back as the record that was written.
    written = json.loads(json.dumps(micro_run.outcome.record.to_dict()))
    assert ResultRecord.from_dict(data) == ResultRecord.from_dict(written)

    assert set(data["components"]) >= {"dataset", "model", "defense", "attack_model", "encoder"}
    assert data["components"]["defense"]["name"] == "none"
    assert data["config"]["profile"] == "micro"
    assert data["seeds"]["seed"] == 0
    # 8 non-members cannot speak for FPR 1%: the record says so.
    assert any("not supported" in note for note in data["notes"])
    assert all(t["supported"] is False for t in data["privacy"]["tpr_at_fpr"])


def test_write_never_overwrites(tmp_path: Path, record: ResultRecord) -> None:
    path = write_record(record, tmp_path)
    assert path == record_path(tmp_path, record)
    assert path.relative_to(tmp_path).parts[:3] == ("scenes", "III", "none")
    before = path.read_bytes()
    with pytest.raises(RecordError, match="already exists"):
        write_record(record, tmp_path)
    changed = dataclasses.replace(record, notes=["a different record with the same run id"])
    with pytest.raises(RecordError, match="never overwritten"):
        write_record(changed, tmp_path)
    assert path.read_bytes() == before
    assert _files(tmp_path) == [path]


def test_write_leaves_no_temporary_files(tmp_path: Path, record: ResultRecord) -> None:
    path = write_record(record, tmp_path)
    assert _files(tmp_path) == [path]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    assert load_record(path)["run_id"] == record.run_id


def test_invalid_record_is_not_written(tmp_path: Path, record: ResultRecord) -> None:
    bad = dataclasses.replace(record, attack=dataclasses.replace(record.attack, scenario="V"))
    with pytest.raises(RecordError, match="attack/scenario"):
        write_record(bad, tmp_path)
    assert _files(tmp_path) == []


def test_non_finite_value_raises_record_error(tmp_path: Path, record: ResultRecord) -> None:
    bad = dataclasses.replace(record, privacy=dataclasses.replace(record.privacy, auc=float("nan")))
    with pytest.raises(RecordError):
        write_record(bad, tmp_path)


def test_corrupt_file_names_file_and_says_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1, "run_id": ')
    with pytest.raises(RecordError) as info:
        load_record(path)
    message = str(info.value)
    assert str(path) in message
    assert "corrupt" in message and "not valid JSON" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="cannot read"):
        load_record(tmp_path / "absent.json")


def test_unsupported_schema_version(tmp_path: Path, data: dict) -> None:  # type: ignore[type-arg]
    future = copy.deepcopy(data)
    future["schema_version"] = 99
    path = tmp_path / "future.json"
    path.write_text(json.dumps(future))
    with pytest.raises(RecordError) as info:
        load_record(path)
    assert "schema_version 99" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(RecordError, match="schema_version 99"):
        validate(future)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.pop("attack"), "(top level)"),
        (lambda d: d["privacy"].__setitem__("auc", 1.5), "privacy/auc"),
        (lambda d: d["components"]["defense"].pop("details"), "components/defense"),
        (lambda d: d["privacy"].__setitem__("auc_ci", [float("nan"), 0.5]), "privacy/auc_ci/0"),
        (lambda d: d["attack"]["labels"].__setitem__(0, 2), "attack/labels/0"),
        (lambda d: d.__setitem__("run_id", "has/slash"), "run_id"),
    ],
)
def test_schema_violations_name_the_field(data: dict, mutate, where: str) -> None:  # type: ignore[no-untyped-def,type-arg]
    bad = copy.deepcopy(data)
    mutate(bad)
    with pytest.raises(RecordError, match=re.escape(f"field {where}")):
        validate(bad)


def test_non_object_json(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(RecordError, match="JSON object"):
        load_record(path)
