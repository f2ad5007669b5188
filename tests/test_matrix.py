"""The full attack matrix on the micro preset: four scenarios x three attack models, one target.

Runs on the session micro run's cache (base model, target, its utility and ground-truth
scores, and the scenario-III shadow are reused), so only the scenario-I/II shadow and the
captioners are new.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import benchmark.app.runner as runner
from attacks.attack_models import for_family
from attacks.families import DEFAULT_FAMILY
from attacks.scenarios import QueryAccess, Scenario, ShadowMode
from benchmark.app import stages
from benchmark.app.cli import main
from benchmark.pipeline.records import load_record

# The attack models of Pang & Wang's family (what --attack-model all runs with it).
MODELS = for_family(DEFAULT_FAMILY)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def matrix(micro_run, tmp_path_factory):  # type: ignore[no-untyped-def]
    results = tmp_path_factory.mktemp("matrix-results")
    config = micro_run.config.replace(results_dir=results)
    calls: list[tuple[str, tuple[str, ...]]] = []
    original = stages.score_queries

    def counting(target, queries, config, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((target.name, tuple(q.caption for q in queries)))
        return original(target, queries, config, **kwargs)

    stages.score_queries = counting
    try:
        outcomes = runner.run_matrix(config, scenarios=list(Scenario), attack_models=MODELS, show_progress=False)
    finally:
        stages.score_queries = original
    return outcomes, results, calls


def test_one_valid_record_and_plot_per_cell(matrix) -> None:  # type: ignore[no-untyped-def]
    outcomes, results, _ = matrix
    cells = {(o.record.scenario, o.record.attack.attack_model) for o in outcomes}
    assert cells == {(s.value, a) for s in Scenario for a in MODELS}
    assert len(outcomes) == 12
    files = _files(results)
    assert len(files) == 24
    for outcome in outcomes:
        data = load_record(outcome.path)  # schema-valid on disk
        assert outcome.path.parent == results / "scenes" / data["attack"]["scenario"] / "none"
        assert outcome.plot_path is not None and outcome.plot_path.read_bytes()[:4] == b"\x89PNG"
        assert data["attack"]["roc_plot"] == outcome.plot_path.name
        assert data["config"]["scenario"] == data["attack"]["scenario"]
        assert data["config"]["attack_model"] == data["attack"]["attack_model"]


def test_scoring_is_shared_between_attack_models_and_scenarios(matrix) -> None:  # type: ignore[no-untyped-def]
    outcomes, _, calls = matrix
    # No model scores the same captions twice.
    assert len(calls) == len(set(calls)), "a model was scored twice on the same captions"
    # Shadows: one for I/II (same split), one for III/IV; each scored once per caption
    # set (ground truth in I/III, the scenario's captioner in II/IV).
    shadow_sets = [c for name, c in calls if name == "shadow"]
    assert 2 <= len(shadow_sets) <= 4
    # Target and base model: the ground truth (which I and III share) was scored by the session's
    # micro run and kept on disk (same target, base model and queries), so only the captions of II's
    # and IV's captioners are scored here (once if the two captioners agree on every query).
    target_sets = {c for name, c in calls if name == "target"}
    assert 1 <= len(target_sets) <= 2
    truth = next(tuple(o.record.attack.captions) for o in outcomes if o.record.scenario == "I")
    assert truth not in target_sets
    base_sets = {c for name, c in calls if name == "base"}
    assert base_sets == target_sets
    assert len(calls) == len(shadow_sets) + len(target_sets) + len(base_sets)
    by_cell = {(o.record.scenario, o.record.attack.attack_model): o.record for o in outcomes}
    if len(target_sets) == 1:  # the captioners agreed, so II and IV share the target's scores
        assert by_cell[("II", "threshold")].attack.scores == by_cell[("IV", "threshold")].attack.scores
    for scenario in Scenario:
        records = [by_cell[(scenario.value, a)] for a in MODELS]
        assert all(r.attack.scores == records[0].attack.scores for r in records)
        assert all(r.training == records[0].training for r in records)
    assert by_cell[("I", "threshold")].attack.scores == by_cell[("III", "threshold")].attack.scores
    assert by_cell[("I", "threshold")].training.shadow == by_cell[("II", "threshold")].training.shadow
    assert by_cell[("I", "threshold")].training.target == by_cell[("IV", "threshold")].training.target


def test_scenario_splits_and_caption_sources(matrix) -> None:  # type: ignore[no-untyped-def]
    outcomes, _, _ = matrix
    for outcome in outcomes:
        record = outcome.record
        splits, attack = record.splits, record.attack
        members, nonmembers = set(splits["members"]), set(splits["nonmembers"])
        shadow_members = set(splits["shadow_members"])
        shadow_all = shadow_members | set(splits["shadow_nonmembers"])
        assert not shadow_all & nonmembers, "target non-members are the evaluation set"
        overlap = len(shadow_members & members)
        if record.scenario in ("I", "II"):
            assert overlap == len(shadow_members) // 2 == attack.shadow_overlap_with_target_members
        else:
            assert overlap == 0 == attack.shadow_overlap_with_target_members
        if record.scenario in ("II", "IV"):
            assert attack.caption_source == "captioner"
            assert attack.captioner_fine_tuned is True
            assert record.components["captioner"].name == "tiny"
            assert set(attack.caption_exact_match) == {"target_members", "target_nonmembers", "shadow_queries"}
        else:
            assert attack.caption_source == "ground_truth" and attack.captioner_fine_tuned is None
            assert "captioner" not in record.components
        assert attack.shadow_mode == "aware" and attack.shadow_defense == "none"
        assert attack.query_access == "text" and attack.strength is None


def test_each_cell_is_fitted_on_the_shadow_and_recomputes(matrix) -> None:  # type: ignore[no-untyped-def]
    outcomes, _, _ = matrix
    for outcome in outcomes:
        record = outcome.record
        labels = np.asarray(record.attack.labels)
        membership = np.asarray(record.attack.membership_scores)
        assert record.privacy.auc == pytest.approx(roc_auc_score(labels, membership), abs=1e-12)
        figures = {f.name: f for f in record.figures()}
        assert figures["privacy.auc"].value == record.privacy.auc
        assert figures["privacy.auc"].ci == record.privacy.auc_ci is not None
        assert record.components["attack_model"].name == record.attack.attack_model
        # Budget: every target query once, m generations each.
        assert record.attack.queries_spent == len(labels)
        assert record.attack.images_generated == len(labels) * record.attack.generations_per_query
        assert record.attack.images_per_second > 0
        assert 0 < record.attack.model_time_fraction <= 1
        assert record.baseline is not None and record.control is not None
        assert {"baseline.auc", "control.auc"} <= set(figures)


@pytest.fixture(scope="module")
def variants(micro_run, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One cell each: captioner not fine-tuned, img2img access, naive shadow."""
    results = tmp_path_factory.mktemp("variant-results")
    base = micro_run.config.replace(results_dir=results, control=False)
    return {
        "untuned": runner.run(base.replace(scenario=Scenario.II, captioner_finetune=False), show_progress=False),
        "img2img": runner.run(
            base.replace(query_access=QueryAccess.IMAGE_TO_IMAGE, img2img_strength=0.3), show_progress=False
        ),
        "naive": runner.run(base.replace(shadow=ShadowMode.NAIVE, baseline=False), show_progress=False),
    }


