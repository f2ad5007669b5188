"""Work the runs of one unit share on disk: the target's utility and its scores on the ground truth.

A suite may run a unit's scenario III in one call (or process) and its scenario I in a later one,
as the reference suite does. Both ask the same target for its utility and for its scores on the
ground-truth captions: the later call reads them from the cache, and its records equal those of one
cold call that runs both scenarios.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import benchmark.app.runner as runner
from attacks.attack_models import for_family
from attacks.families import DEFAULT_FAMILY
from attacks.scenarios import Scenario
from benchmark.app import stages
from benchmark.app.config import RunConfig, profile
from benchmark.kernel.cache import COMPLETE_MARKER, entry_digest
from benchmark.kernel.compute import Compute, use
from benchmark.kernel.progress import StageTimer
from benchmark.pipeline.models.registry import BaseModel
from benchmark.pipeline.records import ResultRecord
from benchmark.pipeline.target import SamplingConfig
from defenses import resolve

MODELS = for_family(DEFAULT_FAMILY)


class _Counting:
    """What the stages compute rather than read: utility measurements, and scorings by model name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.measured = 0
        self.scored: list[str] = []
        measure, score = stages.measure_utility, stages.score_queries

        def measuring(**kwargs: Any) -> Any:
            self.measured += 1
            return measure(**kwargs)

        def scoring(target: Any, queries: Any, config: Any, **kwargs: Any) -> Any:
            self.scored.append(target.name)
            return score(target, queries, config, **kwargs)

        monkeypatch.setattr(stages, "measure_utility", measuring)
        monkeypatch.setattr(stages, "score_queries", scoring)


