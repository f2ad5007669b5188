"""Shared fixtures: one micro benchmark run per session, a tiny model, a fake dataset pool.

Nothing here may touch ~/.cache: BENCHMARK_CACHE_DIR points at a temporary folder
before any `benchmark` module is imported (benchmark.app.config freezes the presets'
cache_dir at import time), and every run passes its cache_dir explicitly.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Fixed-seed figures (the AUC of a fine-tune) depend on the CPU's vector kernels: torch, MKL and
# oneDNN pick AVX-512 code where the CPU has it, and 400 epochs amplify the rounding (measured:
# one overfit micro target's AUC 0.969 with AVX-512, 0.914 with AVX2). Every x86-64 test
# machine computes with the AVX2 kernels, so the figures the tests pin are the same on each.
# Set before torch is imported (the libraries read them once); a caller's own setting wins.
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in KERNEL_PINS.items():
        os.environ.setdefault(_name, _value)

# The caller's own cache (if any) is kept for the slow test, which may reuse it.
USER_CACHE_DIR = os.environ.get("BENCHMARK_CACHE_DIR")
_SESSION_CACHE = tempfile.mkdtemp(prefix="benchmark-test-cache-")
os.environ["BENCHMARK_CACHE_DIR"] = _SESSION_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

# Two shared cores: torch's default of one thread per core makes every op spin
# against the other process (a micro run goes from ~2 s to ~75 s). One thread is
# both faster and less disturbing to whatever else runs on the machine.
torch.set_num_threads(1)


# The example plugin's own suite runs inside test_plugins.py, in a fresh interpreter where
# the plugin is installed; collected here it could only be skipped.
collect_ignore = ["plugin_example"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


NEEDS_CUDA = "needs a CUDA device (deselect with -m 'not gpu')"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A skip with its reason, not a silent pass: -ra lists every GPU check this machine did not run.
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=NEEDS_CUDA))


@pytest.fixture(scope="session")
def user_cache_dir() -> str | None:
    """BENCHMARK_CACHE_DIR as the caller set it (None if unset)."""
    return USER_CACHE_DIR


@pytest.fixture(autouse=True)
def _isolated_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees its own BENCHMARK_CACHE_DIR."""
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(cache))
    return cache


@dataclass
class MicroRun:
    config: object  # benchmark.app.config.RunConfig
    outcome: object  # benchmark.app.runner.RunOutcome
    results_dir: Path
    cache_dir: Path


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> MicroRun:
    """The micro preset, run once for the whole session (cold cache)."""
    from benchmark.app.config import profile
    from benchmark.app.runner import run

    root = tmp_path_factory.mktemp("micro")
    results_dir, cache_dir = root / "results", root / "cache"
    config = profile("micro").replace(results_dir=results_dir, cache_dir=cache_dir)
    outcome = run(config, show_progress=False)
    return MicroRun(config=config, outcome=outcome, results_dir=results_dir, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def overfit_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every test on `factories.overfit_micro`'s target: the undefended overfit
    fine-tune (and its shadow) is trained once per session, as a suite's cache would keep it."""
    return tmp_path_factory.mktemp("overfit-cache")


@pytest.fixture(scope="session")
def scene_captions() -> list[str]:
    from benchmark.pipeline.data.scenes import ScenesDataset

    ds = ScenesDataset(resolution=8, size=60)
    return [ds.caption(i) for i in range(len(ds))]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, scene_captions: list[str]) -> Path:
    """An untrained tiny model (8 px), saved once in diffusers' folder layout."""
    from benchmark.pipeline.models.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(corpus=scene_captions, resolution=8, config=TinyModelConfig(), seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny CLIPModel with its processor, saved in the standard format."""
    import torch
    from transformers import CLIPModel

    from benchmark.pipeline.data.scenes import ScenesDataset
    from benchmark.pipeline.models.tiny import TinyModelConfig, build_tokenizer
    from benchmark.pipeline.reference_networks import ReferenceClipTraining, _clip_config, _processor

    ds = ScenesDataset(resolution=8, size=60)
    training = ReferenceClipTraining(hidden_size=32, layers=1, projection_dim=16)
    tokenizer = build_tokenizer([ds.caption(i) for i in range(len(ds))], TinyModelConfig(max_caption_tokens=32))
    torch.manual_seed(0)
    model = CLIPModel(_clip_config(tokenizer, training))
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder, safe_serialization=True)
    _processor(tokenizer, training.image_size).save_pretrained(folder)
    return folder
