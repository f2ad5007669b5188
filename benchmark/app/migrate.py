"""Upgrade result records to the current schema, in place and atomically.

    python -m benchmark migrate leaderboard/reference/results

Version 1 -> 2: the `metrics` dict goes (each figure already has its home in
`privacy`, `control`, `baseline` or `utility`; the migration checks that they
agree before dropping the copy); every component becomes `name`, `version`,
`origin`, `from_cache` and its free-form `details`; utility splits into typed
networks, the target's figures and the base model's; `config.preset` becomes
`config.profile`. Records already current are left alone, so a second run
changes nothing. A record of an unknown version stops the migration before any
file is written. A compacted record (`*.json.xz`) is upgraded in its compacted form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.app.config import upgrade_config_dict
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import (
    SCHEMA_VERSION,
    ComponentRecord,
    RecordError,
    ResultRecord,
    UtilityRecord,
    file_bytes,
    parse_json,
    read_record_bytes,
    record_files,
    write_atomically,
)

# Where each v1 `metrics` entry lives in v2 (the figure's one home).
V1_METRIC_HOMES: dict[str, tuple[str, ...]] = {
    "attack_auc": ("privacy", "auc"),
    "attack_balanced_accuracy": ("privacy", "balanced_accuracy"),
    "attack_tpr_at_1pct_fpr": ("privacy", "tpr", "0.01"),
    "attack_tpr_at_0.1pct_fpr": ("privacy", "tpr", "0.001"),
    "control_auc_base_model": ("control", "auc"),
    "baseline_auc_model_free": ("baseline", "auc"),
    "fid": ("utility", "fid"),
    "kid": ("utility", "kid_mean"),
    "clip_score": ("utility", "clip_score"),
    "control_fid_base_model": ("utility", "base_model", "fid"),
    "control_clip_score_base_model": ("utility", "base_model", "clip_score"),
}


@dataclass
class MigrationReport:
    upgraded: list[Path] = field(default_factory=list)
    current: list[Path] = field(default_factory=list)


def _home(data: dict[str, Any], where: tuple[str, ...]) -> Any:
    section = data.get(where[0])
    if section is None:
        return None
    if where[1] == "tpr":
        fpr = float(where[2])
        for item in section["tpr_at_fpr"]:
            if math.isclose(float(item["target_fpr"]), fpr):
                return item["tpr"]
        return None
    value = section.get(where[1])
    return value.get(where[2]) if len(where) > 2 and isinstance(value, dict) else value


def upgrade_v1(data: dict[str, Any], *, source: str = "record") -> dict[str, Any]:
    """A v1 record as v2 (a new dict; `data` is not changed).

    Raises:
        RecordError: a `metrics` figure disagrees with its home, or one has no home.
    """
    out = {k: v for k, v in data.items() if k != "metrics"}
    for name, metric in (data.get("metrics") or {}).items():
        if name not in V1_METRIC_HOMES:
            raise RecordError(f"{source}: metrics/{name} has no home in schema 2; migrate it by hand")
        home = _home(data, V1_METRIC_HOMES[name])
        if home != metric.get("value"):
            raise RecordError(
                f"{source}: metrics/{name} is {metric.get('value')!r} but {'/'.join(V1_METRIC_HOMES[name])} "
                f"is {home!r}; the record contradicts itself, so it is not migrated"
            )
    out["components"] = {
        name: ComponentRecord.from_description(
            {k: v for k, v in entry.items() if k not in ("origin", "from_cache")},
            origin=str(entry["origin"]),
            from_cache=entry.get("from_cache"),
        ).to_dict()
        for name, entry in data["components"].items()
    }
    if data.get("utility") is not None:
        out["utility"] = UtilityRecord.from_measurement(data["utility"]).to_dict()
    try:
        out["config"] = upgrade_config_dict(data["config"])
    except ConfigError as exc:
        raise RecordError(f"{source}: {exc}") from None
    out["schema_version"] = 2
    return out


UPGRADES = {1: upgrade_v1}


def upgrade(data: dict[str, Any], *, source: str = "record") -> dict[str, Any] | None:
    """`data` brought to the current schema and validated, or None when it is current already.

    Raises:
        RecordError: an unknown version, or a record that does not upgrade to a valid one.
    """
    version = data.get("schema_version")
    if version == SCHEMA_VERSION:
        ResultRecord.from_dict(data, source=source)
        return None
    if version not in UPGRADES:
        known = ", ".join(str(v) for v in sorted(UPGRADES))
        raise RecordError(
            f"{source}: schema_version {version!r} is unknown; this version migrates {known} to "
            f"{SCHEMA_VERSION}; nothing was written"
        )
    while version != SCHEMA_VERSION:
        data = UPGRADES[version](data, source=source)
        version = data["schema_version"]
    # Through the typed record: the written file is what the writer would write.
    return ResultRecord.from_dict(data, source=source).to_dict()


def migrate(folder: Path) -> MigrationReport:
    """Upgrade every record under `folder`; all are checked before any is written.

    Raises:
        RecordError: a file is unreadable, of an unknown version, or does not upgrade (nothing written).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordError(f"{folder} is not a folder of result records")
    report = MigrationReport()
    pending: list[tuple[Path, bytes]] = []
    for path in (p for p in record_files(folder) if p.is_file()):
        try:
            data = parse_json(read_record_bytes(path), source=str(path))
        except RecordError as exc:
            raise RecordError(f"{exc}; nothing was written") from None
        if not isinstance(data, dict):
            raise RecordError(f"{path}: not a result record; nothing was written")
        upgraded = upgrade(data, source=str(path))
        if upgraded is None:
            report.current.append(path)
        else:
            pending.append((path, file_bytes(upgraded, path)))
    for path, content in pending:
        write_atomically(path, content, overwrite=True)
        report.upgraded.append(path)
    return report
