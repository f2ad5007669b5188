"""The whole pipeline on the micro preset: one cold run per session, then cheap warm-cache runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import benchmark.app.runner as runner
from benchmark.app import cell, stages
from benchmark.app.cli import main
from benchmark.kernel.cache import CacheIntegrityWarning
from benchmark.pipeline.privacy_metrics import privacy_metrics


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_writes_exactly_one_record_and_its_roc_plot(micro_run) -> None:  # type: ignore[no-untyped-def]
    record = micro_run.outcome.record
    # Named by run, attack, attack model and access, so the records of one run are told apart unopened.
    name = f"{record.run_id}-pang-wang-threshold-black-box.json"
    expected = micro_run.results_dir / "scenes" / "III" / "none" / name
    plot = expected.with_name(f"{record.run_id}.roc.png")
    assert micro_run.outcome.path == expected
    assert micro_run.outcome.plot_path == plot
    assert _files(micro_run.results_dir) == sorted([expected, plot])
    assert record.attack.roc_plot == plot.name
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_query_accounting(micro_run) -> None:  # type: ignore[no-untyped-def]
    config, attack = micro_run.config, micro_run.outcome.record.attack
    assert attack.queries_spent == config.members + config.nonmembers
    assert attack.images_generated == attack.queries_spent * config.generations_per_query
    assert attack.shadow_queries_spent == config.shadow_members + config.shadow_nonmembers
    assert attack.shadow_overlap_with_target_members == 0  # scenario III


def test_queries_match_splits(micro_run) -> None:  # type: ignore[no-untyped-def]
    record = micro_run.outcome.record
    splits, attack = record.splits, record.attack
    members, nonmembers = set(splits["members"]), set(splits["nonmembers"])
    assert not members & nonmembers
    assert set(attack.query_ids) == members | nonmembers
    assert len(attack.query_ids) == len(set(attack.query_ids))
    for qid, label in zip(attack.query_ids, attack.labels, strict=True):
        assert label == (qid in members), qid
    shadow = set(splits["shadow_members"]) | set(splits["shadow_nonmembers"])
    assert not shadow & (members | nonmembers), "scenario III: the shadow uses auxiliary data only"
    assert shadow <= set(splits["auxiliary"])
    assert "public" not in splits, "the public split is named by its digest, not listed"
    public = record.components["dataset"].details["public_split"]
    assert public["n"] == micro_run.config.public and len(public["sha256"]) == 64
    # The query order carries no label: members are not simply listed first.
    assert attack.labels != sorted(attack.labels, reverse=True)


def test_metrics_recompute_from_per_query_data(micro_run) -> None:  # type: ignore[no-untyped-def]
    record = micro_run.outcome.record
    attack = record.attack
    labels = np.asarray(attack.labels)
    membership = np.asarray(attack.membership_scores)
    predictions = np.asarray(attack.predictions)
    scores = np.asarray(attack.scores)
    # The threshold attack's membership score is the mean similarity over generations.
    np.testing.assert_allclose(membership, scores.mean(axis=1))
    threshold = record.components["attack_model"].details["threshold"]
    np.testing.assert_array_equal(predictions, (membership >= threshold).astype(int))
    figures = {f.name: f.value for f in record.figures()}
    assert record.privacy.auc == pytest.approx(roc_auc_score(labels, membership), abs=1e-12)
    assert figures["privacy.auc"] == pytest.approx(roc_auc_score(labels, membership), abs=1e-12)
    assert record.privacy.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert record.privacy == privacy_metrics(labels, membership, predictions)
    assert figures["privacy.tpr@fpr=0.01"] == record.privacy.tpr_at_fpr[0].tpr == record.privacy.tpr(0.01).tpr
    assert record.control is not None and 0.0 <= record.control.auc <= 1.0
    assert figures["control.auc"] == record.control.auc


def test_training_reports(micro_run) -> None:  # type: ignore[no-untyped-def]
    training = micro_run.outcome.record.training
    finetune = micro_run.config.finetune
    for which in ("target", "shadow"):
        report = getattr(training, which)
        assert report["epochs_completed"] == finetune.epochs
        assert report["steps"] == finetune.epochs * -(-8 // finetune.batch_size)
        assert np.isfinite(report["final_loss"])
        assert report["from_cache"] is False  # the session run starts from an empty cache
        assert report["defense_details"] == {}
    assert training.shadow["config"]["seed"] != training.target["config"]["seed"]


@pytest.fixture(scope="module")
def warm_run(micro_run, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Same config and seed, same cache, fresh results folder."""
    results = tmp_path_factory.mktemp("warm-results")
    outcome = runner.run(micro_run.config.replace(results_dir=results), show_progress=False)
    return outcome, results


