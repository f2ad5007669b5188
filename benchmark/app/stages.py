"""The stages of one run, each a function over the run's context.

data -> defenses -> base model -> target fine-tune -> attack encoder -> utility
-> target queries -> per scenario: shadow fine-tune, captioner (II/IV), scoring of
shadow, target and base model -> per attack model: one record (`benchmark.app.cell`).

Each stage takes what it needs, returns a typed result and times itself on the
context's `StageTimer`; `benchmark.app.runner` calls them in this order. Work that
several scenarios share (a shadow model, a score vector) is computed once per run
and kept in the context; work that every run of a suite shares (fine-tunes, the
base model's control scores and utility, and the target's utility and scores, which
runs of one unit's scenarios in separate processes share) is kept on disk through
`benchmark.kernel.cache`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.attack import AttackConfig, ProgressFn, Query, ScoredQueries, caption_queries, image_features
from attacks.captioners import Captioner, CaptionerRequest, build_captioner
from attacks.encoders import EncoderRequest, ImageEncoder, build_encoder
from attacks.families import DEFAULT_FAMILY, Access, AttackFamily
from attacks.scenarios import CaptionSource, Scenario, ShadowMode
from attacks.training_data import TrainingData
from benchmark.app.config import RunConfig
from benchmark.kernel.cache import cache_key, cached, cached_arrays, entry_digest
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.data.base import DATASETS, DatasetSpec, ImageTextDataset, images_to_tensor
from benchmark.pipeline.data.splits import ShadowSplit, Splits, SplitSizes, make_splits, shadow_split
from benchmark.pipeline.finetune import TrainConfig, TrainReport
from benchmark.pipeline.models.diffusion import DiffusionModel, black_box, gray_box, load_model
from benchmark.pipeline.models.registry import MODELS, BaseModel, BaseModelRequest
from benchmark.pipeline.target import BlackBoxTarget, GrayBoxTarget
from benchmark.pipeline.utility_metrics import UtilityResult, UtilitySamples, measure_utility, protocol_identity
from defenses import Defense, resolve

# Offsets the shadow's training seed from the target's: the same members never get the same noise.
SHADOW_SEED_OFFSET = 10_000


@dataclass
class FineTuned:
    model: DiffusionModel
    report: dict[str, Any]
    from_cache: bool
    # Its cache entry, whose files name the weights in the keys of work done with them.
    entry: Path | None = None


@dataclass
class RunData:
    """The dataset and every split the run draws from it."""

    dataset: ImageTextDataset
    splits: Splits
    shadows: dict[Scenario, ShadowSplit]
    public: TrainingData | None


@dataclass
class RunContext:
    """What every stage of one run reads, and the work its scenarios share."""

    config: RunConfig
    timer: StageTimer
    data: RunData
    defense: Defense
    # A naive attacker fine-tunes its shadow with the undefended recipe.
    shadow_defense: Defense
    base: BaseModel | None = None
    shadow_models: dict[tuple[int, ...], FineTuned] = field(default_factory=dict)
    scores: dict[str, ScoredQueries] = field(default_factory=dict)
    base_box: BlackBoxTarget | None = None
    base_gray_box: GrayBoxTarget | None = None


@dataclass
class Target:
    """The fine-tuned target and what every scenario asks of it."""

    model: FineTuned
    encoder: ImageEncoder
    utility: UtilityResult | None
    queries: list[Query]
    labels: np.ndarray
    box: BlackBoxTarget
    # Gray-box access to the same model, for gray-box attack families.
    gray_box: GrayBoxTarget
    # Image features of the queries alone, for the model-free baseline.
    baseline_features: np.ndarray | None
    # Seconds of the stages every scenario shares.
    shared_timings: dict[str, float]
    # The target in the disk caches of its utility and scores (None: they are not kept on disk).
    identity: dict[str, object] | None = None


@dataclass
class ScenarioEvidence:
    """Everything the attack models of one scenario are fitted and applied on, computed once."""

    scenario: Scenario
    shadow: ShadowSplit
    shadow_model: FineTuned
    captioner: Captioner | None
    caption_match: dict[str, float] | None
    attack_config: AttackConfig
    # The attack family that scored the queries, with its hyperparameters.
    family: AttackFamily
    shadow_labels: np.ndarray
    shadow_scores: ScoredQueries
    target_scores: ScoredQueries
    base_scores: ScoredQueries | None
    baseline_shadow_features: np.ndarray | None
    timings: dict[str, float]


# --- data and defenses ------------------------------------------------------------------------


def load_data(config: RunConfig, scenarios: Sequence[Scenario], *, public_size: int, timer: StageTimer) -> RunData:
    """The dataset, the target's splits and one shadow split per scenario (bad input fails here)."""
    with timer.stage("data"):
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
        public = training_data(dataset, splits.public, "public") if splits.public else None
    return RunData(dataset=dataset, splits=splits, shadows=shadows, public=public)


