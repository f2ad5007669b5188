"""The attack must clearly beat chance on an undefended, overfit model (CI-sized).

A small cousin of the slow default-preset test: 8 px scenes, 8 members fine-tuned
for 400 epochs, attacked with 32 non-members. The base model before fine-tuning is
the control and must sit near chance with the same fitted attack. The same target
fine-tuned for only 10 epochs must leak clearly less (the paper's epochs finding).
"""

from __future__ import annotations

from pathlib import Path

from benchmark.app.runner import run
from benchmark.pipeline.finetune import TrainConfig
from tests.factories import overfit_micro


def test_undefended_overfit_model_leaks_membership(tmp_path: Path, overfit_cache_dir: Path) -> None:
    config = overfit_micro(tmp_path, cache_dir=overfit_cache_dir)
    record = run(config, show_progress=False).record
    auc = record.privacy.auc
    control = None if record.control is None else record.control.auc
    assert auc is not None and auc >= 0.75, f"attack AUC {auc:.3f} on an overfit model: should clearly beat chance"
    assert control is not None and 0.25 <= control <= 0.75, f"control AUC {control:.3f} should be near 0.5"

    # The paper's finding: memorisation grows with fine-tuning. The same members,
    # fine-tuned for 10 epochs instead of 400 (base model reused from the cache), leak less.
    brief = config.replace(
        finetune=TrainConfig(epochs=10, batch_size=8, learning_rate=3e-3),
        results_dir=tmp_path / "results-brief",
        control=False,
        utility_metrics=False,
    )
    brief_auc = run(brief, show_progress=False).record.privacy.auc
    assert brief_auc is not None and auc >= brief_auc + 0.15, f"400 epochs: AUC {auc:.3f}; 10 epochs: {brief_auc:.3f}"


def test_loss_attack_leaks_on_overfit_model(tmp_path: Path, overfit_cache_dir: Path) -> None:
    """The gray-box loss attack (t ~ 450 of 1000, 3 (t, eps) pairs) on the same overfit target:
    members' denoising error is clearly lower; on the base model (control) it is not."""
    # One generation per query and the default sampling steps: this attack generates nothing.
    config = overfit_micro(tmp_path, attack="loss", utility_metrics=False, cache_dir=overfit_cache_dir)
    record = run(config, show_progress=False).record
    auc = record.privacy.auc
    control = None if record.control is None else record.control.auc
    assert record.attack.family == "loss" and record.attack.access == "gray-box"
    assert auc is not None and auc >= 0.8, f"loss attack AUC {auc:.3f} on an overfit model: should clearly beat chance"
    assert control is not None and 0.25 <= control <= 0.75, f"control AUC {control:.3f} should be near 0.5"