def test_same_seed_on_warm_cache_is_deterministic(micro_run, warm_run) -> None:  # type: ignore[no-untyped-def]
    outcome, results = warm_run
    first, second = micro_run.outcome.record, outcome.record
    assert second.run_id != first.run_id
    assert _files(results) == sorted([outcome.path, outcome.plot_path])
    assert second.components["model"].from_cache is True
    assert second.training.target["from_cache"] is True and second.training.shadow["from_cache"] is True
    for key in ("query_ids", "labels", "scores", "membership_scores", "predictions"):
        assert getattr(second.attack, key) == getattr(first.attack, key), key
    assert second.privacy == first.privacy
    assert second.control == first.control
    assert second.splits == first.splits


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("stage", ["score_queries", "fit_attack_model", "write_record"])
def test_interrupted_run_writes_nothing(
    micro_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException], stage: str
) -> None:  # type: ignore[no-untyped-def]
    calls = []

    def fail(*args: object, **kwargs: object) -> None:
        calls.append(stage)
        raise error("simulated interruption")

    module = {"score_queries": stages, "fit_attack_model": cell, "write_record": runner}[stage]
    monkeypatch.setattr(module, stage, fail)
    results = tmp_path / "results"
    cache_before = _files(micro_run.cache_dir)
    with pytest.raises(error, match="simulated interruption"):
        runner.run(micro_run.config.replace(results_dir=results), show_progress=False)
    assert calls == [stage]
    assert _files(results) == [], "an interrupted run must leave no result and no temporary file"
    assert _files(micro_run.cache_dir) == cache_before, "models came from the cache; nothing rebuilt"


def test_cli_run_on_warm_cache(micro_run, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "400")
    results = tmp_path / "results"
    code = main(
        ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--cache-dir", str(micro_run.cache_dir)]
    )
    err = capsys.readouterr().err
    assert code == 0
    [path] = [p for p in _files(results) if p.suffix == ".json"]
    assert "result written to" in err and str(path) in err
    assert "privacy.auc" in err


def test_cli_interrupt_exits_130_without_result(micro_run, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "score_queries", interrupt)
    results = tmp_path / "results"
    code = main(
        ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--cache-dir", str(micro_run.cache_dir)]
    )
    assert code == 130
    assert "no result was written" in capsys.readouterr().err
    assert _files(results) == []


def test_base_model_control_is_kept_on_disk_for_other_defenses(micro_run, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    entries = list((micro_run.cache_dir / "control-scores").iterdir())
    assert len(entries) == 1 and (entries[0] / "scores.npy").is_file()
    assert len(list((micro_run.cache_dir / "base-utility").iterdir())) == 1
    scored: list[str] = []
    measured: list[object] = []
    original, original_utility = stages.score_queries, stages.measure_utility

    def counting(target, queries, config, **kwargs):  # type: ignore[no-untyped-def]
        scored.append(target.name)
        return original(target, queries, config, **kwargs)

    def counting_utility(**kwargs):  # type: ignore[no-untyped-def]
        measured.append(kwargs["model"])
        return original_utility(**kwargs)

    monkeypatch.setattr(stages, "score_queries", counting)
    monkeypatch.setattr(stages, "measure_utility", counting_utility)
    config = micro_run.config.replace(defense="lora.r1", results_dir=tmp_path / "results")
    record = runner.run(config, show_progress=False).record
    # The same base model, queries and attack settings: the control is read, not generated again.
    assert "base" not in scored and {"target", "shadow"} <= set(scored)
    # Same scores, so the same AUC; the decision threshold comes from this defense's shadow.
    assert record.control.auc == micro_run.outcome.record.control.auc
    # The base model's utility too: only the target is measured.
    assert len(measured) == 1
    assert record.utility.base_model == micro_run.outcome.record.utility.base_model


def test_base_model_work_of_a_user_model_folder_is_not_kept(micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from benchmark.pipeline.models.registry import BaseModel

    user_folder = BaseModel(model_dir=tmp_path / "my-sd15", from_cache=False, description={})
    cached_base = BaseModel(model_dir=micro_run.cache_dir / "base-tiny" / "abc", from_cache=True, description={})
    assert stages.cached_base_identity(micro_run.config, user_folder) is None
    assert stages.cached_base_identity(micro_run.config, cached_base) is not None


def _overwrite_inside_safetensors(path: Path) -> None:
    """Swap two float32 values of the last tensor: still finite, still loadable, different weights."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    start = 8 + header_len
    a, b = data[start : start + 4], data[start + 4 : start + 8]
    assert a != b, "the first two values happen to be equal; pick others"
    data[start : start + 4], data[start + 4 : start + 8] = b, a
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["finetuned", "control-scores"])
def test_tampered_cache_entry_is_rebuilt_and_the_figures_equal_an_untampered_run(
    micro_run, tmp_path: Path, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """A byte-level change that still loads (weights) or still parses (reordered score rows) is caught."""
    cache = tmp_path / "cache"
    shutil.copytree(micro_run.cache_dir, cache)
    if kind == "finetuned":
        targets = sorted((cache / "finetuned").glob("*/unet/*.safetensors"))
        for path in targets:
            _overwrite_inside_safetensors(path)
    else:
        targets = sorted((cache / "control-scores").glob("*/scores.npy"))
        for path in targets:
            np.save(path, np.load(path)[::-1], allow_pickle=False)
    assert targets, f"the micro run cached no {kind} entry"
    config = micro_run.config.replace(results_dir=tmp_path / "results", cache_dir=cache)
    with pytest.warns(CacheIntegrityWarning, match=f"cache entry {kind}/"):
        record = runner.run(config, show_progress=False).record
    first = micro_run.outcome.record
    assert any(f"cache entry {kind}/" in note for note in record.notes), record.notes
    assert record.privacy == first.privacy and record.control == first.control
    assert record.utility.target == first.utility.target and record.utility.base_model == first.utility.base_model
