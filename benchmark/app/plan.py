"""A suite's plan: what `run_suite` would do, worked out without training, generating or writing anything.

`plan_suite` walks the units in the order `run_suite` runs them, splits each unit's
missing cells into the same groups (one `run_matrix` call each) and applies the
sharing rules of `benchmark.app.stages`:

- per call: one target fine-tune, one shadow per distinct member set (scenarios I/II
  share one, III/IV another), one scoring of the target and of each shadow per
  distinct caption set (I and III both ask with the ground truth; II and IV with their
  own captioner's captions), and the target's utility;
- per suite: fine-tunes and the base model are cached on disk under the keys the stages
  compute (`stages.fine_tune_inputs`, the model source's `locate`), and so are the base
  model's control scores and utility, which every defense of a seed shares, and the
  target's utility and scores, which every call of its unit shares
  (`stages.cached_target_identity`).

What is already in the cache is looked up under those keys, read-only. Entries whose
key needs something only a run computes (the reference networks' weights hashes, a
captioner's captions) are matched on what the plan can compute, or assumed absent; the
plan's notes say which.

Time is estimated from per-step costs: seconds per optimizer step of a defense from the
results folder's records where they hold a fine-tune that was trained there (not
loaded), otherwise from a calibration here that takes a few seconds (a few optimizer
steps of the plain recipe and one sampling batch at two step counts, on the cached base model or an
untrained model of the same architecture). Only training and sampling are estimated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attacks.attack import AttackConfig, Query
from attacks.families import Access
from attacks.scenarios import CaptionSource, Scenario
from benchmark.app import stages
from benchmark.app.config import RunConfig
from benchmark.app.suite import SuiteSpec, _groups, cell_key, finished_cells
from benchmark.kernel.cache import COMPLETE_MARKER, cache_key, check_entry, entry_path, has_entry
from benchmark.kernel.compute import use as use_compute
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.data.base import images_to_tensor
from benchmark.pipeline.finetune import ComposedHooks, TrainConfig, TrainingHooks, train
from benchmark.pipeline.models.diffusion import DiffusionModel, generate, load_model
from benchmark.pipeline.models.registry import MODELS, BaseModel
from benchmark.pipeline.models.tiny import build_tiny_model
from benchmark.pipeline.records import RecordError, read_record, record_files
from benchmark.pipeline.utility_metrics import generation_seeds
from defenses import Defense
from defenses.base import ComposedDefense
from defenses.dpsgd import DPSGDHooks

# Calibration: optimizer steps timed (after one warm-up step), and one sampling batch of at most
# CALIBRATION_IMAGES images through 1 and 1 + CALIBRATION_DENOISING_STEPS steps: seconds on a loaded machine.
CALIBRATION_STEPS = 2
CALIBRATION_IMAGES = 64
CALIBRATION_DENOISING_STEPS = 2
STAGES = ("base model", "fine-tune", "utility", "attack")


@dataclass(frozen=True)
class StepCount:
    """The optimizer steps of one fine-tune, as its recipe and defense fix them.

    Attributes:
        steps: the number of steps (the most there can be where `bound` is "at most").
        bound: "exact"; "at most" where the defense may stop early; "about" where it draws its own batches.
        examples_per_step: mean examples per step (members after any hold-out, per batch).
        note: why the count is not plain epochs x ceil(members / batch size), if it is not.
    """

    steps: int
    bound: str = "exact"
    examples_per_step: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class FineTunePlan:
    """One fine-tune a unit uses: trained by this suite, or loaded from the cache."""

    # "target", or "shadow" with the scenarios that share it (I/II share one member set, III/IV another).
    role: str
    scenarios: tuple[str, ...]
    # The defense it trains under (a naive attacker's shadow: none), whose records give its step cost.
    defense: str
    key: str
    steps: StepCount
    cached: bool
    trains: bool
    seconds: float | None


@dataclass(frozen=True)
class SamplingPlan:
    """Images one model generates (or noise predictions it makes) for one purpose in one run."""

    stage: str
    what: str
    images: int
    # UNet evaluations over all images: denoising steps, twice each with classifier-free guidance.
    unet_calls: int
    seconds: float | None


@dataclass(frozen=True)
class BasePlan:
    """The base model: where it is (or will be) cached, and the pretraining it would need."""

    model: str
    folder: str
    cached: bool
    pretrain_steps: int
    examples_per_step: float
    seconds: float | None


@dataclass(frozen=True)
class Costs:
    """Per-step costs behind the time estimates.

    Attributes:
        step_s: seconds per plain optimizer step at `step_batch` examples (calibration), if measured.
        unet_image_s: seconds per image per UNet evaluation when sampling, if measured.
        step_s_by_defense: seconds per optimizer step from the records' trained fine-tunes, by defense.
        source: how each was obtained.
        calibration_s: seconds the calibration took.
    """

    step_s: float | None = None
    step_batch: int = 1
    unet_image_s: float | None = None
    step_s_by_defense: dict[str, float] = field(default_factory=dict)
    source: str = "none"
    calibration_s: float = 0.0

    def training_seconds(self, steps: int, examples_per_step: float, *, defense: str | None = None) -> float | None:
        """`steps` optimizer steps: at the records' cost for `defense` if they have one, else as calibrated."""
        if defense in self.step_s_by_defense:
            return steps * self.step_s_by_defense[defense]
        if self.step_s is None:
            return None
        # A small model's step costs about in proportion to the examples in it.
        return steps * self.step_s * examples_per_step / self.step_batch

    def sampling_seconds(self, unet_calls: int) -> float | None:
        return None if self.unet_image_s is None else unet_calls * self.unet_image_s


