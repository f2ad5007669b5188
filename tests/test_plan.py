"""A suite's plan (`suite --plan`): it trains nothing, and it agrees with what the suite then does."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from attacks.scenarios import Scenario
from benchmark.app.cli import main
from benchmark.app.config import profile
from benchmark.app.plan import SuitePlan, plan_suite, planned_steps
from benchmark.app.suite import SuiteSpec, run_suite
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.models import diffusion
from benchmark.pipeline.records import read_record
from defenses import resolve
from defenses.early_stop import holdout_split


def _spec(root: Path, results: str = "results") -> SuiteSpec:
    config = profile("micro").replace(results_dir=root / results, cache_dir=root / "cache", bootstrap_resamples=0)
    return SuiteSpec(
        config=config,
        defenses=("none", "augment.all"),
        scenarios=(Scenario.I, Scenario.III),
        attack_models=("threshold",),
        seeds=(0,),
    )


class _SamplingCounter:
    """Counts what the denoising loop itself does: every generation (attack and utility) passes through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        self.unet_calls = 0
        denoise = diffusion._denoise

        def counting(unet, scheduler, latents, context, timesteps, guidance_scale):  # type: ignore[no-untyped-def]
            self.images += len(latents)
            self.unet_calls += len(latents) * len(timesteps) * (2 if guidance_scale != 1.0 else 1)
            return denoise(unet, scheduler, latents, context, timesteps, guidance_scale)

        monkeypatch.setattr(diffusion, "_denoise", counting)


def _run_and_check(spec: SuiteSpec, plan: SuitePlan, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the suite and check every count of `plan` against what it did."""
    counter = _SamplingCounter(monkeypatch)
    report = run_suite(spec, show_progress=False)
    assert not report.failed
    assert len(report.written) == plan.cells_to_run
    assert (counter.images, counter.unet_calls) == (plan.images, plan.unet_calls)

    # Each record's training reports are those of the unit's planned target and of the shadow planned for its scenario.
    units = {(u.defense, u.seed): u for u in plan.units}
    seen: dict[str, dict[str, Any]] = {}
    for record in (read_record(p) for p in report.written):
        unit = units[(record.config["defense"], record.seeds["seed"])]
        [target] = [f for f in unit.fine_tunes if f.role == "target"]
        [shadow] = [f for f in unit.fine_tunes if record.scenario in f.scenarios]
        for planned, trained in ((target, record.training.target), (shadow, record.training.shadow)):
            assert trained["steps"] == planned.steps.steps and trained["from_cache"] is not planned.trains
            # Units may share a fine-tune (a generation-time defense uses the plain one): the first trains it.
            seen.setdefault(planned.key, trained)
    assert len(seen) == len({f.key for u in plan.units for f in u.fine_tunes})
    assert sum(r["steps"] for r in seen.values() if not r["from_cache"]) == plan.steps
    assert sum(not r["from_cache"] for r in seen.values()) == plan.fine_tunes_trained


def test_plan_agrees_with_what_the_suite_does_cold_then_warm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path)
    cold = plan_suite(spec, calibrate=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()
    assert cold.cells_to_run == 4 and cold.fine_tunes_trained == 6 and cold.fine_tunes_cached == 0
    [base] = [u.base for u in cold.units if u.base is not None]
    assert not base.cached and base.pretrain_steps > 0
    _run_and_check(spec, cold, monkeypatch)
    # The cache holds exactly the fine-tunes the plan named, under the keys it computed.
    planned_keys = {f.key for u in cold.units for f in u.fine_tunes}
    assert {p.name for p in (tmp_path / "cache" / "finetuned").iterdir()} == planned_keys

    done = plan_suite(spec, calibrate=False)
    assert (done.cells_to_run, done.fine_tunes_trained, done.steps, done.images) == (0, 0, 0, 0)
    # Its records now say what a step of each defense and a denoising step cost here.
    assert set(done.costs.step_s_by_defense) == {"none", "augment.all"} and done.costs.unet_image_s

    # A new results folder on the same cache: every fine-tune, the base model, its control scores and
    # utility, and the targets' utility and scores are cached; what is left is the shadows' queries.
    warm_spec = _spec(tmp_path, results="results-again")
    warm = plan_suite(warm_spec, calibrate=False)
    assert warm.cells_to_run == 4 and warm.fine_tunes_trained == 0 and warm.fine_tunes_cached == 6
    assert all(u.base is None or u.base.cached for u in warm.units)
    assert {s.what.split(":")[0] for u in warm.units for s in u.sampling} == {"shadow I", "shadow III"}
    _run_and_check(warm_spec, warm, monkeypatch)


def test_plan_counts_the_target_work_kept_between_a_units_suites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference suite's way: scenario III for every unit, then scenario I into the same folder."""
    first = dataclasses.replace(_spec(tmp_path), defenses=("none", "wen.infer"), scenarios=(Scenario.III,))
    _run_and_check(first, plan_suite(first, calibrate=False), monkeypatch)
    later = dataclasses.replace(first, scenarios=(Scenario.I,))
    plan = plan_suite(later, calibrate=False)
    assert plan.cells_to_run == 2 and plan.fine_tunes_trained == 1  # scenario I's shadow, which both share
    targets = {u.defense: sorted(s.what.split(":")[0] for u in [u] for s in u.sampling) for u in plan.units}
    # none's utility and ground-truth scores are on disk; wen.infer shares its fine-tune but samples its
    # own way, and its record counts what its hooks did in the run: measured and scored again.
    assert targets == {"none": ["shadow I"], "wen.infer": ["shadow I", "target", "target"]}
    _run_and_check(later, plan, monkeypatch)


def test_cli_plan_trains_nothing_and_writes_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, results, summary = tmp_path / "cache", tmp_path / "results", tmp_path / "plan.json"
    # fmt: off
    code = main([
        "suite", "--plan", "--profile", "micro", "--defenses", "none,augment.all", "--scenarios", "I,III",
        "--attack-models", "threshold", "--results-dir", str(results), "--cache-dir", str(cache),
        "--summary", str(summary), "--quiet",
    ])
    # fmt: on
    assert code == 0
    assert not cache.exists() and not results.exists()
    err = capsys.readouterr().err
    assert "4 cell(s) to run, 6 fine-tune(s) to train" in err and "calibrated here" in err
    written = json.loads(summary.read_text())
    totals = written["totals"]
    assert (totals["cells_to_run"], totals["fine_tunes_trained"], totals["optimizer_steps"]) == (4, 6, 18)
    # Calibrated: every stage has an estimate.
    assert None not in totals["seconds"].values() and totals["total_seconds"] > 0


def test_planned_steps_follow_the_defense() -> None:
    recipe = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3)
    assert planned_steps(resolve("none"), recipe, 50).steps == 2 * math.ceil(50 / 8)
    # Early stopping trains on what it does not hold out, and may stop sooner.
    stop = planned_steps(resolve("early_stop.best"), recipe, 50)
    kept, _ = holdout_split(50, 0.2, seed=recipe.seed)
    assert (stop.steps, stop.bound) == (2 * math.ceil(len(kept) / 8), "at most")
    # DP-SGD: as many Poisson batches per epoch as Opacus' loader yields (93 batches of 1 give 92).
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(93)), batch_size=1))
    dp = planned_steps(resolve("dpsgd.eps8"), TrainConfig(epochs=1, batch_size=1, learning_rate=1e-3), 93)
    assert (dp.steps, dp.bound) == (len(loader), "exact") and len(loader) == 92
