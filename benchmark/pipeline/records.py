"""The result record: one dataclass, one JSON Schema, one file per run, written atomically."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from benchmark.kernel.errors import BenchmarkError, ConfigError
from benchmark.kernel.version import __version__

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "result.schema.json"


class RecordError(BenchmarkError):
    """A result file that is unreadable or does not match the schema."""


@dataclass(frozen=True)
class Metric:
    """A number with its direction, from the model owner's point of view."""

    value: float | None
    higher_is_better: bool
    description: str = ""
    # 95% bootstrap interval (low, high), where the figure has one.
    ci: tuple[float, float] | None = None


@dataclass
class Provenance:
    package: str
    package_version: str
    git_commit: str | None
    created: str
    python: str
    platform: str
    libraries: dict[str, str]


@dataclass
class ResultRecord:
    """Everything needed to audit, recompute or reproduce one run."""

    run_id: str
    provenance: Provenance
    seeds: dict[str, int]
    config: dict[str, Any]
    components: dict[str, dict[str, Any]]
    splits: dict[str, list[str]]
    training: dict[str, dict[str, Any]]
    attack: dict[str, Any]
    privacy: dict[str, Any]
    metrics: dict[str, Metric]
    timings_s: dict[str, float]
    peak_memory_mb: float
    control: dict[str, Any] | None = None
    # The model-free baseline: the same attack model on query-image features alone.
    baseline: dict[str, Any] | None = None
    # FID, KID and CLIP score of the target, with the feature network and sample counts.
    utility: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def dataset(self) -> str:
        return str(self.components["dataset"]["name"])

    @property
    def scenario(self) -> str:
        return str(self.attack["scenario"])

    @property
    def defense(self) -> str:
        return str(self.components["defense"]["name"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def new_run_id(defense: str, seed: int) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{_safe(defense)}-s{seed}-{uuid.uuid4().hex[:6]}"


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", part) or "_"


def provenance(
    libraries: tuple[str, ...] = ("torch", "diffusers", "transformers", "numpy", "scikit-learn"),
) -> Provenance:
    from importlib import metadata

    versions = {}
    for lib in libraries:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return Provenance(
        package="diffusion-mia-bench",
        package_version=__version__,
        git_commit=git_commit(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        platform=platform.platform(),
        libraries=versions,
    )


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit or None


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(data: object, *, source: str = "record") -> dict[str, Any]:
    """Check `data` against the result schema.

    Raises:
        RecordError: naming the file, the failing field and what to do.
    """
    if not isinstance(data, dict):
        raise RecordError(f"{source}: a result record must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{source}: schema_version {version!r} is not supported (this version reads "
            f"{SCHEMA_VERSION}); re-run the benchmark to produce a current record"
        )
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RecordError(f"{source}: field {where}: {exc.message}") from None
    return data


def record_path(results_dir: Path, record: ResultRecord) -> Path:
    return (
        Path(results_dir)
        / _safe(record.dataset)
        / _safe(record.scenario)
        / _safe(record.defense)
        / f"{_safe(record.run_id)}.json"
    )


def find_epsilon(details: Any) -> float | None:
    """The DP budget spent, from a training report's `defense_details` (nested for composed defenses)."""
    if isinstance(details, dict):
        value = details.get("epsilon")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        for key in sorted(details):
            found = find_epsilon(details[key])
            if found is not None:
                return found
    return None


def check_writable(results_dir: Path) -> None:
    """Fail before any training if the results folder cannot take records.

    Raises:
        ConfigError: naming the folder and the fix.
    """
    results_dir = Path(results_dir)
    # Folders made only for the probe are removed again: a check must leave nothing behind.
    missing = [p for p in (results_dir, *results_dir.parents) if not p.exists()]
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=results_dir):
            pass
    except OSError as exc:
        raise ConfigError(
            f"results folder {results_dir} is not writable ({exc.strerror or exc}); pass a writable --results-dir"
        ) from None
    finally:
        for folder in missing:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                pass


def write_record(record: ResultRecord, results_dir: Path) -> Path:
    """Validate, then write a new file atomically; never overwrite or merge.

    Raises:
        RecordError: the record is invalid, the file already exists, or the folder is not writable.
    """
    try:
        data = validate(json.loads(json.dumps(record.to_dict(), allow_nan=False)))
    except ValueError as exc:
        raise RecordError(f"run {record.run_id}: a value is NaN or infinite ({exc}); nothing was written") from None
    path = record_path(results_dir, record)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    except OSError as exc:
        raise RecordError(f"cannot write results under {results_dir}: {exc}; pass a writable --results-dir") from exc
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        # link() fails if the name exists: a result is never silently replaced.
        os.link(tmp, path)
    except FileExistsError:
        raise RecordError(f"{path} already exists; results are never overwritten") from None
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}; pass a writable --results-dir") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def attachment_name(run_id: str, suffix: str) -> str:
    """File name of a run's attachment (e.g. its ROC plot), stored next to its record."""
    return f"{_safe(run_id)}{suffix}"


def write_attachment(record_file: Path, run_id: str, suffix: str, data: bytes) -> Path:
    """Write `data` atomically next to `record_file`; never overwrite.

    Raises:
        RecordError: the file exists or cannot be written.
    """
    path = Path(record_file).parent / attachment_name(run_id, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.link(tmp, path)
    except FileExistsError:
        raise RecordError(f"{path} already exists; results are never overwritten") from None
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_record(path: Path) -> dict[str, Any]:
    """Read and validate one result file (JSON only; nothing is unpickled)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is corrupt: "
            "delete it and re-run that configuration"
        ) from None
    return validate(data, source=str(path))