@dataclass
class UnitPlan:
    """One (defense, seed) unit: its cells, and what running its missing ones takes."""

    defense: str
    seed: int
    cells: int
    to_run: int
    runs: int = 0
    fine_tunes: list[FineTunePlan] = field(default_factory=list)
    sampling: list[SamplingPlan] = field(default_factory=list)
    base: BasePlan | None = None

    @property
    def trained(self) -> list[FineTunePlan]:
        return [f for f in self.fine_tunes if f.trains]

    @property
    def steps(self) -> int:
        return sum(f.steps.steps for f in self.trained)

    @property
    def steps_exact(self) -> bool:
        return all(f.steps.bound == "exact" for f in self.trained)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.sampling)

    @property
    def unet_calls(self) -> int:
        return sum(s.unet_calls for s in self.sampling)

    @property
    def seconds(self) -> dict[str, float | None]:
        """Estimated seconds per stage (None: not estimable), the base model's pretraining included."""
        parts: dict[str, list[float | None]] = {name: [] for name in STAGES}
        if self.base is not None and self.base.pretrain_steps:
            parts["base model"].append(self.base.seconds)
        parts["fine-tune"] += [f.seconds for f in self.trained]
        for s in self.sampling:
            parts[s.stage].append(s.seconds)
        return {
            name: None if None in values else sum(v for v in values if v is not None) for name, values in parts.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "defense": self.defense,
            "seed": self.seed,
            "cells": self.cells,
            "cells_to_run": self.to_run,
            "runs": self.runs,
            "fine_tunes": [_with_seconds_rounded(dataclasses.asdict(f)) for f in self.fine_tunes],
            "fine_tunes_trained": len(self.trained),
            "optimizer_steps": self.steps,
            "optimizer_steps_exact": self.steps_exact,
            "sampling": [_with_seconds_rounded(dataclasses.asdict(s)) for s in self.sampling],
            "images": self.images,
            "unet_calls": self.unet_calls,
            "base_model": None if self.base is None else _with_seconds_rounded(dataclasses.asdict(self.base)),
            "seconds": _rounded(self.seconds),
        }