def defenses(config: RunConfig) -> tuple[Defense, Defense]:
    """(the target's defense, the shadow's): an aware attacker copies the defense, a naive one does not."""
    defense = resolve(config.defense, config.defense_args)
    return defense, defense if config.shadow is ShadowMode.AWARE else resolve("none")


# --- models ---------------------------------------------------------------------------------


def base_model(ctx: RunContext) -> BaseModel:
    config, splits = ctx.config, ctx.data.splits
    pretrain_steps = config.pretrain.epochs * -(-len(splits.public) // config.pretrain.batch_size)
    with ctx.timer.stage("base model", total=pretrain_steps if config.model == "tiny" else None) as advance:
        return MODELS.get(config.model)(
            base_model_request(config, ctx.data), lambda step, total, loss: advance(info=f"loss {loss:.4f}")
        )


def base_model_request(config: RunConfig, data: RunData) -> BaseModelRequest:
    """What names the run's base model (and so its cache key)."""
    return BaseModelRequest(
        dataset=data.dataset,
        public_indices=data.splits.public,
        resolution=config.resolution,
        pretrain=config.pretrain,
        cache_dir=config.cache_path,
        model_path=config.model_path,
    )


def fine_tune(ctx: RunContext, name: str, defense: Defense, indices: tuple[int, ...], *, seed: int) -> FineTuned:
    """Fine-tune the base model on `indices` under `defense`; cached on disk by everything that shapes it."""
    config, base, dataset = ctx.config, _base(ctx), ctx.data.dataset
    train_config = fine_tune_config(config, seed=seed)
    recipe = defense.recipe(train_config)
    steps = recipe.epochs * -(-len(indices) // recipe.batch_size)
    inputs = fine_tune_inputs(config, base, dataset, defense, indices, train_config)
    with ctx.timer.stage(name, total=steps) as advance:

        def build(folder: Path) -> None:
            model = base.load()
            result = defense.fine_tune(
                model=model,
                images=images_to_tensor([dataset.image(i) for i in indices]),
                captions=[dataset.caption(i) for i in indices],
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

        tuned, hit, entry = cached(config.cache_path, FINETUNE_CACHE_KIND, inputs, build, load)
        # A generation-time defense samples this model its own way (its config is in the cache key).
        tuned.model.sampling_hooks = defense.sampling_hooks()
        tuned.from_cache, tuned.entry = hit, entry
        tuned.report["from_cache"] = hit
    return tuned


FINETUNE_CACHE_KIND = "finetuned"


def fine_tune_config(config: RunConfig, *, seed: int) -> TrainConfig:
    """The run's fine-tuning recipe at `seed`, before the defense changes it."""
    return TrainConfig(**{**config.finetune.to_dict(), "seed": seed})


def fine_tune_inputs(
    config: RunConfig,
    base: BaseModel,
    dataset: ImageTextDataset,
    defense: Defense,
    indices: Sequence[int],
    train_config: TrainConfig,
) -> dict[str, object]:
    """Everything that shapes a fine-tune: its cache key, for `fine_tune` and a suite's plan alike."""
    return {
        # A cached base by its place in the cache (content-addressed, so the cache may move); a user folder by its path.
        "base": (
            str(base.model_dir)
            if cached_base_identity(config, base) is None
            else base.model_dir.resolve().relative_to(config.cache_path.resolve()).as_posix()
        ),
        "base_description": base.description,
        "dataset": dataset.describe(),
        "ids": [dataset.ids[i] for i in indices],
        "train": train_config.to_dict(),
        # Only what shapes the weights: a generation-time defense shares the plain recipe's fine-tune.
        "defense": _training_identity(defense),
        "torch": torch.__version__.split("+")[0],
        **current_compute().identity(),
    }


def _training_identity(defense: Defense) -> dict[str, object]:
    identity = defense.training_identity()
    return identity if identity is not None else resolve("none").describe()


def attack_encoder(ctx: RunContext) -> ImageEncoder:
    config = ctx.config
    with ctx.timer.stage("encoder"):
        return build_encoder(
            config.encoder,
            EncoderRequest(
                path=config.encoder_path,
                public=ctx.data.public,
                cache_dir=config.cache_path,
                training=config.encoder_training,
                seed=config.public_seed,
            ),
        )


# --- the target -------------------------------------------------------------------------------


def target(ctx: RunContext) -> Target:
    """Fine-tune the target, build the attack's encoder, measure utility, draw the target's queries."""
    config = ctx.config
    tuned = fine_tune(ctx, "fine-tune target", ctx.defense, ctx.data.splits.members, seed=config.seed)
    identity = None if tuned.entry is None else cached_target_identity(config, _base(ctx), ctx.defense, tuned.entry)
    encoder = attack_encoder(ctx)
    measured = utility(ctx, tuned.model, identity) if config.utility_metrics else None
    shared_timings = {k: round(v, 3) for k, v in ctx.timer.timings.items()}
    queries, labels = target_queries(ctx.data.dataset, ctx.data.splits, seed=config.seed)
    box = black_box(tuned.model, config.sampling, name="target")
    grey = gray_box(tuned.model, name="target", batch_size=config.sampling.batch_size)
    features = image_features(np.stack([q.image for q in queries]), encoder) if config.baseline else None
    return Target(
        model=tuned,
        encoder=encoder,
        utility=measured,
        queries=queries,
        labels=labels,
        box=box,
        gray_box=grey,
        baseline_features=features,
        shared_timings=shared_timings,
        identity=identity,
    )


def utility(ctx: RunContext, model: DiffusionModel, identity: dict[str, object] | None = None) -> UtilityResult:
    """FID, KID and CLIP score of `model`, and (with the control) of the base model under the same protocol.

    Args:
        identity: `model`'s in the disk cache (`cached_target_identity`); None: measured, not kept.
    """
    config, data = ctx.config, ctx.data
    with ctx.timer.stage("utility") as advance:

        def measure(measured: DiffusionModel, progress: Callable[..., None] | None) -> UtilityResult:
            return measure_utility(
                model=measured,
                real=[data.dataset.image(i) for i in data.splits.utility],
                captions=[data.dataset.caption(i) for i in data.splits.utility],
                public=data.public,
                cache_dir=config.cache_path,
                training=config.reference_clip,
                settings=config.utility_settings,
                sampling=config.sampling,
                progress=progress,
            )

        inputs = None if identity is None else target_utility_inputs(config, data, identity)
        result = _kept_utility(ctx, TARGET_UTILITY_KIND, inputs, lambda: measure(model, advance))
        if config.control:
            # The same protocol on the model before fine-tuning: the reference point
            # a defense's utility cost is read against.
            result = result.with_base_model(
                _base_model_utility(ctx, result, utility_eval_set(data), lambda: measure(_base(ctx).load(), None)),
                resamples=config.utility_settings.bootstrap,
                seed=config.seed,
            )
    return result


def utility_eval_set(data: RunData) -> dict[str, object]:
    """The utility protocol's captions and images, by dataset and ids (part of the utility caches' keys)."""
    return {"dataset": data.dataset.describe(), "ids": [data.dataset.ids[i] for i in data.splits.utility]}


def target_queries(dataset: ImageTextDataset, splits: Splits, *, seed: int) -> tuple[list[Query], np.ndarray]:
    """Members and non-members, shuffled so the query order carries no label."""
    indices = np.asarray(splits.members + splits.nonmembers)
    labels = np.r_[np.ones(len(splits.members)), np.zeros(len(splits.nonmembers))].astype(int)
    order = np.random.default_rng([seed, 11]).permutation(len(indices))
    return [_query(dataset, int(i)) for i in indices[order]], labels[order]


# --- one scenario -----------------------------------------------------------------------------


def attack_scenario(ctx: RunContext, tgt: Target, scenario: Scenario, *, attack_model: str) -> ScenarioEvidence:
    """The attacker's shadow, captions and scores for one scenario; shared by all its attack models."""
    config, dataset, timer = ctx.config, ctx.data.dataset, ctx.timer
    before = dict(timer.timings)
    shadow = ctx.data.shadows[scenario]
    shadow_key = tuple(shadow.members)
    if shadow_key not in ctx.shadow_models:
        ctx.shadow_models[shadow_key] = fine_tune(
            ctx, "fine-tune shadow", ctx.shadow_defense, shadow.members, seed=config.seed + SHADOW_SEED_OFFSET
        )
    shadow_model = ctx.shadow_models[shadow_key]
    shadow_queries = [_query(dataset, i) for i in shadow.members + shadow.nonmembers]
    shadow_labels = np.r_[np.ones(len(shadow.members)), np.zeros(len(shadow.nonmembers))].astype(int)
    queries = tgt.queries
    captioner: Captioner | None = None
    caption_match: dict[str, float] | None = None
    if scenario.caption_source is CaptionSource.CAPTIONER:
        captioner = _captioner(ctx, shadow)
        with timer.stage("captioning", total=len(shadow_queries) + len(tgt.queries)) as advance:
            # The attacker holds images only: captions come from its captioner,
            # for its own shadow queries as for the target's.
            truth_shadow = [q.caption for q in shadow_queries]
            truth_target = [q.caption for q in tgt.queries]
            shadow_queries = caption_queries(_image_only(shadow_queries), captioner)
            queries = caption_queries(_image_only(tgt.queries), captioner)
            advance(len(shadow_queries) + len(tgt.queries))
        caption_match = _caption_match(truth_target, queries, tgt.labels, truth_shadow, shadow_queries)

    attack_config = attacker_config(config, scenario, attack_model=attack_model)
    family = attack_config.family()
    # The attacker gets the access its family needs: images out of captions, or noise predictions.
    gray = family.access(attack_config.query_access) is Access.GRAY_BOX
    shadow_box: BlackBoxTarget | GrayBoxTarget = (
        gray_box(shadow_model.model, name="shadow", batch_size=config.sampling.batch_size)
        if gray
        else black_box(shadow_model.model, config.sampling, name="shadow")
    )
    shadow_scores = _score(
        ctx, "attack: shadow", ("shadow", shadow_key), shadow_box, shadow_queries, attack_config, tgt
    )
    # An `hf` encoder is named by its folder path only, whose contents could change: its scores stay in memory.
    keep = config.encoder_path is None
    target_box = tgt.gray_box if gray else tgt.box
    target_scores = _score(
        ctx,
        "attack: target",
        ("target",),
        target_box,
        queries,
        attack_config,
        tgt,
        # Scenarios I and III ask the target the same, and often run in separate processes.
        on_disk=(TARGET_SCORES_KIND, tgt.identity) if keep and tgt.identity is not None else None,
    )
    base_scores = None
    if config.control:
        # Every defense of a suite asks the same base model the same.
        base_identity = cached_base_identity(config, _base(ctx))
        base_box: BlackBoxTarget | GrayBoxTarget
        if gray:
            if ctx.base_gray_box is None:
                ctx.base_gray_box = gray_box(_base(ctx).load(), name="base", batch_size=config.sampling.batch_size)
            base_box = ctx.base_gray_box
        else:
            if ctx.base_box is None:
                ctx.base_box = black_box(_base(ctx).load(), config.sampling, name="base")
            base_box = ctx.base_box
        base_scores = _score(
            ctx,
            "attack: base model (control)",
            ("base",),
            base_box,
            queries,
            attack_config,
            tgt,
            on_disk=(CONTROL_SCORES_KIND, base_identity) if keep and base_identity is not None else None,
        )
    baseline_shadow = None
    if config.baseline:
        baseline_shadow = image_features(np.stack([q.image for q in shadow_queries]), tgt.encoder)
    # Shared stages, plus what this scenario itself spent (work reused from an
    # earlier scenario of the matrix costs it nothing).
    spent = {k: v - before.get(k, 0.0) for k, v in timer.timings.items()}
    timings = {**tgt.shared_timings, **{k: round(v, 3) for k, v in spent.items() if v > 0}}
    return ScenarioEvidence(
        scenario=scenario,
        shadow=shadow,
        shadow_model=shadow_model,
        captioner=captioner,
        caption_match=caption_match,
        attack_config=attack_config,
        family=family,
        shadow_labels=shadow_labels,
        shadow_scores=shadow_scores,
        target_scores=target_scores,
        base_scores=base_scores,
        baseline_shadow_features=baseline_shadow,
        timings=timings,
    )


def attacker_config(config: RunConfig, scenario: Scenario, *, attack_model: str) -> AttackConfig:
    """The attacker's settings: the run's, under the same names (the img2img strength aside)."""
    same_names = {f.name for f in dataclasses.fields(AttackConfig)} & {f.name for f in dataclasses.fields(config)}
    return AttackConfig(
        **{name: getattr(config, name) for name in same_names - {"scenario", "attack_model"}},
        scenario=scenario,
        attack_model=attack_model,
        strength=config.img2img_strength,
    )


def _captioner(ctx: RunContext, shadow: ShadowSplit) -> Captioner:
    config = ctx.config
    with ctx.timer.stage("captioner"):
        return build_captioner(
            config.captioner,
            CaptionerRequest(
                public=ctx.data.public,
                auxiliary=training_data(ctx.data.dataset, shadow.members + shadow.nonmembers, "auxiliary"),
                fine_tune=config.captioner_finetune,
                path=config.captioner_path,
                cache_dir=config.cache_path,
                training=config.captioner_training,
                seed=config.public_seed,
            ),
        )


def _score(
    ctx: RunContext,
    stage: str,
    model_key: tuple[object, ...],
    box: BlackBoxTarget | GrayBoxTarget,
    queries: list[Query],
    config: AttackConfig,
    tgt: Target,
    *,
    on_disk: tuple[str, dict[str, object]] | None = None,
) -> ScoredQueries:
    """Score `queries` on `box` through the attack's family once per run: the same model, queries, captions and
    attack give the same scores.

    Args:
        on_disk: (cache kind, the model's identity) to keep the scores on disk for later runs too;
            None: in this run's memory only.
    """
    key = cache_key(
        {
            "model": model_key,
            "ids": [q.query_id for q in queries],
            "captions": [q.caption for q in queries],
            **_family_identity(config),
        }
    )
    if key in ctx.scores:
        return ctx.scores[key]
    with ctx.timer.stage(stage, total=len(queries)) as advance:

        def compute() -> ScoredQueries:
            return score_queries(box, queries, config, encoder=tgt.encoder, progress=advance)

        if on_disk is None:
            ctx.scores[key] = compute()
        else:
            ctx.scores[key] = _persisted_scores(ctx, *on_disk, compute, queries, config, tgt)
    return ctx.scores[key]


def score_queries(
    target: BlackBoxTarget | GrayBoxTarget,
    queries: Sequence[Query],
    config: AttackConfig,
    *,
    encoder: ImageEncoder | None = None,
    progress: ProgressFn | None = None,
) -> ScoredQueries:
    """The one place a run scores queries: through the configuration's attack family."""
    return config.family().score(target, queries, config, encoder=encoder, progress=progress)


def _family_identity(config: AttackConfig) -> dict[str, object]:
    """The attack family in a cache key: nothing for Pang & Wang's (so caches written before
    families existed stay valid), its name, version and hyperparameters for any other."""
    if config.attack == DEFAULT_FAMILY and not config.attack_args:
        return {}
    family = config.family()
    return {"family": {"name": config.attack, "version": family.version, **family.hyperparameters(config)}}


# --- disk caches of work every run of a suite shares -----------------------------------------


def cached_base_identity(config: RunConfig, base: BaseModel) -> dict[str, object] | None:
    """What identifies the base model and its sampling in a disk cache, or None when the base model
    is a user folder whose contents could change under the same path."""
    if not base.model_dir.resolve().is_relative_to(config.cache_path.resolve()):
        return None
    return {"base_model": base.model_dir.name, "sampling": config.sampling.to_dict(), **current_compute().identity()}


def keeps_target_work(config: RunConfig, base: BaseModel, defense: Defense) -> bool:
    """Whether the target's utility and scores are kept on disk for later runs.

    Not for a target fine-tuned from a user folder (as `cached_base_identity`), nor for one whose
    defense acts in sampling: its record tells what the hooks did in this run's own generations,
    which values read from disk would leave out.
    """
    return cached_base_identity(config, base) is not None and not defense.sampling_hooks().changes_sampling


def cached_target_identity(
    config: RunConfig, base: BaseModel, defense: Defense, fine_tune: Path
) -> dict[str, object] | None:
    """What identifies the target and its sampling in a disk cache (a suite's plan computes the same), or None
    where its work is not kept there (`keeps_target_work`).

    Args:
        fine_tune: the target fine-tune's cache entry (`fine_tune_inputs` name it).
    """
    weights = entry_digest(fine_tune)
    if weights is None or not keeps_target_work(config, base, defense):
        return None
    return {
        "fine_tune": fine_tune.name,
        # A rebuilt entry whose training came out otherwise names other weights.
        "weights": weights,
        # The whole defense, not only what shaped the weights: defenses that share a fine-tune may sample it apart.
        "defense": defense.describe(),
        "sampling": config.sampling.to_dict(),
        **current_compute().identity(),
    }


CONTROL_SCORES_KIND = "control-scores"
BASE_UTILITY_KIND = "base-utility"
TARGET_SCORES_KIND = "target-scores"
TARGET_UTILITY_KIND = "target-utility"


def target_utility_inputs(config: RunConfig, data: RunData, target: dict[str, object]) -> dict[str, object]:
    """What keys the target's utility on disk (a suite's plan reads the same key)."""
    settings = config.utility_settings
    return {
        "model": target,
        "protocol": protocol_identity(
            settings, training=config.reference_clip, public=None if data.public is None else data.public.fingerprint
        ),
        "eval_set": cache_key(utility_eval_set(data)),
    }


def score_inputs(
    model: dict[str, object], queries: Sequence[Query], config: AttackConfig, *, encoder: dict[str, object]
) -> dict[str, object]:
    """What keys a model's scores on disk, the base model's control or the target's (a suite's plan reads the same
    keys)."""
    attack = {k: v for k, v in config.to_dict().items() if k not in ("scenario", "attack_model")}
    attack.update(_family_identity(config))
    return {
        "model": model,
        "queries": cache_key({"ids": [q.query_id for q in queries], "captions": [q.caption for q in queries]}),
        "attack": attack,
        "encoder": encoder,
        "torch": torch.__version__.split("+")[0],
    }


def _persisted_scores(
    ctx: RunContext,
    kind: str,
    model: dict[str, object],
    compute: Callable[[], ScoredQueries],
    queries: list[Query],
    config: AttackConfig,
    tgt: Target,
) -> ScoredQueries:
    """Scores cached on disk (npy + JSON, nothing unpickled), keyed by model, queries and attack settings.

    Every field is kept (the query budget, images generated, UNet calls, seconds spent), so
    a record built from them is the one the computation would have given.
    """
    inputs = score_inputs(model, queries, config, encoder=tgt.encoder.describe())

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        scored = compute()
        return {"scores": scored.scores}, {k: v for k, v in dataclasses.asdict(scored).items() if k != "scores"}

    arrays, meta = cached_arrays(ctx.config.cache_path, kind, inputs, build)
    return ScoredQueries(scores=arrays["scores"], **meta)


def _base_model_utility(
    ctx: RunContext, target: UtilityResult, eval_set: dict[str, object], compute: Callable[[], UtilityResult]
) -> UtilityResult:
    """The base model's utility, kept on disk like the control's scores: the same for every defense."""
    model = cached_base_identity(ctx.config, _base(ctx))
    if model is None:
        return compute()
    # The target's figures came from the same eval set, networks (by weights hash) and settings:
    # its details name them.
    figures = ("fid", "kid_mean", "kid_std", "clip_score", "intervals")
    protocol = {k: v for k, v in target.details.items() if k not in figures}
    protocol["clip_model"] = {
        k: v for k, v in protocol.get("clip_model", {}).items() if k not in ("from_cache", "cache_key")
    }
    inputs = {"model": model, "protocol": protocol, "eval_set": cache_key(eval_set)}
    return _kept_utility(ctx, BASE_UTILITY_KIND, inputs, compute)


def _kept_utility(
    ctx: RunContext, kind: str, inputs: dict[str, object] | None, compute: Callable[[], UtilityResult]
) -> UtilityResult:
    """A utility result cached on disk under `inputs` (None: computed, not kept): its figures as JSON, and the
    samples behind them as arrays (nothing unpickled), which later paired comparisons resample."""
    if inputs is None:
        return compute()

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result = compute()
        figures = {k: v for k, v in dataclasses.asdict(result).items() if k != "samples"}
        samples = {} if result.samples is None else dataclasses.asdict(result.samples)
        return samples, figures

    arrays, figures = cached_arrays(ctx.config.cache_path, kind, inputs, build, meta_name="utility.json")
    return UtilityResult(**figures, samples=UtilitySamples(**arrays) if arrays else None)


# --- helpers ------------------------------------------------------------------------------------


def _base(ctx: RunContext) -> BaseModel:
    if ctx.base is None:
        raise RuntimeError("the base-model stage has not run")
    return ctx.base


def training_data(dataset: ImageTextDataset, indices: Sequence[int], name: str) -> TrainingData:
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
