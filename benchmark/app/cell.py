"""One attack cell: fit an attack model on the shadow, apply it once to the target, assemble the record.

The scenario's evidence (`benchmark.app.stages.ScenarioEvidence`) is shared by
every attack model of the scenario; what differs per cell is built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource

import numpy as np

from attacks.attack import ModelFreeBaseline, fit_attack_model
from attacks.attack_models import ATTACK_MODELS
from attacks.captioners import CAPTIONERS
from attacks.encoders import ENCODERS
from attacks.families import ATTACK_FAMILIES, Access
from attacks.scenarios import QueryAccess, ShadowMode
from benchmark.app.config import RunConfig
from benchmark.app.stages import SHADOW_SEED_OFFSET, RunContext, ScenarioEvidence, Target
from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.plugins import component_origin
from benchmark.pipeline.data.base import DATASETS
from benchmark.pipeline.models.registry import MODELS
from benchmark.pipeline.plots import roc_plot_png
from benchmark.pipeline.privacy_metrics import BootstrapSpec, PrivacyMetrics, privacy_metrics
from benchmark.pipeline.records import (
    AttackRecord,
    ComponentRecord,
    ResultRecord,
    TrainingRecord,
    attachment_name,
    new_run_id,
    provenance,
)
from defenses import DEFENSES

ROC_SUFFIX = ".roc.png"


def _with_sampling(described: dict[str, object], target: Target) -> dict[str, object]:
    """The defense's description plus what its sampling hooks did in the target's generations so far."""
    done = target.model.model.sampling_hooks.details()
    return {**described, "sampling": done} if done else described


def cell_record(
    ctx: RunContext, target: Target, evidence: ScenarioEvidence, config: RunConfig
) -> tuple[ResultRecord, bytes]:
    """Fit one attack model on the shadow, apply it once to the target, and build the record."""
    attack_config = dataclasses.replace(evidence.attack_config, attack_model=config.attack_model)
    dataset, splits, shadow = ctx.data.dataset, ctx.data.splits, evidence.shadow
    defense, shadow_defense, encoder, captioner = ctx.defense, ctx.shadow_defense, target.encoder, evidence.captioner
    base = ctx.base
    assert base is not None, "the base-model stage runs before any cell"
    target_labels, shadow_labels = target.labels, evidence.shadow_labels
    target_scores, shadow_scores, base_scores = evidence.target_scores, evidence.shadow_scores, evidence.base_scores
    utility = target.utility
    bootstrap = BootstrapSpec(n_resamples=config.bootstrap_resamples, seed=config.seed)
    spec = bootstrap if config.bootstrap_resamples > 0 else None
    family = evidence.family
    access = family.access(attack_config.query_access)
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
    baseline_model = None
    if evidence.baseline_shadow_features is not None and target.baseline_features is not None:
        shadow_features, target_features = evidence.baseline_shadow_features, target.baseline_features
        baseline_model = ModelFreeBaseline(attack_config.attack_model).fit(shadow_features, shadow_labels)
        baseline_membership = baseline_model.membership_score(target_features)
        baseline_privacy = privacy_metrics(
            target_labels, baseline_membership, baseline_model.predict(target_features), bootstrap=spec
        )
        curves["model-free baseline"] = (target_labels, baseline_membership)

    run_id = new_run_id(config.defense, config.seed)
    described = dataset.describe()
    components = {
        "dataset": ComponentRecord.from_description(
            {
                **described,
                # Shared by every run with this public seed: named by a digest, not listed in each record.
                "public_split": {
                    "n": len(splits.public),
                    "sha256": hashlib.sha256("\n".join(dataset.ids[i] for i in splits.public).encode()).hexdigest(),
                },
            },
            origin=component_origin(DATASETS, config.dataset),
        ),
        "model": ComponentRecord.from_description(
            base.description, origin=component_origin(MODELS, config.model), from_cache=base.from_cache
        ),
        "defense": ComponentRecord.from_description(
            _with_sampling(defense.describe(), target), origin=component_origin(DEFENSES, config.defense)
        ),
        "attack": ComponentRecord.from_description(
            family.describe(attack_config),
            version=family.version,
            origin=component_origin(ATTACK_FAMILIES, attack_config.attack),
        ),
        "attack_model": ComponentRecord.from_description(
            attack_model.describe(),
            version=attack_model.version,
            origin=component_origin(ATTACK_MODELS, attack_config.attack_model),
        ),
        "encoder": ComponentRecord.from_description(
            encoder.describe(), version=encoder.version, origin=component_origin(ENCODERS, config.encoder)
        ),
    }
    if captioner is not None:
        components["captioner"] = ComponentRecord.from_description(
            captioner.describe(), version=captioner.version, origin=component_origin(CAPTIONERS, config.captioner)
        )
    if baseline_model is not None:
        components["baseline"] = ComponentRecord.from_description(
            baseline_model.describe(),
            version=baseline_model.version,
            origin=component_origin(ATTACK_MODELS, attack_config.attack_model),
        )
    scenario = attack_config.scenario
    record = ResultRecord(
        run_id=run_id,
        provenance=provenance(compute=current_compute().describe()),
        seeds={"seed": config.seed, "public_seed": config.public_seed, "shadow_seed": config.seed + SHADOW_SEED_OFFSET},
        config=config.to_dict(),
        components=components,
        splits={
            **{name: [dataset.ids[i] for i in idx] for name, idx in splits.as_dict().items() if name != "public"},
            "shadow_members": [dataset.ids[i] for i in shadow.members],
            "shadow_nonmembers": [dataset.ids[i] for i in shadow.nonmembers],
        },
        training=TrainingRecord(target=target.model.report, shadow=evidence.shadow_model.report),
        attack=AttackRecord(
            **attack_config.to_dict(),  # type: ignore[arg-type]
            caption_source=scenario.caption_source.value,
            captioner_fine_tuned=config.captioner_finetune if captioner is not None else None,
            caption_exact_match=evidence.caption_match,
            shadow_mode=config.shadow.value,
            shadow_defense=str(shadow_defense.describe().get("name", "?")),
            defense_aware_shadow=config.shadow is ShadowMode.AWARE,
            queries_spent=target_scores.queries_spent,
            images_generated=target_scores.images_generated,
            images_per_second=round(target_scores.images_per_second, 3),
            model_time_fraction=round(min(1.0, target_scores.model_time_fraction), 4),
            query_batch=attack_config.query_batch,
            shadow_queries_spent=shadow_scores.queries_spent,
            shadow_overlap_with_target_members=shadow.overlap_with_target_members,
            query_ids=list(target_scores.query_ids),
            captions=list(target_scores.captions),
            labels=[int(v) for v in target_labels],
            scores=target_scores.scores.tolist(),
            membership_scores=[float(v) for v in membership],
            predictions=[int(v) for v in predictions],
            shadow_fit=shadow_privacy,
            roc_plot=attachment_name(run_id, ROC_SUFFIX),
            family=attack_config.attack,
            family_version=family.version,
            access=access.value,
            hyperparameters=family.hyperparameters(attack_config),
            cost_per_query=family.cost_per_query(attack_config, config.sampling).to_dict(),
            unet_calls=target_scores.unet_calls if access is Access.GRAY_BOX else None,
        ),
        privacy=privacy,
        control=control,
        baseline=baseline_privacy,
        utility=utility.record() if utility is not None else None,
        timings_s=evidence.timings,
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        accelerator_memory_mb=dict(ctx.timer.memory_mb) or None,
        notes=_notes(privacy, config),
    )
    plot = roc_plot_png(
        curves,
        title=(
            f"{record.dataset} / scenario {scenario.value} / {config.defense} / "
            f"{attack_config.attack} + {attack_config.attack_model} ({access.value})"
        ),
    )
    return record, plot


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
                f"(needs >= {int(np.ceil(1 / entry.target_fpr))}); use --profile full"
            )
    return notes
