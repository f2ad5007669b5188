"""The default configuration, end to end (minutes on a CPU): the attack must clearly beat chance.

Selected with `pytest -m slow`; set BENCHMARK_CACHE_DIR to reuse base and fine-tuned models.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmark.app.config import profile
from benchmark.app.runner import run
from benchmark.pipeline.records import load_record


@pytest.mark.slow
def test_default_preset_attack_beats_chance(
    tmp_path: Path, user_cache_dir: str | None, request: pytest.FixtureRequest
) -> None:
    # conftest pins one thread for the shared fast suite; this test is the whole default run.
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cache_dir = Path(user_cache_dir).expanduser().resolve() if user_cache_dir else tmp_path / "cache"
    config = profile("default").replace(results_dir=tmp_path / "results", cache_dir=cache_dir)
    outcome = run(config, show_progress=False)

    data = load_record(outcome.path)
    assert data["attack"]["queries_spent"] == config.members + config.nonmembers
    auc = outcome.record.privacy.auc
    control = outcome.record.control.auc
    assert auc is not None and auc >= 0.8, f"undefended attack AUC {auc:.3f}: should clearly beat chance"
    assert control is not None and 0.3 <= control <= 0.7, (
        f"control AUC on the base model {control:.3f}: should be near 0.5"
    )