def _run(
    config: RunConfig, *scenarios: Scenario, attack_models: tuple[str, ...] = MODELS
) -> tuple[dict[tuple[str, str], ResultRecord], _Counting]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        counting = _Counting(monkeypatch)
        outcomes = runner.run_matrix(config, scenarios=scenarios, attack_models=attack_models, show_progress=False)
    return {(o.record.scenario, o.record.attack.attack_model): o.record for o in outcomes}, counting


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Scenario III, then scenario I in a separate call on the same cache; and both in one call on a new cache."""
    root = tmp_path_factory.mktemp("shared-work")
    config = profile("micro").replace(results_dir=root / "results", cache_dir=root / "cache")
    first, first_counts = _run(config, Scenario.III)
    later, later_counts = _run(config, Scenario.I)
    cold, _ = _run(
        config.replace(results_dir=root / "cold-results", cache_dir=root / "cold-cache"), Scenario.I, Scenario.III
    )
    return {
        "config": config,
        "first": (first, first_counts),
        "later": (later, later_counts),
        "cold": cold,
    }


def test_a_later_call_reads_the_target_utility_and_scores_from_disk(shared: dict[str, Any]) -> None:
    first, first_counts = shared["first"]
    later, later_counts = shared["later"]
    # The first call measured the target and the base model, and scored all three models.
    assert first_counts.measured == 2 and sorted(first_counts.scored) == ["base", "shadow", "target"]
    # The later one trains and scores scenario I's own shadow; the rest it reads.
    assert later_counts.measured == 0 and later_counts.scored == ["shadow"]
    cache = shared["config"].cache_path
    assert len(list((cache / stages.TARGET_UTILITY_KIND).iterdir())) == 1
    assert len(list((cache / stages.TARGET_SCORES_KIND).iterdir())) == 1
    assert later[("I", "threshold")].training.target["from_cache"] is True


def _comparable(record: ResultRecord) -> dict[str, Any]:
    """The record without what differs between any two runs (ids, dates, timings, folders, from-cache flags)."""
    # A copy: records of one call share their training reports.
    data = copy.deepcopy(record.to_dict())
    for key in ("run_id", "timings_s", "peak_memory_mb", "accelerator_memory_mb"):
        data.pop(key, None)
    data["provenance"].pop("created")
    data["attack"].pop("roc_plot")  # named by the run id
    # Timings: the seconds the scoring took, read with the scores.
    data["attack"].pop("images_per_second")
    data["attack"].pop("model_time_fraction")
    for key in ("results_dir", "cache_dir"):
        data["config"].pop(key)
    for report in data["training"].values():
        report.pop("from_cache")
    data["components"]["model"].pop("from_cache")
    data["utility"]["clip_model"]["details"].pop("from_cache")
    return data


def test_records_equal_those_of_one_cold_call(shared: dict[str, Any]) -> None:
    later, _ = shared["later"]
    first, _ = shared["first"]
    cold = shared["cold"]
    for model in MODELS:
        for scenario, records in (("I", later), ("III", first)):
            read, computed = records[(scenario, model)], cold[(scenario, model)]
            assert _comparable(read) == _comparable(computed), (scenario, model)
    # What was read is what the cold call computed, to the last digit.
    read, computed = later[("I", "threshold")], cold[("I", "threshold")]
    assert read.attack.scores == computed.attack.scores and read.privacy.auc == computed.privacy.auc
    assert read.utility is not None and computed.utility is not None
    assert read.utility.target == computed.utility.target and read.utility.intervals == computed.utility.intervals
    assert read.utility.vs_base_model == computed.utility.vs_base_model and read.utility.vs_base_model


def test_a_generation_time_defense_shares_the_fine_tune_but_not_the_utility(shared: dict[str, Any]) -> None:
    config = shared["config"].replace(defense="wen.infer", control=False)
    cache = config.cache_path
    before = {kind: set((cache / kind).iterdir()) for kind in (stages.TARGET_UTILITY_KIND, stages.TARGET_SCORES_KIND)}
    records, counting = _run(config, Scenario.III)
    record = records[("III", "threshold")]
    # The plain recipe's fine-tune, sampled its own way: measured and scored again, and not kept.
    assert record.training.target["from_cache"] is True
    assert counting.measured == 1 and "target" in counting.scored
    assert record.components["defense"].details["sampling"]["prompts"] > 0
    assert {kind: set((cache / kind).iterdir()) for kind in before} == before


def test_a_gray_box_family_reads_its_scores_with_their_costs(shared: dict[str, Any]) -> None:
    config = shared["config"].replace(attack="loss", control=False)
    first, _ = _run(config, Scenario.III, attack_models=("threshold",))
    later, counting = _run(config, Scenario.I, attack_models=("threshold",))
    assert "target" not in counting.scored
    computed, read = first[("III", "threshold")].attack, later[("I", "threshold")].attack
    assert read.access == "gray-box" and read.unet_calls is not None and read.unet_calls > 0
    for field in ("scores", "query_ids", "captions", "queries_spent", "images_generated", "unet_calls"):
        assert getattr(read, field) == getattr(computed, field), field


def _stored_inputs(cache: Path, kind: str) -> dict[str, Any]:
    [marker] = (cache / kind).glob(f"*/{COMPLETE_MARKER}")
    return json.loads(marker.read_text())["inputs"]


def test_the_keys_name_the_defense_sampling_precision_and_protocol(shared: dict[str, Any], tmp_path: Path) -> None:
    config: RunConfig = shared["config"]
    cache = config.cache_path
    stored = _stored_inputs(cache, stages.TARGET_UTILITY_KIND)
    fine_tune = cache / stages.FINETUNE_CACHE_KIND / stored["model"]["fine_tune"]
    [base_dir] = (cache / "base-tiny").iterdir()
    base = BaseModel(model_dir=base_dir, from_cache=True, description={})
    none = resolve("none")
    identity = stages.cached_target_identity(config, base, none, fine_tune)
    assert identity == stored["model"]
    # wen.infer shares the fine-tune but samples otherwise; ren.both too; neither keeps its work on disk.
    assert stages.cached_target_identity(config, base, resolve("wen.infer"), fine_tune) is None
    assert stages.cached_target_identity(config, base, resolve("ren.both"), fine_tune) is None
    others = [
        stages.cached_target_identity(config, base, resolve("augment.all"), fine_tune),
        stages.cached_target_identity(
            config.replace(sampling=SamplingConfig(num_inference_steps=5)), base, none, fine_tune
        ),
    ]
    with use(Compute(precision="bf16")):
        others.append(stages.cached_target_identity(config, base, none, fine_tune))
    assert None not in others and identity not in others
    # A user folder's base model is not cache-addressed: nothing of its targets is kept.
    user_base = BaseModel(model_dir=tmp_path / "my-model", from_cache=False, description={})
    assert stages.cached_target_identity(config, user_base, none, fine_tune) is None

    # The utility's key: every setting of the protocol.
    timer = StageTimer(Console(quiet=True), show=False)
    data = stages.load_data(config, [Scenario.III], public_size=config.public_split_size, timer=timer)
    assert identity is not None
    key = stages.target_utility_inputs(config, data, identity)
    assert key == stored
    for change in ({"utility_bootstrap": 7}, {"utility_generations": 3}, {"kid_subset_size": 3}, {"seed": 1}):
        assert stages.target_utility_inputs(config.replace(**change), data, identity) != key, change


def test_the_weights_digest_follows_the_entry_contents(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    assert entry_digest(entry) is None
    (entry / COMPLETE_MARKER).write_text(json.dumps({"files": {"unet.safetensors": "a" * 64}}))
    digest = entry_digest(entry)
    (entry / COMPLETE_MARKER).write_text(json.dumps({"files": {"unet.safetensors": "b" * 64}}))
    assert digest is not None and entry_digest(entry) not in (None, digest)