@dataclass
class SuitePlan:
    """What a suite would do: per unit, then in total; `to_dict` is what `--plan --summary FILE` writes."""

    results_dir: str
    cache_dir: str
    units: list[UnitPlan]
    costs: Costs
    notes: list[str] = field(default_factory=list)

    @property
    def cells_to_run(self) -> int:
        return sum(u.to_run for u in self.units)

    @property
    def fine_tunes_trained(self) -> int:
        return sum(len(u.trained) for u in self.units)

    @property
    def fine_tunes_cached(self) -> int:
        """Fine-tunes the units use that are in the cache now."""
        return len({f.key for u in self.units for f in u.fine_tunes if f.cached})

    @property
    def steps(self) -> int:
        return sum(u.steps for u in self.units)

    @property
    def images(self) -> int:
        return sum(u.images for u in self.units)

    @property
    def unet_calls(self) -> int:
        return sum(u.unet_calls for u in self.units)

    @property
    def seconds(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name in STAGES:
            values = [u.seconds[name] for u in self.units]
            out[name] = None if None in values else sum(v for v in values if v is not None)
        return out

    def to_dict(self) -> dict[str, Any]:
        seconds = self.seconds
        return {
            "results_dir": self.results_dir,
            "cache_dir": self.cache_dir,
            "units": [u.to_dict() for u in self.units],
            "totals": {
                "cells": sum(u.cells for u in self.units),
                "cells_to_run": self.cells_to_run,
                "fine_tunes_trained": self.fine_tunes_trained,
                "fine_tunes_cached": self.fine_tunes_cached,
                "optimizer_steps": self.steps,
                "optimizer_steps_exact": all(u.steps_exact for u in self.units),
                "images": self.images,
                "unet_calls": self.unet_calls,
                "seconds": _rounded(seconds),
                "total_seconds": None if None in seconds.values() else round(sum(seconds.values()), 1),  # type: ignore[arg-type]
            },
            "costs": dataclasses.asdict(self.costs),
            "notes": list(self.notes),
        }


# --- the plan ---------------------------------------------------------------------------------


def plan_suite(spec: SuiteSpec, *, calibrate: bool = True) -> SuitePlan:
    """What `run_suite(spec)` would do now, given the results folder and the cache; writes nothing.

    Args:
        calibrate: time a few steps here for the estimates (False: estimates from records only).
    """
    results_dir, cache_dir = spec.config.results_dir, spec.config.cache_path
    done = finished_cells(results_dir)
    walk = _Walk(cache_dir=cache_dir)
    units = []
    for config in spec.units():
        cells = spec.cells(config)
        missing = [c for c in cells if cell_key(c) not in done]
        planned = UnitPlan(defense=config.defense, seed=config.seed, cells=len(cells), to_run=len(missing))
        if missing:
            # Keys carry the precision, as they do inside the run.
            with use_compute(config.compute):
                walk.unit(spec, config, missing, planned)
        units.append(planned)
    costs = _costs(spec, walk, calibrate=calibrate)
    for planned in units:
        _estimate(planned, costs)
    notes = walk.notes()
    plain = sorted({f.defense for u in units for f in u.trained} - set(costs.step_s_by_defense) - {"none"})
    if plain and costs.step_s is not None:
        notes.append(
            f"Fine-tunes of {', '.join(plain)} are timed as plain-recipe steps (no records of theirs here): a "
            "defense's own work per step is left out (a DP-SGD step costs 2.5-2.7x a plain one on the embedded "
            "default, docs/performance.md)."
        )
    return SuitePlan(results_dir=str(results_dir), cache_dir=str(cache_dir), units=units, costs=costs, notes=notes)


@dataclass
class _Unit:
    """One unit as the walk reaches it: its configuration, data, base model and plan so far."""

    config: RunConfig
    data: stages.RunData
    base: BaseModel | None
    plan: UnitPlan
    queries: list[Query]
    # The target's name for what this suite makes of its utility and scores (None: not kept on disk), and
    # its identity in the disk caches where its fine-tune is cached now (else known only once trained).
    target_name: str | None = None
    target_identity: dict[str, object] | None = None

    @property
    def base_identity(self) -> dict[str, object] | None:
        """The base model's identity in the disk caches (None: a user folder's model is never cached by it)."""
        return None if self.base is None else stages.cached_base_identity(self.config, self.base)


@dataclass
class _Walk:
    """What the suite has made so far as its units run in order: the cache as it will be."""

    cache_dir: Path
    # Cache keys (or folders, or names) of base models, fine-tunes, scores and utilities made so far.
    made: set[str] = field(default_factory=set)
    calibration_base: tuple[RunConfig, stages.RunData, BaseModel] | None = None
    # Located base models by request: a user folder's is read from disk, once.
    located: dict[str, BaseModel] = field(default_factory=dict)
    captioned: bool = False
    unlocated: bool = False

    def unit(self, spec: SuiteSpec, config: RunConfig, missing: Sequence[RunConfig], planned: UnitPlan) -> None:
        """The runs of one unit's missing cells, in `run_suite`'s groups: one `run_matrix` call each."""
        data = stages.load_data(config, spec.scenarios, public_size=config.public_split_size, timer=_quiet_timer())
        defense, shadow_defense = stages.defenses(config)
        queries, _ = stages.target_queries(data.dataset, data.splits, seed=config.seed)
        u = _Unit(config=config, data=data, base=self.base(config, data, planned), plan=planned, queries=queries)
        # A naive attacker's shadow trains under no defense, at the cost of `none`'s steps.
        shadow_name = config.defense if shadow_defense is defense else "none"
        for scenarios, attack_models in _groups(missing):
            planned.runs += 1
            # What one run scores once and shares between its scenarios (`RunContext.scores`).
            scored: set[tuple[object, ...]] = set()
            self.fine_tune(u, defense, config.defense, data.splits.members, seed=config.seed, scenarios=())
            self.target(u, defense)
            if config.utility_metrics:
                self.utility(u)
            for scenario in scenarios:
                shadow = data.shadows[scenario]
                seed = config.seed + stages.SHADOW_SEED_OFFSET
                self.fine_tune(
                    u, shadow_defense, shadow_name, shadow.members, seed=seed, scenarios=_sharing(data, shadow.members)
                )
                self.attack(u, scenario, attack_models[0], scored)

    def base(self, config: RunConfig, data: stages.RunData, planned: UnitPlan) -> BaseModel | None:
        locate = MODELS.capability(config.model, "locate")
        if locate is None:
            self.unlocated = True
            return None
        request = stages.base_model_request(config, data)
        named = cache_key(
            {
                "model": config.model,
                "path": request.model_path,
                "dataset": data.dataset.describe(),
                "public": list(request.public_indices),
                "resolution": request.resolution,
                "pretrain": request.pretrain.to_dict(),
            }
        )
        if named not in self.located:
            self.located[named] = locate(request)
        base = self.located[named]
        folder = str(base.model_dir)
        if folder not in self.made:
            self.made.add(folder)
            # Pretrained with the plain recipe (`finetune.train` without hooks), by the first unit that needs it.
            public = len(data.splits.public)
            batches = max(1, math.ceil(public / config.pretrain.batch_size))
            planned.base = BasePlan(
                model=config.model,
                folder=folder,
                cached=base.from_cache,
                pretrain_steps=0 if base.from_cache else config.pretrain.epochs * batches,
                examples_per_step=public / batches,
                seconds=None,
            )
        if self.calibration_base is None:
            self.calibration_base = (config, data, base)
        return base

    def fine_tune(
        self, u: _Unit, defense: Defense, name: str, indices: Sequence[int], *, seed: int, scenarios: tuple[str, ...]
    ) -> None:
        """A fine-tune the run uses: trained if neither the cache nor an earlier unit has it."""
        train_config = stages.fine_tune_config(u.config, seed=seed)
        role = "shadow" if scenarios else "target"
        if u.base is None:
            # Without the base model's identity there is no key: counted as trained.
            key, cached = f"{name} seed {seed} {role} {'/'.join(scenarios)}", False
        else:
            inputs = stages.fine_tune_inputs(u.config, u.base, u.data.dataset, defense, indices, train_config)
            entry = entry_path(self.cache_dir, stages.FINETUNE_CACHE_KIND, inputs)
            key, cached = entry.name, has_entry(entry)
        if any(f.key == key for f in u.plan.fine_tunes):
            return
        trains = not cached and key not in self.made
        self.made.add(key)
        u.plan.fine_tunes.append(
            FineTunePlan(
                role=role,
                scenarios=scenarios,
                defense=name,
                key=key,
                steps=planned_steps(defense, train_config, len(indices)),
                cached=cached,
                trains=trains,
                seconds=None,
            )
        )

    def target(self, u: _Unit, defense: Defense) -> None:
        """The target's names for its utility and scores on disk, as the run computes them once its fine-tune exists."""
        if u.base is None or not stages.keeps_target_work(u.config, u.base, defense):
            return
        train_config = stages.fine_tune_config(u.config, seed=u.config.seed)
        inputs = stages.fine_tune_inputs(u.config, u.base, u.data.dataset, defense, u.data.splits.members, train_config)
        entry = entry_path(self.cache_dir, stages.FINETUNE_CACHE_KIND, inputs)
        u.target_name = cache_key({"fine_tune": entry.name, "defense": defense.describe()})
        # Known now where the fine-tune is cached; one this suite trains is named by its weights once trained.
        if has_entry(entry):
            u.target_identity = stages.cached_target_identity(u.config, u.base, defense, entry)

    def utility(self, u: _Unit) -> None:
        """Each model's utility protocol where no earlier run of this suite or earlier suite measured it."""
        config = u.config
        images = config.utility * config.utility_generations
        if not self.target_utility_kept(u):
            u.plan.sampling.append(_utility_sampling(config, "target: utility protocol", images))
        if not config.control:
            return
        identity = u.base_identity
        if identity is not None:
            eval_set = cache_key(stages.utility_eval_set(u.data))
            key = cache_key({"base-utility": identity, "eval_set": eval_set, "settings": config.utility_settings})
            if key in self.made:
                return
            self.made.add(key)
            if _base_utility_on_disk(self.cache_dir, config, identity, eval_set):
                return
        u.plan.sampling.append(_utility_sampling(config, "base model: utility protocol", images))

    def target_utility_kept(self, u: _Unit) -> bool:
        """Whether the run reads the target's utility from disk, under the key `stages.utility` computes."""
        if u.target_name is None:
            return False
        made = f"target-utility {u.target_name}"
        if made in self.made:
            return True
        self.made.add(made)
        if u.target_identity is None:
            return False
        inputs = stages.target_utility_inputs(u.config, u.data, u.target_identity)
        return has_entry(entry_path(self.cache_dir, stages.TARGET_UTILITY_KIND, inputs))

    def attack(self, u: _Unit, scenario: Scenario, attack_model: str, scored: set[tuple[object, ...]]) -> None:
        """The scenario's scoring of the shadow, the target and the base model, where the run has not done it."""
        shadow = u.data.shadows[scenario]
        config = stages.attacker_config(u.config, scenario, attack_model=attack_model)
        # Per query and model: images generated (none for a gray-box family) and UNet evaluations.
        cost = config.family().cost_per_query(config, u.config.sampling)
        ground_truth = scenario.caption_source is CaptionSource.GROUND_TRUTH
        self.captioned |= not ground_truth
        # The captions asked with: the truth, or those of a captioner fitted on the shadow's data.
        captions: tuple[object, ...] = (
            ("truth",) if ground_truth else ("captioner", *shadow.members, *shadow.nonmembers)
        )
        label = "ground-truth captions" if ground_truth else f"scenario {scenario.value}'s captioner's captions"
        n_shadow = len(shadow.members + shadow.nonmembers)
        jobs = [(("shadow", shadow.members, *captions), f"shadow {scenario.value}", n_shadow, True)]
        if ("target", *captions) not in scored:
            kept = self.scores_kept(u, stages.TARGET_SCORES_KIND, u.target_name, u.target_identity, config, captions)
            jobs.append((("target", *captions), "target", len(u.queries), not kept))
        if ("base", *captions) not in scored:
            jobs.append(
                (
                    ("base", *captions),
                    "base model (control)",
                    len(u.queries),
                    self.control_to_score(u, config, captions),
                )
            )
        for key, who, n, scores in jobs:
            if key in scored or not scores:
                continue
            scored.add(key)
            u.plan.sampling.append(
                SamplingPlan(
                    stage="attack",
                    what=f"{who}: queries, {label}",
                    images=n * cost.images_generated,
                    unet_calls=n * cost.unet_calls,
                    seconds=None,
                )
            )

    def control_to_score(self, u: _Unit, config: AttackConfig, captions: tuple[object, ...]) -> bool:
        """Whether the run scores the base model: with the control on, unless its scores are kept on disk."""
        if not u.config.control:
            return False
        identity = u.base_identity
        name = None if identity is None else cache_key(identity)
        return not self.scores_kept(u, stages.CONTROL_SCORES_KIND, name, identity, config, captions)

    def scores_kept(
        self,
        u: _Unit,
        kind: str,
        name: str | None,
        identity: dict[str, object] | None,
        config: AttackConfig,
        captions: tuple[object, ...],
    ) -> bool:
        """Whether the run reads a model's scores from disk, as `stages._score` keeps them: made by an earlier run
        of this suite, or by an earlier suite.

        Args:
            name: the model's name for what this suite makes (None: its scores are not kept on disk).
            identity: its identity in the cache, where known before the run (`stages.score_inputs`).
        """
        if name is None or u.config.encoder_path is not None:
            return False
        # The encoder's description needs the encoder built, so the match leaves it out.
        inputs = stages.score_inputs(identity or {}, u.queries, config, encoder={})
        del inputs["encoder"]
        if captions[0] != "truth":
            # A captioner's captions are known only once it has run.
            inputs["queries"] = list(captions)
        made = cache_key({"kind": kind, "name": name, **{k: v for k, v in inputs.items() if k != "model"}})
        if made in self.made:
            return True
        self.made.add(made)
        return identity is not None and captions[0] == "truth" and _on_disk(self.cache_dir, kind, inputs)

    def notes(self) -> list[str]:
        out = ["Time covers training and sampling only (not data, encoders, captioners, metrics or loading)."]
        if self.captioned:
            out.append(
                "Scenarios II/IV: counted as if each captioner's captions differed from the ground truth and from "
                "the other captioner's, and as if the base model's control scores for them were not cached by an "
                "earlier suite (their key needs the captions, known only once a captioner has run); where "
                "captions coincide the run scores once, so their images are an upper bound."
            )
        if self.unlocated:
            out.append("The base model cannot be located without building it: every fine-tune is counted as trained.")
        return out


def planned_steps(defense: Defense, train_config: TrainConfig, n: int) -> StepCount:
    """The optimizer steps `defense` takes fine-tuning `n` members under `train_config`, without training.

    epochs x batches per epoch, on the members the defense trains on (early stopping holds
    some out for validation). DP-SGD's Poisson sampling varies the batches' sizes, not
    their number: Opacus draws int(1 / sample_rate) batches per epoch with sample_rate =
    1 / batches, which the float round trip makes one fewer for some sizes (93 -> 92).
    """
    recipe = defense.recipe(train_config)
    hooks = _training_hooks(defense)
    if hooks is None:
        steps = recipe.epochs * math.ceil(n / recipe.batch_size)
        per_step = n / math.ceil(n / recipe.batch_size)
        return StepCount(steps, "about", per_step, "the defense runs its own fine-tuning: steps from its recipe")
    parts = hooks.hooks if isinstance(hooks, ComposedHooks) else [hooks]
    # Distinct placeholders: a hold-out keeps a share of the positions, whatever the images are.
    placeholder = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    n_train = len(hooks.training_data(placeholder, [str(i) for i in range(n)], seed=recipe.seed)[0])
    batches = math.ceil(n_train / recipe.batch_size)
    per_step = n_train / batches
    bound, notes = "exact", []
    if n_train != n:
        notes.append(f"trains on {n_train} of {n} members")
    if any(isinstance(h, DPSGDHooks) for h in parts):
        batches = int(1 / (1 / batches))
        notes.append("Poisson sampling: batch sizes vary, their number does not")
    elif any(_overrides(h, "batches") for h in parts):
        bound = "about"
        notes.append("the defense draws its own batches")
    if any(_overrides(h, "end_epoch") for h in parts):
        bound = "at most"
        notes.append("may stop early")
    return StepCount(recipe.epochs * batches, bound, per_step, "; ".join(notes))


def _training_hooks(defense: Defense) -> TrainingHooks | None:
    """The hooks `defense.fine_tune` trains with; None for a defense that runs its own fine-tuning."""
    if isinstance(defense, ComposedDefense):
        return ComposedHooks([part.training_hooks() for part in defense.parts])
    return defense.training_hooks() if defense.composable() else None


def _overrides(hooks: TrainingHooks, method: str) -> bool:
    return getattr(type(hooks), method) is not getattr(TrainingHooks, method)


def _sharing(data: stages.RunData, members: Sequence[int]) -> tuple[str, ...]:
    """The suite's scenarios whose shadow has these members (I/II share one set, III/IV another)."""
    return tuple(s.value for s, shadow in data.shadows.items() if shadow.members == tuple(members))


def _utility_sampling(unit: RunConfig, what: str, images: int) -> SamplingPlan:
    """The utility protocol's generations: every denoising step, twice with classifier-free guidance."""
    guided = 2 if unit.sampling.guidance_scale != 1.0 else 1
    return SamplingPlan(
        stage="utility",
        what=what,
        images=images,
        unet_calls=images * unit.sampling.num_inference_steps * guided,
        seconds=None,
    )


# --- the cache, read only -----------------------------------------------------------------------


def _on_disk(
    cache_dir: Path, kind: str, inputs: dict[str, Any], *, lacks: Callable[[dict[str, Any]], bool] = lambda _: True
) -> bool:
    """Whether a valid entry of `kind` was made from inputs that agree with `inputs` wherever `inputs` says.

    `inputs` leaves out what only a run computes, such as a network's weights hash; `lacks`
    checks what a stored key must not hold.
    """
    folder = Path(cache_dir) / kind
    if not folder.is_dir():
        return False
    # As the marker stores them (JSON, paths as strings).
    wanted = json.loads(json.dumps(inputs, default=str))
    for marker in sorted(folder.glob(f"*/{COMPLETE_MARKER}")):
        try:
            stored = json.loads(marker.read_text()).get("inputs")
        except (OSError, ValueError, AttributeError):
            continue
        if _agrees(stored, wanted) and lacks(stored) and check_entry(marker.parent) is None:
            return True
    return False


def _agrees(stored: object, wanted: object) -> bool:
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(k in stored and _agrees(stored[k], v) for k, v in wanted.items())
    return stored == wanted


def _base_utility_on_disk(cache_dir: Path, unit: RunConfig, identity: dict[str, object], eval_set: str) -> bool:
    """The base model's utility under this protocol, matched on all of its key but the networks' weights hashes."""
    settings = unit.utility_settings
    images = unit.utility * settings.generations
    protocol: dict[str, object] = {
        "n_real": unit.utility,
        "n_generated": images,
        "kid_subset_size": settings.kid_subset_size,
        "kid_subsets": settings.kid_subsets,
        "seed": settings.seed,
        "generations_per_caption": settings.generations,
        "generation": {
            "seeds": generation_seeds(settings),
            "num_inference_steps": unit.sampling.num_inference_steps,
            "guidance_scale": unit.sampling.guidance_scale,
        },
    }
    if settings.bootstrap:
        protocol["bootstrap"] = {"resamples": settings.bootstrap}
    inputs = {"model": identity, "protocol": protocol, "eval_set": eval_set}
    # A protocol without intervals has no "bootstrap" entry at all.
    return _on_disk(
        cache_dir,
        stages.BASE_UTILITY_KIND,
        inputs,
        lacks=lambda stored: bool(settings.bootstrap) or "bootstrap" not in stored["protocol"],
    )


# --- time -------------------------------------------------------------------------------------


def _costs(spec: SuiteSpec, walk: _Walk, *, calibrate: bool) -> Costs:
    """Per-step costs: each defense's from the records where they have it, the rest calibrated here."""
    by_defense, record_unet = _record_costs(spec.config)
    measured: Costs | None = None
    # A base model is located only for units with cells to run: nothing to run, nothing to time.
    if calibrate and walk.calibration_base is not None:
        measured = calibrate_costs(*walk.calibration_base)
    sources = []
    if by_defense:
        sources.append(f"fine-tune steps of {', '.join(sorted(by_defense))}: records in {spec.config.results_dir}")
    if measured is not None:
        sources.append(
            f"calibrated here in {measured.calibration_s:.1f} s: {CALIBRATION_STEPS} plain optimizer steps "
            f"and one sampling batch at two step counts ({measured.source})"
        )
    # The records' sampling cost is measured on whole runs: it wins over a few seconds' calibration.
    unet = record_unet if record_unet is not None else (measured.unet_image_s if measured is not None else None)
    if record_unet is not None:
        sources.append(f"sampling: records in {spec.config.results_dir}")
    return Costs(
        step_s=None if measured is None else measured.step_s,
        step_batch=1 if measured is None else measured.step_batch,
        unet_image_s=unet,
        step_s_by_defense=by_defense,
        source="; ".join(sources) or "none: no records with timings and no calibration",
        calibration_s=0.0 if measured is None else measured.calibration_s,
    )


def calibrate_costs(config: RunConfig, data: stages.RunData, base: BaseModel) -> Costs | None:
    """Time a few plain optimizer steps and one sampling batch here, writing nothing.

    On the cached base model where it is in the cache; else, for the tiny model, on an
    untrained one of the same architecture (same cost per step). A user folder's model
    (Stable Diffusion) is not timed: on a CPU one step alone takes longer than a plan should.
    """
    start = time.perf_counter()
    with use_compute(config.compute):
        if base.from_cache and stages.cached_base_identity(config, base) is not None:
            model, source = load_model(base.model_dir), "the cached base model"
        elif config.model == "tiny":
            request = stages.base_model_request(config, data)
            captions = [data.dataset.caption(i) for i in data.splits.public]
            model = build_tiny_model(
                corpus=captions, resolution=config.resolution, config=request.tiny, seed=config.pretrain.seed
            )
            source = "an untrained model of the base model's architecture"
        else:
            return None
        batch = min(config.finetune.batch_size, len(data.splits.members))
        step_s = _time_steps(model, config, data, batch)
        unet_image_s = _time_sampling(model, config, data)
    return Costs(
        step_s=step_s,
        step_batch=batch,
        unet_image_s=unet_image_s,
        source=source,
        calibration_s=time.perf_counter() - start,
    )


def _time_steps(model: DiffusionModel, config: RunConfig, data: stages.RunData, batch: int) -> float:
    indices = data.splits.members[:batch]
    images = images_to_tensor([data.dataset.image(i) for i in indices])
    captions = [data.dataset.caption(i) for i in indices]
    recipe = dataclasses.replace(
        stages.fine_tune_config(config, seed=config.seed), epochs=CALIBRATION_STEPS + 1, batch_size=batch
    )
    stamps: list[float] = []
    train(model, images, captions, recipe, on_step=lambda step, total, loss: stamps.append(time.perf_counter()))
    # The first step pays for warm-up (allocations, encoding the captions): timed from its end.
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def _time_sampling(model: DiffusionModel, config: RunConfig, data: stages.RunData) -> float:
    sampling = config.sampling
    queries = len(data.splits.members) + len(data.splits.nonmembers)
    batch = max(
        1, min(sampling.batch_size, config.query_batch * config.generations_per_query, queries, CALIBRATION_IMAGES)
    )
    captions = [data.dataset.caption(i) for i in (data.splits.members + data.splits.nonmembers)][:batch]
    captions += captions[: batch - len(captions)]
    guidance = sampling.guidance_scale
    generate(model, captions[:2], seed=0, num_inference_steps=1, guidance_scale=guidance)  # warm-up

    def timed(steps: int) -> float:
        start = time.perf_counter()
        generate(model, captions, seed=0, num_inference_steps=steps, guidance_scale=guidance, batch_size=batch)
        return time.perf_counter() - start

    # A batch costs a fixed part (text encoding, VAE decoding) plus one UNet pass per step. Timed at a
    # single step count, the fixed part was charged to each step: on the embedded default that put
    # the estimate at 3x the measured cost. Two step counts separate them.
    short, long = timed(1), timed(1 + CALIBRATION_DENOISING_STEPS)
    per_step = max(long - short, 0.0) / CALIBRATION_DENOISING_STEPS
    fixed = max(short - per_step, 0.0)
    steps = max(1, sampling.num_inference_steps)
    unet_passes = len(captions) * steps * (2 if guidance != 1.0 else 1)
    # All-in seconds per image per UNet evaluation at the run's own step count.
    return (fixed + steps * per_step) / unet_passes


def _record_costs(config: RunConfig) -> tuple[dict[str, float], float | None]:
    """Seconds per optimizer step by defense, and per image per UNet evaluation, from the results folder's records.

    Only records of the same model, resolution and fine-tuning batch size count, and only
    fine-tunes trained in that run (not loaded from the cache).
    """
    steps: dict[str, list[float]] = {}
    unet: list[float] = []
    folder = Path(config.results_dir)
    if not folder.is_dir():
        return {}, None
    same = {"model": config.model, "resolution": config.resolution}
    for path in record_files(folder):
        try:
            record = read_record(path)
        except (RecordError, OSError, ValueError, KeyError, TypeError):
            continue
        stored = record.config
        if any(stored.get(k) != v for k, v in same.items()):
            continue
        if (stored.get("finetune") or {}).get("batch_size") != config.finetune.batch_size:
            continue
        target, seconds = record.training.target, record.timings_s.get("fine-tune target")
        if seconds and not target.get("from_cache") and int(target.get("steps") or 0) > 0:
            steps.setdefault(str(stored.get("defense")), []).append(seconds / int(target["steps"]))
        attack, sampling = record.attack, stored.get("sampling") or {}
        generated, took = attack.images_generated, record.timings_s.get("attack: target")
        if took and generated and (attack.access or "black-box") != Access.GRAY_BOX.value:
            per_image = int(sampling.get("num_inference_steps", 0)) * (
                2 if sampling.get("guidance_scale", 1.0) != 1.0 else 1
            )
            if per_image > 0:
                unet.append(took / (generated * per_image))
    by_defense = {name: statistics.median(values) for name, values in steps.items()}
    return by_defense, statistics.median(unet) if unet else None


def _estimate(planned: UnitPlan, costs: Costs) -> None:
    """Fill in each fine-tune's and each sampling job's seconds from `costs`."""
    # Shadows of an aware attacker train under the target's defense; a naive one's, under none.
    planned.fine_tunes = [
        dataclasses.replace(
            f,
            seconds=costs.training_seconds(f.steps.steps, f.steps.examples_per_step, defense=f.defense)
            if f.trains
            else 0.0,
        )
        for f in planned.fine_tunes
    ]
    planned.sampling = [dataclasses.replace(s, seconds=costs.sampling_seconds(s.unet_calls)) for s in planned.sampling]
    base = planned.base
    if base is not None and base.pretrain_steps:
        planned.base = dataclasses.replace(
            base, seconds=costs.training_seconds(base.pretrain_steps, base.examples_per_step)
        )


def _rounded(seconds: dict[str, float | None]) -> dict[str, float | None]:
    return {k: None if v is None else round(v, 1) for k, v in seconds.items()}


def _with_seconds_rounded(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "seconds": None if item["seconds"] is None else round(item["seconds"], 2)}


def _quiet_timer() -> StageTimer:
    return StageTimer(Console(quiet=True), show=False)


# --- output -----------------------------------------------------------------------------------


def show_plan(spec: SuiteSpec, *, console: Console, summary: Path | None = None, executor: str = "local") -> int:
    """`suite --plan`: print what the suite would do (and write it to `summary` as JSON); trains nothing.

    Args:
        executor: where the units would run; the plan assumes one after another, as the local executor runs them.

    Returns:
        the exit code, 0.
    """
    plan = plan_suite(spec)
    if executor != "local":
        plan.notes.append(
            f"Counted as the local executor runs units, one after another; with {executor}, units that run at "
            "once may each build what they share (the base model, a naive attacker's shadows), and time is "
            "divided among the workers."
        )
    for table in render(plan):
        console.print(table)
    base = next((u.base for u in plan.units if u.base is not None), None)
    if base is not None:
        what = "cached" if base.cached else f"not cached: it would be pretrained first ({base.pretrain_steps:,} steps)"
        console.print(f"base model ({base.model}): {what}", soft_wrap=True)
    console.print(f"time estimated from: {escape(plan.costs.source)}", soft_wrap=True)
    for note in plan.notes:
        console.print(f"[dim]note:[/] {escape(note)}", soft_wrap=True)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0


def render(plan: SuitePlan) -> list[Table]:
    """Two tables, one row per unit and a row of totals: what each unit does, and its estimated time per stage."""
    work = Table(
        title=f"suite plan: {plan.cells_to_run} cell(s) to run, {plan.fine_tunes_trained} fine-tune(s) to train",
        caption="fine-tunes: trained / loaded from the cache; steps: optimizer steps of those trained (<= where "
        "early stopping may end them sooner); UNet: denoising steps x images (x2 with guidance)",
        box=box.SIMPLE_HEAD,
    )
    time_table = Table(title="estimated time per stage", box=box.SIMPLE_HEAD)
    work.add_column("unit")
    time_table.add_column("unit")
    for name in ("cells", "fine-tunes", "steps", "images", "UNet"):
        work.add_column(name, justify="right")
    for name in (*STAGES, "total"):
        time_table.add_column(name, justify="right")
    for unit in plan.units:
        label = escape(f"{unit.defense} s{unit.seed}")
        work.add_row(
            label,
            f"{unit.to_run}/{unit.cells}",
            f"{len(unit.trained)}/{len(unit.fine_tunes) - len(unit.trained)}",
            _steps(unit.steps, unit.steps_exact),
            f"{unit.images:,}",
            f"{unit.unet_calls:,}",
        )
        time_table.add_row(label, *_times(unit.seconds))
    loaded = sum(len(u.fine_tunes) - len(u.trained) for u in plan.units)
    work.add_section()
    work.add_row(
        "total",
        f"{plan.cells_to_run}/{sum(u.cells for u in plan.units)}",
        f"{plan.fine_tunes_trained}/{loaded}",
        _steps(plan.steps, all(u.steps_exact for u in plan.units)),
        f"{plan.images:,}",
        f"{plan.unet_calls:,}",
        style="bold",
    )
    time_table.add_section()
    time_table.add_row("total", *_times(plan.seconds), style="bold")
    return [work, time_table]


def _steps(steps: int, exact: bool) -> str:
    return f"{steps:,}" if exact else f"<= {steps:,}"


def _times(seconds: dict[str, float | None]) -> list[str]:
    values = [seconds[name] for name in STAGES]
    total = None if None in values else sum(v for v in values if v is not None)
    return [_duration(v) for v in (*values, total)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds == 0:
        return "-"
    if seconds < 100:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 100 else f"{minutes / 60:.1f} h"
