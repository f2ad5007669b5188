"""Result records as a pandas DataFrame: one row per record, for analysis outside the leaderboard.

Records are read by the one typed reader (`benchmark.pipeline.records.read_record`,
through `leaderboard.build.read_records`), so a row holds only what a valid,
self-consistent record says. Column names follow the record's own structure:

- `path`, `run_id`, `dataset`, `scenario`, `defense` (the preset label, e.g.
  `dpsgd.eps8+lora.r4`), `attack_model`, `query_access`, `seed`, `epsilon`;
- each headline figure under its home in the record (`privacy.auc`,
  `privacy.tpr@fpr=0.01`, `privacy.balanced_accuracy`, `control.auc`,
  `baseline.auc`, `utility.fid`, `utility.base_model.clip_score`, ...), with
  `<figure>.ci_low` / `<figure>.ci_high` where the record holds an interval;
- `privacy.n_members`, `privacy.n_nonmembers`, and per low FPR
  `privacy.tpr@fpr=<f>.n_nonmembers` / `.supported`;
- `utility.feature_network` and `utility.feature_network_sha256`;
- `component.<kind>.name|version|origin|label` for every component;
- `config.<setting>` (nested settings joined with dots), `seeds.<name>`,
  `timings_s.<stage>`, `peak_memory_mb`, `provenance.<field>`.

Lists in the configuration are JSON text, so every cell is a scalar and the
frame writes to CSV, parquet and JSON lines alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.pipeline.records import ResultRecord
from benchmark.pipeline.statistics import Difference, Estimate
from leaderboard.build import LeaderboardError, Skipped, collect, headlines, read_records
from leaderboard.ranking import Headline

# The columns that say which cell a row is, first and in this order.
KEY_COLUMNS = ("path", "run_id", "dataset", "scenario", "defense", "attack_model", "query_access", "seed", "epsilon")
SKIPPED_ATTR = "skipped"
FORMATS = ("csv", "parquet", "jsonl")


def load_results(results_dir: Path | str) -> pd.DataFrame:
    """Every valid record under `results_dir` as one row, sorted by path.

    Invalid files (corrupt, foreign, another schema version, figures that
    contradict their own scores) are skipped as the leaderboard build skips
    them; `frame.attrs["skipped"]` lists them as `{"path": ..., "reason": ...}`.

    Raises:
        LeaderboardError: the folder does not exist.
    """
    records, skipped = read_records(Path(results_dir))
    rows = [record_row(rel, record) for rel, record in records]
    columns = list(KEY_COLUMNS) + sorted({name for row in rows for name in row} - set(KEY_COLUMNS))
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs[SKIPPED_ATTR] = [{"path": s.path, "reason": s.reason} for s in skipped]
    return frame


def load_headline(results_dir: Path | str) -> pd.DataFrame:
    """The leaderboard's headline as a DataFrame: every defense ranked by its worst-case attack AUC.

    One row per dataset, feature network and defense, in rank order, with the columns of
    `headline_frame`. Invalid files are skipped as `load_results` skips them.

    Raises:
        LeaderboardError: the folder does not exist.
    """
    entries, skipped = collect(Path(results_dir))
    frame = headline_frame(headlines(entries))
    frame.attrs[SKIPPED_ATTR] = [{"path": s.path, "reason": s.reason} for s in skipped]
    return frame


def headline_frame(found: list[Headline]) -> pd.DataFrame:
    """Headlines as one flat DataFrame.

    Columns: `dataset`, `utility.feature_network`, `utility.feature_network_sha256`,
    `rank`, `defense`, `cell`, `pareto`, `tpr.supported`, `tpr.n_nonmembers`; for each
    estimate (`auc`, `tpr@fpr=0.01`, `utility.fid`, `utility.kid`, `utility.clip_score`)
    `<name>`, `.ci_low`, `.ci_high`, `.n_seeds`, `.n_queries`, `.method`; and the test
    against the defense ranked just above as `versus_above.value|ci_low|ci_high|p_value|n_seeds|method`.
    """
    rows = []
    for h in found:
        for r in h.rows:
            row: dict[str, Any] = {
                "dataset": h.dataset,
                "utility.feature_network": h.utility_key[0],
                "utility.feature_network_sha256": h.utility_key[1],
                "rank": r.rank,
                "defense": r.defense,
                "cell": r.cell,
                "pareto": r.pareto,
                "tpr.supported": r.tpr_supported,
                "tpr.n_nonmembers": r.n_nonmembers,
            }
            for name, estimate in (
                ("auc", r.auc),
                ("tpr@fpr=0.01", r.tpr),
                ("utility.fid", r.fid),
                ("utility.kid", r.kid),
                ("utility.clip_score", r.clip),
            ):
                row.update(_estimate_columns(name, estimate))
            row.update(_difference_columns("versus_above", r.versus_above))
            rows.append(row)
    return pd.DataFrame(rows)


def _estimate_columns(name: str, estimate: Estimate | None) -> dict[str, Any]:
    if estimate is None:
        return dict.fromkeys((name, *(f"{name}.{k}" for k in ("ci_low", "ci_high", "n_seeds", "n_queries", "method"))))
    return {
        name: estimate.value,
        f"{name}.ci_low": estimate.low,
        f"{name}.ci_high": estimate.high,
        f"{name}.n_seeds": estimate.n_seeds,
        f"{name}.n_queries": estimate.n_queries,
        f"{name}.method": estimate.method,
    }


def _difference_columns(name: str, difference: Difference | None) -> dict[str, Any]:
    keys = ("value", "ci_low", "ci_high", "p_value", "n_seeds", "method")
    if difference is None:
        return dict.fromkeys(f"{name}.{k}" for k in keys)
    values = (
        difference.value,
        difference.low,
        difference.high,
        difference.p_value,
        difference.n_seeds,
        difference.method,
    )
    return {f"{name}.{k}": v for k, v in zip(keys, values, strict=True)}


def skipped_files(frame: pd.DataFrame) -> list[Skipped]:
    """The files `load_results` skipped, with their reasons."""
    return [Skipped(s["path"], s["reason"]) for s in frame.attrs.get(SKIPPED_ATTR, [])]


def record_row(path: str, record: ResultRecord) -> dict[str, Any]:
    """One record as a flat mapping of column name to scalar."""
    seeds = record.seeds
    row: dict[str, Any] = {
        "path": path,
        "run_id": record.run_id,
        "dataset": record.dataset,
        "scenario": record.scenario,
        "defense": record.components["defense"].label,
        "attack_model": record.attack.attack_model,
        "query_access": record.attack.query_access,
        "seed": int(seeds.get("seed", min(seeds.values()) if seeds else 0)),
        "epsilon": record.training.epsilon,
    }
    for figure in record.figures():
        row[figure.name] = figure.value
        if figure.ci is not None:
            row[f"{figure.name}.ci_low"], row[f"{figure.name}.ci_high"] = figure.ci
    row["privacy.n_members"] = record.privacy.n_members
    row["privacy.n_nonmembers"] = record.privacy.n_nonmembers
    for t in record.privacy.tpr_at_fpr:
        row[f"privacy.tpr@fpr={t.target_fpr:g}.n_nonmembers"] = t.n_nonmembers
        row[f"privacy.tpr@fpr={t.target_fpr:g}.supported"] = t.supported
    if record.utility is not None:
        row["utility.feature_network"] = record.utility.feature_network.name
        row["utility.feature_network_sha256"] = record.utility.feature_network.weights_sha256
    for kind, component in record.components.items():
        prefix = f"component.{kind}"
        row[f"{prefix}.name"] = component.name
        row[f"{prefix}.version"] = component.version
        row[f"{prefix}.origin"] = component.origin
        row[f"{prefix}.label"] = component.label
    row.update(_flatten(record.config, "config"))
    row.update(_flatten(record.seeds, "seeds"))
    row.update(_flatten(record.timings_s, "timings_s"))
    row["peak_memory_mb"] = record.peak_memory_mb
    for name in ("package_version", "git_commit", "created", "python"):
        row[f"provenance.{name}"] = getattr(record.provenance, name)
    row["schema_version"] = record.schema_version
    return row


def _flatten(data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), sort_keys=True)
        else:
            out[name] = value
    return out


def export(frame: pd.DataFrame, output: Path, fmt: str) -> None:
    """Write `frame` to `output` as csv, parquet or jsonl (one JSON object per line).

    Raises:
        LeaderboardError: an unknown format, parquet without pyarrow, or an output that cannot be written.
    """
    if fmt not in FORMATS:
        raise LeaderboardError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (pandas' parquet engine; an optional dependency)
        except ImportError:
            raise LeaderboardError(
                "--format parquet needs pyarrow: `pip install pyarrow` (or choose --format csv or jsonl)"
            ) from None
    output = Path(output)
    try:
        if output.is_dir():
            raise IsADirectoryError(f"{output} is a folder")
        if fmt == "csv":
            frame.to_csv(output, index=False)
        elif fmt == "parquet":
            frame.to_parquet(output, index=False)
        else:
            frame.to_json(output, orient="records", lines=True)
    except OSError as exc:
        raise LeaderboardError(f"cannot write {output}: {exc.strerror or exc}; pass a writable --output") from None