def test_untuned_captioner_is_recorded(variants) -> None:  # type: ignore[no-untyped-def]
    record = variants["untuned"].record
    assert record.attack.captioner_fine_tuned is False
    assert record.components["captioner"].details["fine_tuned"] is False
    assert record.config["captioner_finetune"] is False
    load_record(variants["untuned"].path)


def test_img2img_is_recorded_separately(variants) -> None:  # type: ignore[no-untyped-def]
    record = variants["img2img"].record
    assert record.attack.query_access == "img2img" and record.attack.strength == 0.3
    assert record.attack.queries_spent == len(record.attack.labels)
    assert any("image-to-image" in note for note in record.notes)
    load_record(variants["img2img"].path)


def test_naive_shadow_is_recorded(variants) -> None:  # type: ignore[no-untyped-def]
    record = variants["naive"].record
    assert record.attack.shadow_mode == "naive" and record.attack.defense_aware_shadow is False
    assert record.attack.shadow_defense == "none"
    assert record.baseline is None and "baseline.auc" not in {f.name for f in record.figures()}
    load_record(variants["naive"].path)


def test_cli_runs_one_cell_of_the_matrix(micro_run, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "400")
    results = tmp_path / "results"
    argv = ["run", "--profile", "micro", "--quiet", "--results-dir", str(results)]
    argv += ["--cache-dir", str(micro_run.cache_dir), "--scenario", "I", "--attack-model", "classifier", "--no-control"]
    assert main(argv) == 0
    [path] = [p for p in _files(results) if p.suffix == ".json"]
    data = load_record(path)
    assert (data["attack"]["scenario"], data["attack"]["attack_model"]) == ("I", "classifier")
    assert "privacy.auc" in capsys.readouterr().err


def test_cli_runs_several_cells_and_prints_the_matrix(micro_run, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "400")
    results = tmp_path / "results"
    argv = ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--no-control"]
    argv += ["--cache-dir", str(micro_run.cache_dir), "--scenario", "I,III", "--attack-model", "all"]
    assert main(argv) == 0
    records = [load_record(p) for p in _files(results) if p.suffix == ".json"]
    cells = sorted((r["attack"]["scenario"], r["attack"]["attack_model"]) for r in records)
    assert cells == sorted((s, a) for s in ("I", "III") for a in MODELS)
    err = " ".join(capsys.readouterr().err.split())
    assert "one record per (scenario, attack model)" in err and err.count("result written to") == 6
