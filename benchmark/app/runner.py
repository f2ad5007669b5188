"""One benchmark run, end to end: the pipeline of DESIGN.md in the order it happens.

data -> base model -> target fine-tune under a defense -> per scenario: shadow
fine-tune (cached), captioner (II/IV), black-box scoring of shadow and target ->
per attack model: fit on the shadow, apply once to the target -> privacy metrics
(with intervals, the base-model control and the model-free baseline) -> one
result record and its ROC plot per (scenario, attack model).

A matrix run (`run_matrix`) fine-tunes the target once, reuses each shadow model
wherever its inputs are identical, and scores every shadow and the target once
per distinct caption set: the three attack models share the same score vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from attacks.attack import (
    AttackConfig,
    ModelFreeBaseline,
    Query,
    ScoredQueries,
    caption_queries,
    fit_attack_model,
    image_features,
    score_queries,
)
from attacks.attack_models import ATTACK_MODELS
from attacks.captioners import CAPTIONERS, Captioner, CaptionerRequest, build_captioner
from attacks.encoders import ENCODERS, EncoderRequest, ImageEncoder, build_encoder
from attacks.scenarios import CaptionSource, QueryAccess, Scenario, ShadowMode
from attacks.training_data import TrainingData
from benchmark.app.config import RunConfig
from benchmark.kernel.cache import cache_key, cached
from benchmark.kernel.plugins import component_origin
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.data.base import DATASETS, DatasetSpec, ImageTextDataset, images_to_tensor
from benchmark.pipeline.data.splits import ShadowSplit, Splits, SplitSizes, make_splits, shadow_split
from benchmark.pipeline.finetune import TrainConfig, TrainReport
from benchmark.pipeline.models.diffusion import DiffusionModel, black_box, load_model
from benchmark.pipeline.models.registry import MODELS, BaseModel, BaseModelRequest
from benchmark.pipeline.plots import roc_plot_png
from benchmark.pipeline.privacy_metrics import BootstrapSpec, PrivacyMetrics, privacy_metrics
from benchmark.pipeline.records import (
    Metric,
    ResultRecord,
    attachment_name,
    check_writable,
    new_run_id,
    provenance,
    write_attachment,
    write_record,
)
from benchmark.pipeline.target import BlackBoxTarget
from benchmark.pipeline.utility_metrics import UtilityResult, measure_utility
from defenses import DEFENSES, Defense, resolve

ROC_SUFFIX = ".roc.png"


@dataclass
class RunOutcome:
    record: ResultRecord
    path: Path
    plot_path: Path | None = None


@dataclass
class FineTuned:
    model: DiffusionModel
    report: dict[str, Any]
    from_cache: bool


def run(config: RunConfig, *, console: Console | None = None, show_progress: bool = True) -> RunOutcome:
    """Run one configuration (one scenario, one attack model) and write its result record.

    Nothing is written unless every stage succeeds, so an interrupted or failed
    run leaves no partial result.
    """
    [outcome] = run_matrix(config, console=console, show_progress=show_progress)
    return outcome


def run_matrix(
    config: RunConfig,
    *,
    scenarios: Sequence[Scenario] | None = None,
    attack_models: Sequence[str] | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> list[RunOutcome]:
    """Run every (scenario, attack model) cell against one fine-tuned target; one record per cell.

    Every cell is validated before anything is computed. A scenario's records are
    written as soon as its cells are done, so an interrupted matrix keeps the
    scenarios it finished and leaves no partial record.

    Args:
        scenarios: default: `config.scenario` alone.
        attack_models: default: `config.attack_model` alone.
    """
    scenarios = tuple(dict.fromkeys(scenarios or (config.scenario,)))
    attack_models = tuple(dict.fromkeys(attack_models or (config.attack_model,)))
    cells = {(s, a): config.replace(scenario=s, attack_model=a).validate() for s in scenarios for a in attack_models}
    config = cells[(scenarios[0], attack_models[0])]
    check_writable(config.results_dir)
    public_size = max(c.public_split_size for c in cells.values())
    torch.manual_seed(config.seed)
    outcomes: list[RunOutcome] = []
    with StageTimer(console, show=show_progress) as timer:
        # --- everything that can fail on bad input happens here, before any training ---
        with timer.stage("data") as _:
            dataset = DATASETS.get(config.dataset)(
                DatasetSpec(config.dataset, config.resolution, config.dataset_path, config.dataset_size)
            )
            splits = make_splits(
                len(dataset),
                SplitSizes(
                    public=public_size,
                    members=config.members,
                    nonmembers=config.nonmembers,
                    auxiliary=config.shadow_members + config.shadow_nonmembers,
                    utility=config.utility,
                ),
                public_seed=config.public_seed,
                seed=config.seed,
                owner_pool=getattr(dataset, "owner_pool", None),
            )
            shadows = {
                s: shadow_split(
                    splits,
                    members=config.shadow_members,
                    nonmembers=config.shadow_nonmembers,
                    target_member_overlap=s.auxiliary_member_overlap,
                    seed=config.seed,
                )
                for s in scenarios
            }
            public_data = _training_data(dataset, splits.public, "public") if splits.public else None
        defense = resolve(config.defense, config.defense_args)
        # A naive attacker fine-tunes its shadow with the undefended recipe.
        shadow_defense = defense if config.shadow is ShadowMode.AWARE else resolve("none")

        pretrain_steps = config.pretrain.epochs * -(-len(splits.public) // config.pretrain.batch_size)
        with timer.stage("base model", total=pretrain_steps if config.model == "tiny" else None) as advance:
            base = MODELS.get(config.model)(
                BaseModelRequest(
                    dataset=dataset,
                    public_indices=splits.public,
                    resolution=config.resolution,
                    pretrain=config.pretrain,
                    cache_dir=config.cache_path,
                    model_path=config.model_path,
                ),
                lambda step, total, loss: advance(info=f"loss {loss:.4f}"),
            )

        target = _fine_tune_stage(
            timer, "fine-tune target", config, base, defense, dataset, splits.members, seed=config.seed
        )
        with timer.stage("encoder"):
            encoder = build_encoder(
                config.encoder,
                EncoderRequest(
                    path=config.encoder_path,
                    public=public_data,
                    cache_dir=config.cache_path,
                    training=config.encoder_training,
                    seed=config.public_seed,
                ),
            )
        utility = None
        if config.utility_metrics:
            with timer.stage("utility") as advance:

                def measure(model: DiffusionModel, progress: Callable[..., None] | None) -> UtilityResult:
                    return measure_utility(
                        model=model,
                        real=[dataset.image(i) for i in splits.utility],
                        captions=[dataset.caption(i) for i in splits.utility],
                        public=public_data,
                        cache_dir=config.cache_path,
                        training=config.reference_clip,
                        settings=config.utility_settings,
                        sampling=config.sampling,
                        progress=progress,
                    )

                utility = measure(target.model, advance)
                if config.control:
                    # The same protocol on the model before fine-tuning: the reference point
                    # a defense's utility cost is read against.
                    utility = utility.with_base_model(
                        _base_model_utility(
                            config,
                            base,
                            utility,
                            {"dataset": dataset.describe(), "ids": [dataset.ids[i] for i in splits.utility]},
                            lambda: measure(base.load(), None),
                        )
                    )
        shared_timings = {k: round(v, 3) for k, v in timer.timings.items()}

        target_queries, target_labels = _target_queries(dataset, splits, seed=config.seed)
        target_box = black_box(target.model, config.sampling, name="target")
        base_box: BlackBoxTarget | None = None
        state = _MatrixState()
        baseline_target = None
        if config.baseline:
            baseline_target = image_features(np.stack([q.image for q in target_queries]), encoder)

        for scenario in scenarios:
            before = dict(timer.timings)
            shadow = shadows[scenario]
            shadow_key = tuple(shadow.members)
            if shadow_key not in state.shadow_models:
                state.shadow_models[shadow_key] = _fine_tune_stage(
                    timer,
                    "fine-tune shadow",
                    config,
                    base,
                    shadow_defense,
                    dataset,
                    shadow.members,
                    seed=config.seed + 10_000,
                )
            shadow_model = state.shadow_models[shadow_key]
            shadow_queries = [_query(dataset, i) for i in shadow.members + shadow.nonmembers]
            shadow_labels = np.r_[np.ones(len(shadow.members)), np.zeros(len(shadow.nonmembers))].astype(int)
            scenario_target_queries = target_queries
            captioner: Captioner | None = None
            caption_match: dict[str, float] | None = None
            if scenario.caption_source is CaptionSource.CAPTIONER:
                with timer.stage("captioner"):
                    captioner = build_captioner(
                        config.captioner,
                        CaptionerRequest(
                            public=public_data,
                            auxiliary=_training_data(dataset, shadow.members + shadow.nonmembers, "auxiliary"),
                            fine_tune=config.captioner_finetune,
                            path=config.captioner_path,
                            cache_dir=config.cache_path,
                            training=config.captioner_training,
                            seed=config.public_seed,
                        ),
                    )
                with timer.stage("captioning", total=len(shadow_queries) + len(target_queries)) as advance:
                    # The attacker holds images only: captions come from its captioner,
                    # for its own shadow queries as for the target's.
                    truth_shadow = [q.caption for q in shadow_queries]
                    truth_target = [q.caption for q in target_queries]
                    shadow_queries = caption_queries(_image_only(shadow_queries), captioner)
                    scenario_target_queries = caption_queries(_image_only(target_queries), captioner)
                    advance(len(shadow_queries) + len(target_queries))
                caption_match = _caption_match(
                    truth_target, scenario_target_queries, target_labels, truth_shadow, shadow_queries
                )

            attack_config = AttackConfig(
                scenario=scenario,
                attack_model=attack_models[0],
                encoder=config.encoder,
                distance=config.distance,
                generations_per_query=config.generations_per_query,
                query_access=config.query_access,
                strength=config.img2img_strength,
                query_batch=config.query_batch,
                seed=config.seed,
            )
            shadow_box = black_box(shadow_model.model, config.sampling, name="shadow")
            shadow_scores = state.score(
                timer, "attack: shadow", ("shadow", shadow_key), shadow_box, shadow_queries, attack_config, encoder
            )
            target_scores = state.score(
                timer, "attack: target", ("target",), target_box, scenario_target_queries, attack_config, encoder
            )
            base_scores = None
            if config.control:
                if base_box is None:
                    base_box = black_box(base.load(), config.sampling, name="base")
                base_scores = state.score(
                    timer,
                    "attack: base model (control)",
                    ("base",),
                    base_box,
                    scenario_target_queries,
                    attack_config,
                    encoder,
                    # An `hf` encoder is named by its folder path only, whose contents could change.
                    persist=_cached_base(config, base) if config.encoder_path is None else None,
                )
            baseline_shadow = None
            if config.baseline:
                baseline_shadow = image_features(np.stack([q.image for q in shadow_queries]), encoder)
            # Shared stages, plus what this scenario itself spent (work reused from an
            # earlier scenario of the matrix costs it nothing).
            spent = {k: v - before.get(k, 0.0) for k, v in timer.timings.items()}
            timings = {**shared_timings, **{k: round(v, 3) for k, v in spent.items() if v > 0}}

            records = []
            for attack_model_name in attack_models:
                cell = cells[(scenario, attack_model_name)]
                cell_attack = dataclasses.replace(attack_config, attack_model=attack_model_name)
                records.append(
                    _cell_record(
                        cell,
                        cell_attack,
                        dataset=dataset,
                        splits=splits,
                        shadow=shadow,
                        base=base,
                        defense=defense,
                        shadow_defense=shadow_defense,
                        encoder=encoder,
                        captioner=captioner,
                        caption_match=caption_match,
                        target=target,
                        shadow_model=shadow_model,
                        target_labels=target_labels,
                        shadow_labels=shadow_labels,
                        target_scores=target_scores,
                        shadow_scores=shadow_scores,
                        base_scores=base_scores,
                        baseline=(baseline_shadow, baseline_target) if baseline_shadow is not None else None,
                        timings=timings,
                        utility=utility,
                    )
                )
            for record, plot in records:
                path = write_record(record, config.results_dir)
                plot_path = write_attachment(path, record.run_id, ROC_SUFFIX, plot)
                outcomes.append(RunOutcome(record=record, path=path, plot_path=plot_path))
    return outcomes


@dataclass
class _MatrixState:
    """Work shared between the cells of a matrix run."""

    shadow_models: dict[tuple[int, ...], FineTuned] = field(default_factory=dict)
    scores: dict[str, ScoredQueries] = field(default_factory=dict)

    def score(
        self,
        timer: StageTimer,
        stage: str,
        model_key: tuple[object, ...],
        box: BlackBoxTarget,
        queries: list[Query],
        config: AttackConfig,
        encoder: ImageEncoder,
        *,
        persist: tuple[Path, dict[str, object]] | None = None,
    ) -> ScoredQueries:
        """Score `queries` on `box` once: the same model, queries and captions give the same scores.

        `persist` = (cache folder, what identifies the model): keep the scores on disk
        too, for the base-model control, which every defense of a suite shares.
        """
        key = cache_key(
            {"model": model_key, "ids": [q.query_id for q in queries], "captions": [q.caption for q in queries]}
        )
        if key in self.scores:
            return self.scores[key]
        with timer.stage(stage, total=len(queries)) as advance:
            if persist is None:
                self.scores[key] = score_queries(box, queries, config, encoder=encoder, progress=advance)
            else:
                self.scores[key] = _persisted_scores(
                    persist,
                    lambda: score_queries(box, queries, config, encoder=encoder, progress=advance),
                    queries=queries,
                    config=config,
                    encoder=encoder,
                )
        return self.scores[key]


def _persisted_scores(
    persist: tuple[Path, dict[str, object]],
    compute: Callable[[], ScoredQueries],
    *,
    queries: list[Query],
    config: AttackConfig,
    encoder: ImageEncoder,
) -> ScoredQueries:
    """Scores cached on disk (npy + JSON, nothing unpickled), keyed by model, queries and attack settings."""
    cache_dir, model = persist
    attack = {k: v for k, v in config.to_dict().items() if k not in ("scenario", "attack_model")}
    inputs = {
        "model": model,
        "queries": cache_key({"ids": [q.query_id for q in queries], "captions": [q.caption for q in queries]}),
        "attack": attack,
        "encoder": encoder.describe(),
        "torch": torch.__version__.split("+")[0],
    }

    def build(folder: Path) -> None:
        scored = compute()
        np.save(folder / "scores.npy", scored.scores)
        meta = {k: v for k, v in dataclasses.asdict(scored).items() if k != "scores"}
        (folder / "scored.json").write_text(json.dumps(meta))

    def load(folder: Path) -> ScoredQueries:
        meta = json.loads((folder / "scored.json").read_text())
        return ScoredQueries(scores=np.load(folder / "scores.npy", allow_pickle=False), **meta)

    scored, _, _ = cached(cache_dir, "control-scores", inputs, build, load)
    return scored


def _base_model_utility(
    config: RunConfig,
    base: BaseModel,
    target: UtilityResult,
    eval_set: dict[str, object],
    compute: Callable[[], UtilityResult],
) -> UtilityResult:
    """The base model's utility, kept on disk like the control's scores: the same for every defense."""
    identity = _cached_base(config, base)
    if identity is None:
        return compute()
    cache_dir, model = identity
    # The target's figures came from the same eval set, networks (by weights hash) and settings:
    # its details name them.
    protocol = {k: v for k, v in target.details.items() if k not in ("fid", "kid_mean", "kid_std", "clip_score")}
    protocol["clip_model"] = {
        k: v for k, v in protocol.get("clip_model", {}).items() if k not in ("from_cache", "cache_key")
    }
    inputs = {"model": model, "protocol": protocol, "eval_set": cache_key(eval_set)}

    def build(folder: Path) -> None:
        (folder / "utility.json").write_text(json.dumps(dataclasses.asdict(compute())))

    def load(folder: Path) -> UtilityResult:
        return UtilityResult(**json.loads((folder / "utility.json").read_text()))

    result, _, _ = cached(cache_dir, "base-utility", inputs, build, load)
    return result


def _cached_base(config: RunConfig, base: BaseModel) -> tuple[Path, dict[str, object]] | None:
    """(cache folder, identity of the base model and its sampling) for work done on the base model,
    or None when the base model is a user folder whose contents could change under the same path."""
    if not base.model_dir.resolve().is_relative_to(config.cache_path.resolve()):
        return None
    return config.cache_path, {"base_model": base.model_dir.name, "sampling": config.sampling.to_dict()}


def _cell_record(
    config: RunConfig,
    attack_config: AttackConfig,
    *,
    dataset: ImageTextDataset,
    splits: Splits,
    shadow: ShadowSplit,
    base: BaseModel,
    defense: Defense,
    shadow_defense: Defense,
    encoder: ImageEncoder,
    captioner: Captioner | None,
    caption_match: dict[str, float] | None,
    target: FineTuned,
    shadow_model: FineTuned,
    target_labels: np.ndarray,
    shadow_labels: np.ndarray,
    target_scores: ScoredQueries,
    shadow_scores: ScoredQueries,
    base_scores: ScoredQueries | None,
    baseline: tuple[np.ndarray, np.ndarray] | None,
    timings: dict[str, float],
    utility: UtilityResult | None = None,
) -> tuple[ResultRecord, bytes]:
    """Fit one attack model on the shadow, apply it once to the target, and build the record."""
    bootstrap = BootstrapSpec(n_resamples=config.bootstrap_resamples, seed=config.seed)
    spec = bootstrap if config.bootstrap_resamples > 0 else None
    attack_model = fit_attack_model(attack_config, shadow_scores.scores, shadow_labels)
    membership = attack_model.membership_score(target_scores.scores)
    predictions = attack_model.predict(target_scores.scores)
    privacy = privacy_metrics(target_labels, membership, predictions, bootstrap=spec)
    shadow_membership = attack_model.membership_score(shadow_scores.scores)
    shadow_privacy = privacy_metrics(
        shadow_labels, shadow_membership, attack_model.predict(shadow_scores.scores), bootstrap=None
    )
    curves = {"target": (target_labels, membership), "shadow (fit data)": (shadow_labels, shadow_membership)}

    control = None
    if base_scores is not None:
        control_membership = attack_model.membership_score(base_scores.scores)
        control = privacy_metrics(
            target_labels, control_membership, attack_model.predict(base_scores.scores), bootstrap=spec
        )
        curves["base model (control)"] = (target_labels, control_membership)

    baseline_privacy = None
    baseline_details = None
    if baseline is not None:
        shadow_features, target_features = baseline
        baseline_model = ModelFreeBaseline(attack_config.attack_model).fit(shadow_features, shadow_labels)
        baseline_membership = baseline_model.membership_score(target_features)
        baseline_privacy = privacy_metrics(
            target_labels, baseline_membership, baseline_model.predict(target_features), bootstrap=spec
        )
        curves["model-free baseline"] = (target_labels, baseline_membership)
        baseline_details = baseline_model.describe()

    run_id = new_run_id(config.defense, config.seed)
    components: dict[str, dict[str, Any]] = {
        "dataset": {
            **dataset.describe(),
            "version": str(dataset.describe().get("version", "1")),
            # Shared by every run with this public seed: named by a digest, not listed in each record.
            "public_split": {
                "n": len(splits.public),
                "sha256": hashlib.sha256("\n".join(dataset.ids[i] for i in splits.public).encode()).hexdigest(),
            },
            "origin": component_origin(DATASETS, config.dataset),
        },
        "model": {
            **base.description,
            "origin": component_origin(MODELS, config.model),
            "from_cache": base.from_cache,
        },
        "defense": {**defense.describe(), "origin": component_origin(DEFENSES, config.defense)},
        "attack_model": {
            **attack_model.describe(),
            "version": "1",
            "origin": component_origin(ATTACK_MODELS, attack_config.attack_model),
        },
        "encoder": {
            "version": "1",
            **encoder.describe(),
            "origin": component_origin(ENCODERS, config.encoder),
        },
    }
    if captioner is not None:
        components["captioner"] = {
            "version": "1",
            **captioner.describe(),
            "origin": component_origin(CAPTIONERS, config.captioner),
        }
    if baseline_details is not None:
        components["baseline"] = {
            "version": "1",
            "origin": component_origin(ATTACK_MODELS, attack_config.attack_model),
            **baseline_details,
        }
    scenario = attack_config.scenario
    record = ResultRecord(
        run_id=run_id,
        provenance=provenance(),
        seeds={"seed": config.seed, "public_seed": config.public_seed, "shadow_seed": config.seed + 10_000},
        config=config.to_dict(),
        components=components,
        splits={
            **{name: [dataset.ids[i] for i in idx] for name, idx in splits.as_dict().items() if name != "public"},
            "shadow_members": [dataset.ids[i] for i in shadow.members],
            "shadow_nonmembers": [dataset.ids[i] for i in shadow.nonmembers],
        },
        training={"target": target.report, "shadow": shadow_model.report},
        attack={
            **attack_config.to_dict(),
            "caption_source": scenario.caption_source.value,
            "captioner_fine_tuned": config.captioner_finetune if captioner is not None else None,
            "caption_exact_match": caption_match,
            "shadow_mode": config.shadow.value,
            "shadow_defense": str(shadow_defense.describe().get("name", "?")),
            "defense_aware_shadow": config.shadow is ShadowMode.AWARE,
            "queries_spent": target_scores.queries_spent,
            "images_generated": target_scores.images_generated,
            "images_per_second": round(target_scores.images_per_second, 3),
            "model_time_fraction": round(min(1.0, target_scores.model_time_fraction), 4),
            "query_batch": attack_config.query_batch,
            "shadow_queries_spent": shadow_scores.queries_spent,
            "shadow_overlap_with_target_members": shadow.overlap_with_target_members,
            "query_ids": target_scores.query_ids,
            "captions": target_scores.captions,
            "labels": [int(v) for v in target_labels],
            "scores": target_scores.scores.tolist(),
            "membership_scores": [float(v) for v in membership],
            "predictions": [int(v) for v in predictions],
            "shadow_fit": shadow_privacy.to_dict(),
            "roc_plot": attachment_name(run_id, ROC_SUFFIX),
        },
        privacy=privacy.to_dict(),
        control=control.to_dict() if control is not None else None,
        baseline=baseline_privacy.to_dict() if baseline_privacy is not None else None,
        metrics={**_headline_metrics(privacy, control, baseline_privacy), **(utility.metrics() if utility else {})},
        utility=utility.details if utility is not None else None,
        timings_s=timings,
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        notes=_notes(privacy, config),
    )
    access = "img2img" if attack_config.query_access is QueryAccess.IMAGE_TO_IMAGE else "text-only"
    plot = roc_plot_png(
        curves,
        title=(
            f"{record.dataset} / scenario {scenario.value} / {config.defense} / {attack_config.attack_model} ({access})"
        ),
    )
    return record, plot


def _training_data(dataset: ImageTextDataset, indices: Sequence[int], name: str) -> TrainingData:
    """Images and captions of `indices`, loaded lazily; fingerprinted by dataset and ids."""
    ids = [dataset.ids[i] for i in indices]

    def load() -> tuple[np.ndarray, list[str]]:
        return np.stack([dataset.image(i) for i in indices]), [dataset.caption(i) for i in indices]

    return TrainingData({"name": name, "dataset": dataset.describe(), "ids": cache_key({"ids": ids})}, load)


def _image_only(queries: Sequence[Query]) -> list[Query]:
    return [Query(query_id=q.query_id, image=q.image, caption=None) for q in queries]


def _caption_match(
    truth_target: Sequence[str | None],
    target: Sequence[Query],
    target_labels: np.ndarray,
    truth_shadow: Sequence[str | None],
    shadow: Sequence[Query],
) -> dict[str, float]:
    """Diagnostic only (the attack never sees it): how often the captioner reproduced the truth."""
    hit_target = np.array([t == q.caption for t, q in zip(truth_target, target, strict=True)])
    hit_shadow = np.array([t == q.caption for t, q in zip(truth_shadow, shadow, strict=True)])
    labels = np.asarray(target_labels).astype(bool)
    return {
        "target_members": float(hit_target[labels].mean()),
        "target_nonmembers": float(hit_target[~labels].mean()),
        "shadow_queries": float(hit_shadow.mean()),
    }


def _query(dataset: ImageTextDataset, index: int) -> Query:
    return Query(query_id=dataset.ids[index], image=dataset.image(index), caption=dataset.caption(index))


def _target_queries(dataset: ImageTextDataset, splits: Splits, *, seed: int) -> tuple[list[Query], np.ndarray]:
    """Members and non-members, shuffled so the query order carries no label."""
    indices = np.asarray(splits.members + splits.nonmembers)
    labels = np.r_[np.ones(len(splits.members)), np.zeros(len(splits.nonmembers))].astype(int)
    order = np.random.default_rng([seed, 11]).permutation(len(indices))
    return [_query(dataset, int(i)) for i in indices[order]], labels[order]


def _fine_tune_stage(
    timer: StageTimer,
    name: str,
    config: RunConfig,
    base: BaseModel,
    defense: Defense,
    dataset: ImageTextDataset,
    indices: tuple[int, ...],
    *,
    seed: int,
) -> FineTuned:
    train_config = TrainConfig(**{**config.finetune.to_dict(), "seed": seed})
    recipe = defense.recipe(train_config)
    steps = recipe.epochs * -(-len(indices) // recipe.batch_size)
    inputs = {
        "base": str(base.model_dir),
        "base_description": base.description,
        "dataset": dataset.describe(),
        "ids": [dataset.ids[i] for i in indices],
        "train": train_config.to_dict(),
        "defense": defense.describe(),
        "torch": torch.__version__.split("+")[0],
    }
    with timer.stage(name, total=steps) as advance:

        def build(folder: Path) -> None:
            model = base.load()
            images = images_to_tensor([dataset.image(i) for i in indices])
            captions = [dataset.caption(i) for i in indices]
            result = defense.fine_tune(
                model=model,
                images=images,
                captions=captions,
                train_config=train_config,
                on_step=lambda step, total, loss: advance(info=f"loss {loss:.4f}"),
            )
            model.save(folder)
            report = _report_dict(result.report, recipe)
            report["defense_details"] = result.details
            (folder / "train_report.json").write_text(json.dumps(report, indent=2))

        def load(folder: Path) -> FineTuned:
            report = json.loads((folder / "train_report.json").read_text())
            return FineTuned(model=load_model(folder), report=report, from_cache=True)

        tuned, hit, _ = cached(config.cache_path, "finetuned", inputs, build, load)
        tuned.from_cache = hit
        tuned.report["from_cache"] = hit
    return tuned


def _report_dict(report: TrainReport, config: TrainConfig) -> dict[str, Any]:
    history = report.loss_history
    # Per-epoch means keep the record small while showing the training curve.
    per_epoch = max(1, len(history) // max(1, report.epochs_completed))
    curve = [round(float(np.mean(history[i : i + per_epoch])), 6) for i in range(0, len(history), per_epoch)]
    return {
        "config": config.to_dict(),
        "steps": report.steps,
        "epochs_completed": report.epochs_completed,
        "final_loss": report.final_loss,
        "loss_per_epoch": curve,
        "notes": report.notes,
    }


def _headline_metrics(
    privacy: PrivacyMetrics, control: PrivacyMetrics | None, baseline: PrivacyMetrics | None
) -> dict[str, Metric]:
    tpr1, tpr01 = privacy.tpr(0.01), privacy.tpr(0.001)
    metrics = {
        "attack_auc": Metric(privacy.auc, False, "ROC AUC of the attack on the target (0.5 = chance)", privacy.auc_ci),
        "attack_tpr_at_1pct_fpr": Metric(
            tpr1.tpr, False, f"TPR at FPR <= 1% ({tpr1.n_nonmembers} non-members)", tpr1.ci
        ),
        "attack_tpr_at_0.1pct_fpr": Metric(
            tpr01.tpr, False, f"TPR at FPR <= 0.1% ({tpr01.n_nonmembers} non-members)", tpr01.ci
        ),
        "attack_balanced_accuracy": Metric(
            privacy.balanced_accuracy,
            False,
            "the paper's ASR, decision rule fitted on the shadow",
            privacy.balanced_accuracy_ci,
        ),
    }
    if control is not None:
        metrics["control_auc_base_model"] = Metric(
            control.auc, False, "same attack on the base model before fine-tuning; should be near 0.5", control.auc_ci
        )
    if baseline is not None:
        metrics["baseline_auc_model_free"] = Metric(
            baseline.auc,
            False,
            "same attack model on query-image features alone, no model queries; should be near 0.5",
            baseline.auc_ci,
        )
    return metrics


def _notes(privacy: PrivacyMetrics, config: RunConfig) -> list[str]:
    notes = []
    if config.query_access is QueryAccess.IMAGE_TO_IMAGE:
        notes.append(
            f"image-to-image access (strength {config.img2img_strength:g}): not comparable with the paper's "
            "text-only attack"
        )
    for entry in privacy.tpr_at_fpr:
        if not entry.supported:
            notes.append(
                f"TPR at FPR {entry.target_fpr:g} is not supported by {entry.n_nonmembers} non-members "
                f"(needs >= {int(np.ceil(1 / entry.target_fpr))}); use --preset full"
            )
    return notes
