"""The result record: one dataclass, one JSON Schema, one file per run, written atomically."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import lzma
import math
import os
import platform
import re
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jsonschema

from benchmark.kernel.cache import probe_writable
from benchmark.kernel.errors import BenchmarkError, ConfigError
from benchmark.kernel.leftovers import temp_prefix
from benchmark.kernel.version import __version__
from benchmark.pipeline.privacy_metrics import BootstrapSpec, PrivacyMetrics, TprAtFpr, privacy_metrics

SCHEMA_VERSION = 2
# Temporary record files are `.tmp-<host>-<pid>-*` (benchmark.kernel.leftovers sweeps dead writers' ones).
TEMP_TAG = "tmp"
SCHEMA_PATH = Path(__file__).parent / "schema" / "result.schema.json"
# A real record is 60-95 KB; a larger file is refused unread (a 109 MB one took the leaderboard from 1 s
# to 84 s and 955 MB).
MAX_RECORD_BYTES = 16 * 1024 * 1024
# Real records nest 8 deep; free-form component details get room, a hostile file does not.
MAX_NESTING = 64
# Stored figures must equal those recomputed from the stored per-query evidence to within this.
CONSISTENCY_TOLERANCE = 1e-9
# A compacted record (`python -m benchmark compact`): the record's exact bytes as one xz stream,
# readable by `xz -d`. xz, not gzip: 16 KB for a 160-query record against gzip's 22 KB, which
# decides whether 1,200 reference records fit in 25 MB; decoding one takes about 1 ms.
COMPACT_SUFFIX = ".json.xz"
RECORD_SUFFIXES = (".json", COMPACT_SUFFIX)
# Preset 9 packs a record no smaller (they are far under the 8 MiB dictionary of preset 6).
XZ_PRESET = 6
# Decoder memory follows the dictionary size in the stream's header, which a hostile file sets
# (up to 4 GiB); `xz -9` needs 65 MiB, our preset 9 MiB.
XZ_MEMORY_LIMIT = 80 * 1024 * 1024


class RecordError(BenchmarkError):
    """A result file that is unreadable or does not match the schema."""


def _interval(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _rest(data: dict[str, Any], typed: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in typed}


def tpr_from_dict(data: dict[str, Any]) -> TprAtFpr:
    return TprAtFpr(
        target_fpr=float(data["target_fpr"]),
        tpr=float(data["tpr"]),
        realised_fpr=float(data["realised_fpr"]),
        threshold=float(data["threshold"]),
        n_nonmembers=int(data["n_nonmembers"]),
        supported=bool(data["supported"]),
        ci=_interval(data.get("ci")),
    )


def privacy_from_dict(data: dict[str, Any]) -> PrivacyMetrics:
    """The reader of `PrivacyMetrics.to_dict()` (the record's privacy, control, baseline and shadow fit)."""
    bootstrap = data.get("bootstrap")
    balanced = data["balanced_accuracy"]
    return PrivacyMetrics(
        auc=float(data["auc"]),
        balanced_accuracy=None if balanced is None else float(balanced),
        tpr_at_fpr=tuple(tpr_from_dict(t) for t in data["tpr_at_fpr"]),
        n_members=int(data["n_members"]),
        n_nonmembers=int(data["n_nonmembers"]),
        auc_ci=_interval(data.get("auc_ci")),
        balanced_accuracy_ci=_interval(data.get("balanced_accuracy_ci")),
        bootstrap=None if bootstrap is None else BootstrapSpec(**bootstrap),
    )


@dataclass(frozen=True)
class ComponentRecord:
    """One component of the run: who supplied which version, and its own free-form description.

    `details` is the component's `describe()` less the typed fields; its shape
    belongs to the component (a plugin's is its own).
    """

    name: str
    version: str
    origin: str
    # Whether the component was loaded from the cache (None: not a cached component).
    from_cache: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    TYPED: ClassVar[tuple[str, ...]] = ("name", "version", "origin", "from_cache")

    @classmethod
    def from_description(
        cls, described: dict[str, Any], *, origin: str, version: str | None = None, from_cache: bool | None = None
    ) -> ComponentRecord:
        """From a component's `describe()`: `version` (the class's) wins over a described one."""
        chosen = version if version is not None else described.get("version", "1")
        return cls(
            name=str(described["name"]),
            version=str(chosen),
            origin=origin,
            from_cache=from_cache,
            details=_rest(described, cls.TYPED),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentRecord:
        cached = data.get("from_cache")
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            origin=str(data["origin"]),
            from_cache=None if cached is None else bool(cached),
            details=dict(data.get("details") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "origin": self.origin,
            "from_cache": self.from_cache,
            "details": self.details,
        }

    @property
    def label(self) -> str:
        """`dpsgd.eps8`, `dpsgd.eps8+lora.r4`, or the name with a config digest for a non-preset configuration."""
        return component_label({**self.details, "name": self.name})


def component_label(described: dict[str, Any]) -> str:
    """The label of a described component (its `preset`, the presets of its parts, or a config digest)."""
    name = str(described["name"])
    parts = described.get("components")
    if isinstance(parts, list) and parts and all(isinstance(p, dict) and p.get("preset") for p in parts):
        return "+".join(sorted(component_label(p) for p in parts))
    preset = described.get("preset")
    if preset:
        # Records name the full preset (`dpsgd.eps8`); a bare tag gets its component's name.
        preset = str(preset)
        return preset if preset.startswith(f"{name}.") else f"{name}.{preset}"
    config = described.get("config") or {}
    if config:
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
        return f"{name} (config {digest})"
    return name


@dataclass(frozen=True)
class Network:
    """A reference network of the utility protocol, named by its weights."""

    name: str
    weights_sha256: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        return cls(str(data["name"]), str(data["weights_sha256"]), dict(data.get("details") or {}))

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> Network:
        return cls(str(data["name"]), str(data["weights_sha256"]), _rest(data, ("name", "weights_sha256")))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "details": self.details}


@dataclass(frozen=True)
class UtilityFigures:
    """FID, KID (mean, std) and CLIP score of one model under the utility protocol."""

    fid: float
    kid_mean: float
    kid_std: float
    clip_score: float

    HIGHER_IS_BETTER: ClassVar[dict[str, bool]] = {
        "fid": False,
        "kid_mean": False,
        "kid_std": False,
        "clip_score": True,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UtilityFigures:
        return cls(*(float(data[k]) for k in ("fid", "kid_mean", "kid_std", "clip_score")))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class UtilityRecord:
    """The target's utility, the networks and counts behind it, and the base model's as a control."""

    feature_network: Network
    clip_model: Network
    n_real: int
    n_generated: int
    kid_subset_size: int
    kid_subsets: int
    seed: int
    target: UtilityFigures
    # The same protocol on the base model before fine-tuning.
    base_model: UtilityFigures | None = None
    # Free-form: the generation settings and notes.
    details: dict[str, Any] = field(default_factory=dict)

    COUNTS: ClassVar[tuple[str, ...]] = ("n_real", "n_generated", "kid_subset_size", "kid_subsets", "seed")

    @property
    def intervals(self) -> dict[str, tuple[float, float]]:
        """95% bootstrap interval over captions of fid, kid_mean and clip_score (empty for older records)."""
        return {k: (float(v[0]), float(v[1])) for k, v in (self.details.get("intervals") or {}).items()}

    @property
    def vs_base_model(self) -> dict[str, dict[str, float]]:
        """target - base model per figure: difference, low, high, p_value (paired bootstrap; empty if none)."""
        return {k: {f: float(x) for f, x in v.items()} for k, v in (self.details.get("vs_base_model") or {}).items()}

    @classmethod
    def from_measurement(cls, data: dict[str, Any]) -> UtilityRecord:
        """From the utility stage's flat report (`UtilityResult.details`)."""
        typed = ("feature_network", "clip_model", *cls.COUNTS, *UtilityFigures.HIGHER_IS_BETTER, "base_model")
        base = data.get("base_model")
        return cls(
            feature_network=Network.from_description(data["feature_network"]),
            clip_model=Network.from_description(data["clip_model"]),
            **{k: int(data[k]) for k in cls.COUNTS},
            target=UtilityFigures.from_dict(data),
            base_model=None if base is None else UtilityFigures.from_dict(base),
            details=_rest(data, typed),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UtilityRecord:
        base = data.get("base_model")
        return cls(
            feature_network=Network.from_dict(data["feature_network"]),
            clip_model=Network.from_dict(data["clip_model"]),
            **{k: int(data[k]) for k in cls.COUNTS},
            target=UtilityFigures.from_dict(data["target"]),
            base_model=None if base is None else UtilityFigures.from_dict(base),
            details=dict(data.get("details") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_network": self.feature_network.to_dict(),
            "clip_model": self.clip_model.to_dict(),
            **{k: getattr(self, k) for k in self.COUNTS},
            "target": self.target.to_dict(),
            "base_model": None if self.base_model is None else self.base_model.to_dict(),
            "details": self.details,
        }


@dataclass(frozen=True)
class TrainingRecord:
    """The fine-tuning reports of the target and the shadow (free-form: their shape belongs to the defense)."""

    target: dict[str, Any]
    shadow: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecord:
        return cls(target=dict(data["target"]), shadow=dict(data["shadow"]))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "shadow": self.shadow}

    @property
    def epsilon(self) -> float | None:
        """The DP budget the target's defense spent, where it has one."""
        return find_epsilon(self.target.get("defense_details"))


@dataclass(frozen=True)
class AttackRecord:
    """The attack's configuration, what it spent, and its per-query evidence."""

    scenario: str
    attack_model: str
    encoder: str
    distance: str
    generations_per_query: int
    query_access: str
    strength: float | None
    seed: int
    caption_source: str
    captioner_fine_tuned: bool | None
    caption_exact_match: dict[str, float] | None
    shadow_mode: str
    shadow_defense: str
    defense_aware_shadow: bool
    queries_spent: int
    images_generated: int
    images_per_second: float
    model_time_fraction: float
    query_batch: int
    shadow_queries_spent: int
    shadow_overlap_with_target_members: int
    query_ids: list[str]
    captions: list[str]
    labels: list[int]
    scores: list[list[float]]
    membership_scores: list[float]
    predictions: list[int]
    # The attack model applied to its own fit data (the shadow): a diagnostic, not a result.
    shadow_fit: PrivacyMetrics
    roc_plot: str | None = None
    # The attack family (`attacks.families`); a record written before families existed is
    # Pang & Wang's black-box attack and carries none of the fields below.
    family: str = "pang-wang"
    family_version: str | None = None
    access: str | None = None
    hyperparameters: dict[str, Any] | None = None
    # {"images_generated": ..., "unet_calls": ...} for one query on one model.
    cost_per_query: dict[str, int] | None = None
    unet_calls: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttackRecord:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        values["shadow_fit"] = privacy_from_dict(data["shadow_fit"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["shadow_fit"] = self.shadow_fit.to_dict()
        return out


@dataclass(frozen=True)
class Figure:
    """One figure for display: where it lives in the record, its value and direction."""

    name: str
    value: float | None
    higher_is_better: bool
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
    # What else moves results between machines (None in records written before these were kept):
    # torch's intra-op and inter-op thread counts, the processor model, and whether torch was
    # restricted to deterministic algorithms.
    threads: int | None = None
    interop_threads: int | None = None
    processor: str | None = None
    deterministic_algorithms: bool | None = None
    # Where and how the networks ran (None in records written before devices were chosen):
    # the device ("cpu", "cuda:0"), its name (the GPU model), the autocast precision and
    # whether UNet activations were recomputed.
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    gradient_checkpointing: bool | None = None


@dataclass
class ResultRecord:
    """Everything needed to audit, recompute or reproduce one run.

    Each figure has one home: the attack on the target (`privacy`), the same
    attack on the base model (`control`), the model-free baseline (`baseline`),
    and the utility (`utility`); directions are `PrivacyMetrics.HIGHER_IS_BETTER`
    and `UtilityFigures.HIGHER_IS_BETTER`.
    """

    run_id: str
    provenance: Provenance
    seeds: dict[str, int]
    config: dict[str, Any]
    components: dict[str, ComponentRecord]
    splits: dict[str, list[str]]
    training: TrainingRecord
    attack: AttackRecord
    privacy: PrivacyMetrics
    timings_s: dict[str, float]
    peak_memory_mb: float
    control: PrivacyMetrics | None = None
    # Peak accelerator memory per stage (MB); None on the CPU, where `peak_memory_mb` says it all.
    accelerator_memory_mb: dict[str, float] | None = None
    # The model-free baseline: the same attack model on query-image features alone.
    baseline: PrivacyMetrics | None = None
    # FID, KID and CLIP score of the target, with the feature network and sample counts.
    utility: UtilityRecord | None = None
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def dataset(self) -> str:
        return self.components["dataset"].name

    @property
    def scenario(self) -> str:
        return self.attack.scenario

    @property
    def defense(self) -> str:
        return self.components["defense"].name

    def figures(self) -> list[Figure]:
        """The headline figures, each read from its home, with its direction from the home's type."""
        out: list[Figure] = []
        for home, privacy in (("privacy", self.privacy), ("control", self.control), ("baseline", self.baseline)):
            if privacy is None:
                continue
            better = PrivacyMetrics.HIGHER_IS_BETTER
            out.append(Figure(f"{home}.auc", privacy.auc, better["auc"], privacy.auc_ci))
            if home != "privacy":
                continue
            for t in privacy.tpr_at_fpr:
                out.append(Figure(f"privacy.tpr@fpr={t.target_fpr:g}", t.tpr, better["tpr"], t.ci))
            out.append(
                Figure(
                    "privacy.balanced_accuracy",
                    privacy.balanced_accuracy,
                    better["balanced_accuracy"],
                    privacy.balanced_accuracy_ci,
                )
            )
        if self.utility is not None:
            for home, figures in (("utility", self.utility.target), ("utility.base_model", self.utility.base_model)):
                if figures is None:
                    continue
                for name, better_up in UtilityFigures.HIGHER_IS_BETTER.items():
                    out.append(Figure(f"{home}.{name}", getattr(figures, name), better_up))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "provenance": dataclasses.asdict(self.provenance),
            "seeds": self.seeds,
            "config": self.config,
            "components": {name: c.to_dict() for name, c in self.components.items()},
            "splits": self.splits,
            "training": self.training.to_dict(),
            "attack": self.attack.to_dict(),
            "privacy": self.privacy.to_dict(),
            "timings_s": self.timings_s,
            "peak_memory_mb": self.peak_memory_mb,
            **({} if self.accelerator_memory_mb is None else {"accelerator_memory_mb": self.accelerator_memory_mb}),
            "control": None if self.control is None else self.control.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "utility": None if self.utility is None else self.utility.to_dict(),
            "notes": self.notes,
            "schema_version": self.schema_version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "record") -> ResultRecord:
        """The one reader of a record: validated against the schema, typed, then checked for consistency.

        Raises:
            RecordError: the data is not a valid record of this schema version, or its
                figures disagree with its own per-query evidence (`check_consistency`).
        """
        data = validate(data, source=source)
        control, baseline, utility = data.get("control"), data.get("baseline"), data.get("utility")
        record = cls(
            run_id=data["run_id"],
            provenance=Provenance(**{"platform": "", **data["provenance"]}),
            seeds=dict(data["seeds"]),
            config=dict(data["config"]),
            components={name: ComponentRecord.from_dict(c) for name, c in data["components"].items()},
            splits={name: list(ids) for name, ids in data["splits"].items()},
            training=TrainingRecord.from_dict(data["training"]),
            attack=AttackRecord.from_dict(data["attack"]),
            privacy=privacy_from_dict(data["privacy"]),
            timings_s=dict(data["timings_s"]),
            peak_memory_mb=data["peak_memory_mb"],
            accelerator_memory_mb=data.get("accelerator_memory_mb"),
            control=None if control is None else privacy_from_dict(control),
            baseline=None if baseline is None else privacy_from_dict(baseline),
            utility=None if utility is None else UtilityRecord.from_dict(utility),
            notes=list(data.get("notes") or []),
            schema_version=data["schema_version"],
        )
        check_consistency(record, source=source)
        return record


def check_consistency(record: ResultRecord, *, source: str = "record") -> None:
    """Refuse a record that says two things: its privacy figures must follow from its per-query evidence.

    AUC, balanced accuracy, the member and non-member counts and each TPR at FPR
    (with its realised FPR, threshold and support) are recomputed from the stored
    `attack.labels`, `attack.membership_scores` and `attack.predictions` and must
    agree within `CONSISTENCY_TOLERANCE`; the bootstrap intervals are not
    recomputed (too slow for a reader). The control and the baseline store no
    per-query scores of their own, so only their member and non-member counts are
    checked against the labels they were computed on.

    Raises:
        RecordError: naming the field, its stored and its recomputed value.
    """
    attack, privacy = record.attack, record.privacy
    lengths = {
        "labels": len(attack.labels),
        "membership_scores": len(attack.membership_scores),
        "predictions": len(attack.predictions),
        "query_ids": len(attack.query_ids),
    }
    if len(set(lengths.values())) != 1:
        counts = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise RecordError(f"{source}: attack: per-query lists differ in length ({counts}); the record is corrupt")
    try:
        fresh = privacy_metrics(
            attack.labels,
            attack.membership_scores,
            attack.predictions,
            fprs=tuple(t.target_fpr for t in privacy.tpr_at_fpr),
            bootstrap=None,
        )
    except ValueError as exc:
        raise RecordError(f"{source}: attack: cannot recompute the privacy figures ({exc})") from None
    pairs: list[tuple[str, object, object]] = [
        ("privacy/auc", privacy.auc, fresh.auc),
        ("privacy/balanced_accuracy", privacy.balanced_accuracy, fresh.balanced_accuracy),
        ("privacy/n_members", privacy.n_members, fresh.n_members),
        ("privacy/n_nonmembers", privacy.n_nonmembers, fresh.n_nonmembers),
    ]
    for i, (stored, again) in enumerate(zip(privacy.tpr_at_fpr, fresh.tpr_at_fpr, strict=True)):
        for name in ("tpr", "realised_fpr", "threshold", "n_nonmembers", "supported"):
            pairs.append((f"privacy/tpr_at_fpr/{i}/{name}", getattr(stored, name), getattr(again, name)))
    for home, other in (("control", record.control), ("baseline", record.baseline)):
        if other is not None:
            pairs.append((f"{home}/n_members", other.n_members, fresh.n_members))
            pairs.append((f"{home}/n_nonmembers", other.n_nonmembers, fresh.n_nonmembers))
    for where, stored, again in pairs:
        if not _agrees(stored, again):
            raise RecordError(
                f"{source}: field {where} is stored as {stored!r} but its per-query scores give {again!r}; "
                "the record contradicts itself"
            )


def _agrees(stored: object, again: object) -> bool:
    if isinstance(stored, float) and isinstance(again, float):
        return math.isclose(stored, again, rel_tol=CONSISTENCY_TOLERANCE, abs_tol=CONSISTENCY_TOLERANCE)
    return stored == again and type(stored) is type(again)


def new_run_id(defense: str, seed: int) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{_safe(defense)}-s{seed}-{uuid.uuid4().hex[:6]}"


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", part) or "_"


def provenance(
    libraries: tuple[str, ...] = ("torch", "diffusers", "transformers", "numpy", "scikit-learn"),
    *,
    compute: dict[str, object] | None = None,
) -> Provenance:
    """Where a record was made; `compute` is `Compute.describe()` of the run (device, precision)."""
    from importlib import metadata

    import torch  # here, not at the top: reading records (the leaderboard) must not load torch

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
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        processor=processor_model(),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        **(compute or {}),  # type: ignore[arg-type]
    )


@lru_cache(maxsize=1)
def processor_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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


@lru_cache(maxsize=1)
def _validator() -> Any:
    # Built once: `jsonschema.validate` re-checks the schema itself on every call, which was most
    # of the time spent reading a folder of records.
    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


def validate(data: object, *, source: str = "record") -> dict[str, Any]:
    """Check `data` against the result schema.

    Raises:
        RecordError: naming the file, the failing field and what to do.
    """
    if not isinstance(data, dict):
        raise RecordError(f"{source}: a result record must be a JSON object")
    if _deeper_than(data, MAX_NESTING):
        raise RecordError(f"{source}: nested deeper than {MAX_NESTING} levels; not a result record")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = (
            "upgrade it with `python -m benchmark migrate FOLDER`"
            if isinstance(version, int) and 0 < version < SCHEMA_VERSION
            else "re-run the benchmark to produce a current record"
        )
        raise RecordError(
            f"{source}: schema_version {version!r} is not supported (this version reads {SCHEMA_VERSION}); {hint}"
        )
    where = _non_finite(data)
    if where is not None:
        raise RecordError(f"{source}: field {where or '(top level)'}: NaN or infinite numbers are not allowed")
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise RecordError(f"{source}: field {where}: {error.message}")
    return data


def _deeper_than(value: object, limit: int) -> bool:
    """Whether `value` nests more than `limit` containers deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Any = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _non_finite(value: object, path: str = "") -> str | None:
    """The path of the first NaN or infinite number in `value` (JSON Schema's `number` admits them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _non_finite(child, f"{path}/{key}" if path else str(key))
        if found is not None:
            return found
    return None


def encode(data: dict[str, Any]) -> str:
    """A record's file text: indented objects, each list of plain values on one line.

    Strict JSON: NaN and infinities raise ValueError. Long lists (ids, scores,
    losses) one value per line would make a record mostly whitespace.
    """
    return _encode(data, 0) + "\n"


def _encode(value: Any, level: int) -> str:
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_encode(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = [f"{inner}{_encode(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value, allow_nan=False)


def record_path(results_dir: Path, record: ResultRecord) -> Path:
    """Where a record goes: `<dataset>/<scenario>/<defense>/<run-id>-<attack>-<attack model>-<access>.json`.

    The name tells the records of one run apart (one per attack, attack model and
    access: `black-box`, `black-box-img2img`, `gray-box`) without opening them.
    Readers never rely on it: the leaderboard and the suite read every record file
    (`record_files`) by content, so files named `<run-id>.json` by earlier versions are
    read the same way.
    """
    attack = record.attack
    access = attack.access or attack.query_access
    name = "-".join(_safe(part) for part in (record.run_id, attack.family, attack.attack_model, access))
    return Path(results_dir) / _safe(record.dataset) / _safe(record.scenario) / _safe(record.defense) / f"{name}.json"


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
    try:
        probe_writable(Path(results_dir))
    except OSError as exc:
        raise ConfigError(
            f"results folder {results_dir} is not writable ({exc.strerror or exc}); pass a writable --results-dir"
        ) from None


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
    except OSError as exc:
        raise RecordError(f"cannot write results under {results_dir}: {exc}; pass a writable --results-dir") from exc
    write_atomically(path, encode(data).encode())
    return path


def write_atomically(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write `data` to `path` through a temporary file: readers see the old file or the new one, whole.

    Without `overwrite` the file must be new (a result is never silently replaced).

    Raises:
        RecordError: the file exists (without `overwrite`) or cannot be written.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(TEMP_TAG), suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}; pass a writable --results-dir") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name exists: a result is never silently replaced.
            os.link(tmp, path)
    except FileExistsError:
        raise RecordError(f"{path} already exists; results are never overwritten") from None
    except OSError as exc:
        raise RecordError(f"cannot write {path}: {exc}; pass a writable --results-dir") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def attachment_name(run_id: str, suffix: str) -> str:
    """File name of a run's attachment (e.g. its ROC plot), stored next to its record."""
    return f"{_safe(run_id)}{suffix}"


def write_attachment(record_file: Path, run_id: str, suffix: str, data: bytes) -> Path:
    """Write `data` atomically next to `record_file`; never overwrite.

    Raises:
        RecordError: the file exists or cannot be written.
    """
    path = Path(record_file).parent / attachment_name(run_id, suffix)
    write_atomically(path, data)
    return path


def read_file(path: Path, *, source: str | None = None, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is refused unread.

    The one safe way to read a results folder: a FIFO named `*.json` would block
    forever and a link to a device would read until memory runs out, so only
    regular files (after following links) are opened, without blocking, and at
    most `limit` + 1 bytes are read.

    Raises:
        RecordError: the file is missing, not a regular file, larger than `limit`, or unreadable.
    """
    source = str(path) if source is None else source
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise RecordError(f"{source}: not a regular file; only regular record files are read")
        if info.st_size > limit:
            raise RecordError(f"{source}: {info.st_size} bytes, over the {limit}-byte limit for a record")
        # Non-blocking: if the name was swapped for a FIFO since the stat, opening it must not wait.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except RecordError:
        raise
    except OSError as exc:
        raise RecordError(f"{source}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError(f"{source}: not a regular file; only regular record files are read")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise RecordError(f"{source}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        os.close(fd)
    if size > limit:
        raise RecordError(f"{source}: over the {limit}-byte limit for a record")
    return b"".join(chunks)


def parse_json(raw: bytes, *, source: str) -> object:
    """JSON from a file's bytes (UTF-8); `validate` then refuses NaN, infinities and deep nesting.

    Raises:
        RecordError: naming what is wrong.
    """
    corrupt = "the file is corrupt: delete it and re-run that configuration"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError(f"{source}: not UTF-8 text; {corrupt}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno}); {corrupt}") from None
    except RecursionError:
        raise RecordError(f"{source}: nested deeper than {MAX_NESTING} levels; not a result record") from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        raise RecordError(f"{source}: not valid JSON ({exc}); {corrupt}") from None


def is_compact(path: Path) -> bool:
    """Whether `path` names a compacted record (`*.json.xz`)."""
    return Path(path).name.endswith(COMPACT_SUFFIX)


def record_files(folder: Path) -> list[Path]:
    """Every record file under `folder`, plain (`*.json`) or compacted (`*.json.xz`), by relative path.

    Hidden names (the temporary files of writes in progress) and folders are left
    out; anything else so named (a FIFO, a link to a device) is listed, for the
    reader to refuse with its reason. Where an interrupted `compact` left both
    `X.json` and `X.json.xz`, only `X.json` is listed, so no record is read twice.
    """
    folder = Path(folder)
    found = {
        p
        for suffix in RECORD_SUFFIXES
        for p in folder.rglob(f"*{suffix}")
        if not p.name.startswith(".") and not p.is_dir()
    }
    once = (p for p in found if not (is_compact(p) and plain_name(p) in found))
    return sorted(once, key=lambda p: p.relative_to(folder).as_posix())


def plain_name(path: Path) -> Path:
    """`X.json` for a compacted `X.json.xz` (and `path` itself for a plain record)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".xz")) if is_compact(path) else path


def compact_name(path: Path) -> Path:
    """`X.json.xz` for a plain `X.json` (and `path` itself for a compacted record)."""
    path = Path(path)
    return path if is_compact(path) else path.with_name(path.name + ".xz")


def compress(raw: bytes) -> bytes:
    """`raw` as one xz stream: the same bytes give the same stream (xz stores no time or name)."""
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def decompress(raw: bytes, *, source: str, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of one xz stream, at most `limit` of them: a compacted record is held to a plain one's limit.

    Raises:
        RecordError: naming the file: not xz, corrupt or truncated (xz checks a CRC64),
            trailing bytes, over `limit` once decompressed, or a header asking for more
            than `XZ_MEMORY_LIMIT` of memory.
    """
    corrupt = "the file is corrupt: delete it and re-run that configuration"
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
    try:
        # max_length bounds the output, so a small bomb never expands past the limit in memory.
        out = decoder.decompress(raw, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise RecordError(f"{source}: not a readable xz-compressed record ({exc}); {corrupt}") from None
    if len(out) > limit:
        raise RecordError(f"{source}: over the {limit}-byte limit for a record once decompressed")
    if not decoder.eof:
        raise RecordError(f"{source}: the compressed record is truncated; {corrupt}")
    if decoder.unused_data:
        raise RecordError(f"{source}: bytes after the end of the compressed record; {corrupt}")
    return out


def read_record_bytes(path: Path, *, source: str | None = None) -> bytes:
    """The JSON bytes of a record file, plain or compacted; both within `MAX_RECORD_BYTES`.

    Raises:
        RecordError: as `read_file`, or for a compacted record as `decompress`.
    """
    source = str(path) if source is None else source
    raw = read_file(Path(path), source=source)
    return decompress(raw, source=source) if is_compact(path) else raw


def file_bytes(data: dict[str, Any], path: Path) -> bytes:
    """What the record file at `path` holds for `data`: `encode`d, compressed when `path` is compacted."""
    raw = encode(data).encode()
    return compress(raw) if is_compact(path) else raw


def load_record(path: Path, *, source: str | None = None) -> dict[str, Any]:
    """Read (`read_record_bytes`: plain or compacted, within `MAX_RECORD_BYTES`) and validate one result file.

    JSON only; nothing is unpickled.

    Raises:
        RecordError: the file is unreadable, not a record, or invalid.
    """
    source = str(path) if source is None else source
    return validate(parse_json(read_record_bytes(path, source=source), source=source), source=source)


def read_record(path: Path, *, source: str | None = None) -> ResultRecord:
    """Read, validate, type and check one result file: the reader of the leaderboard, the suite and `reproduce`.

    Raises:
        RecordError: as `load_record`, or the record contradicts its own evidence (`check_consistency`).
    """
    source = str(path) if source is None else source
    # from_dict validates: reading through load_record would validate twice.
    return ResultRecord.from_dict(parse_json(read_record_bytes(path, source=source), source=source), source=source)
