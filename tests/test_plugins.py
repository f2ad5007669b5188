"""Plugins through entry points: lazy, guarded loading; provenance; a failing defense; the example plugin end to end."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import types
import uuid
import warnings
from pathlib import Path

import pytest

import benchmark.app.runner as runner
from benchmark.app import stages
from benchmark.app.cli import main
from benchmark.kernel.errors import DefenseError, PluginError
from benchmark.kernel.plugins import PluginWarning, component_origin
from benchmark.kernel.registry import Registry, RegistryError
from benchmark.pipeline.finetune import TrainingHooks, TrainingState
from defenses import DEFENSES, Defense
from defenses.testing import DefenseContract

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "tests" / "plugin_example"
PLUGIN_DIST = "mia-bench-weight-decay"


# -- entry-point loading, with fake distributions on sys.path ----------------------------


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Three installed fake distributions in a fresh group, registering into a fresh registry."""
    group = f"benchmark.test_{uuid.uuid4().hex[:8]}"
    registry: Registry[object] = Registry("thing", entry_point_group=group)
    host = types.ModuleType("fake_plugin_host")
    host.REGISTRY = registry  # type: ignore[attr-defined]
    host.IMPORTS = []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_plugin_host", host)
    modules = {
        "good": (
            "good-dist",
            "1.2",
            "import fake_plugin_host as h\nh.IMPORTS.append('good')\nh.REGISTRY.add('good', 'G', origin=__name__)\n",
        ),
        "broken": ("broken-dist", "0.3", "raise ImportError('needs a library that is not installed')\n"),
        "silent": ("silent-dist", "2.0", "x = 1  # registers nothing\n"),
    }
    for name, (dist, version, source) in modules.items():
        module = f"{name}_plugin_{group.rsplit('_', 1)[1]}"
        (tmp_path / f"{module}.py").write_text(source)
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("BENCHMARK_DISABLE_PLUGINS", raising=False)
    return registry, host


def test_plugins_load_lazily_once_and_record_their_distribution(fake_plugins) -> None:  # type: ignore[no-untyped-def]
    registry, host = fake_plugins
    assert host.IMPORTS == []  # nothing imported until the first lookup
    with pytest.warns(PluginWarning) as caught:
        assert registry.get("good") == "G"
    assert host.IMPORTS == ["good"]
    messages = " | ".join(str(w.message) for w in caught)
    assert "broken-dist==0.3" in messages and "needs a library that is not installed" in messages
    assert "silent-dist==2.0" in messages and "registered no thing named 'silent'" in messages
    assert "BENCHMARK_DISABLE_PLUGINS" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loaded once: no second round of warnings
        assert registry.names() == ["good"]
        assert component_origin(registry, "good") == "good-dist==1.2"
    assert host.IMPORTS == ["good"]
    assert set(registry.plugin_failures()) == {"broken", "silent"}


def test_a_requested_plugin_that_fails_is_an_error(fake_plugins) -> None:  # type: ignore[no-untyped-def]
    registry, _ = fake_plugins
    with pytest.warns(PluginWarning, match="silent-dist") as caught:
        with pytest.raises(PluginError, match=r"plugin 'broken' from distribution broken-dist==0.3.*ImportError"):
            registry.get("broken")
    assert not any("broken-dist" in str(w.message) for w in caught), "the requested failure is an error, not a warning"
    with pytest.raises(PluginError, match="broken-dist"):  # and stays one
        registry.get("broken")


def test_autoloading_can_be_disabled(fake_plugins, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    registry, host = fake_plugins
    monkeypatch.setenv("BENCHMARK_DISABLE_PLUGINS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.names() == []
        with pytest.raises(RegistryError, match="disabled by BENCHMARK_DISABLE_PLUGINS"):
            registry.get("good")
    assert host.IMPORTS == []


def test_component_origin_for_builtins_presets_and_compositions() -> None:
    from benchmark import __version__

    builtin = f"diffusion-mia-bench=={__version__}"
    for name in ("none", "dpsgd", "dpsgd.eps8", "dpsgd+lora", "augment.all+early_stop.best"):
        assert component_origin(DEFENSES, name) == builtin
    registry: Registry[object] = Registry("thing")
    registry.add("a", 1)
    registry.add("b", 2, origin="some_script")
    assert component_origin(registry, "a+b") == f"{builtin} + some_script"


# -- a defense that fails during training ------------------------------------------------


class _ExplodingHooks(TrainingHooks):
    def optimizer_step(self, state: TrainingState) -> bool:
        if state.step >= 1:
            raise RuntimeError("plugin bug: tensor went missing")
        return super().optimizer_step(state)


class _Exploding(Defense):
    name = "exploding"
    version = "1"

    def training_hooks(self) -> TrainingHooks:
        return _ExplodingHooks()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_defense_that_raises_fails_the_run_cleanly(micro_run, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(stages, "resolve", lambda spec, overrides=(): _Exploding())
    cache_before = _files(micro_run.cache_dir)
    results = tmp_path / "results"
    with pytest.raises(
        DefenseError, match="defense 'exploding'.*failed while fine-tuning: RuntimeError: plugin bug"
    ) as info:
        runner.run(micro_run.config.replace(results_dir=results), show_progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _files(results) == [], "no partial result record"
    assert _files(micro_run.cache_dir) == cache_before, "no partial fine-tuned model in the cache"
    monkeypatch.setenv("COLUMNS", "400")
    code = main(
        ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--cache-dir", str(micro_run.cache_dir)]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "error: defense 'exploding'" in err and "Traceback" not in err
    assert _files(results) == []


# -- the example plugin package, installed with pip -------------------------------------


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example plugin into a private prefix; returns its site-packages folder.

    A private prefix, not the shared environment: nothing to uninstall afterwards, and
    two test sessions running at once cannot uninstall the plugin under each other.
    The subprocesses add the folder with `site.addsitedir` (which runs the editable
    install's .pth file), exactly as an installed package would be seen.
    """
    # pip is part of the test set-up (the README's test command installs with it).
    assert importlib.util.find_spec("pip") is not None, "pip is needed to install the example plugin"
    prefix = tmp_path_factory.mktemp("plugin-prefix")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "--no-deps",
         "--no-build-isolation", "-q", "--prefix", str(prefix), "-e", str(PLUGIN_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, f"pip install -e {PLUGIN_DIR} failed:\n{install.stdout}\n{install.stderr}"
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert any(site_packages.glob("mia_bench_weight_decay-*.dist-info")), sorted(site_packages.iterdir())
    return site_packages


def _clean_env(cache_dir: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "BENCHMARK_DISABLE_PLUGINS"}
    env["BENCHMARK_CACHE_DIR"] = str(cache_dir)
    env["COLUMNS"] = "400"
    return env


def test_example_plugin_installs_passes_its_contract_and_runs_end_to_end(
    installed_plugin, micro_run, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """One fresh interpreter (entry points are read at start-up): the plugin's own contract
    tests, `list`, then a micro run of the plugin composed with a built-in."""
    results = tmp_path / "results"
    script = textwrap.dedent(
        f"""
        import site, sys
        site.addsitedir({str(installed_plugin)!r})
        import pytest, torch
        torch.set_num_threads(1)
        from benchmark.app.cli import main
        code = pytest.main(["-q", "-p", "no:cacheprovider", {str(PLUGIN_DIR / "tests")!r}])
        assert code == 0, f"contract tests failed ({{code}})"
        assert main(["list"]) == 0
        sys.exit(main(["run", "--profile", "micro", "--quiet", "--no-control",
                       "--defense", "dpsgd.sigma1+weight_decay.wd01", "--defense-arg", "weight_decay=0.2",
                       "--results-dir", {str(results)!r}, "--cache-dir", {str(micro_run.cache_dir)!r}]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=_clean_env(micro_run.cache_dir),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # Every test the contract defines ran against the plugin and passed (whatever their number).
    contract = [n for n in dir(DefenseContract) if n.startswith("test_")]
    passed = re.search(r"(\d+) passed", output)
    assert contract and passed is not None, output[-2000:]
    assert int(passed.group(1)) >= len(contract) and " failed" not in output, output[-2000:]
    assert "weight_decay.wd01" in output and f"from {PLUGIN_DIST}==0.1.0" in output  # `list`
    [path] = [p for p in _files(results) if p.suffix == ".json"]
    record = json.loads(path.read_text())
    defense = record["components"]["defense"]
    assert defense["name"] == "dpsgd+weight_decay"
    assert defense["origin"] == f"diffusion-mia-bench==0.1.0 + {PLUGIN_DIST}==0.1.0"
    parts = {c["name"]: c for c in defense["details"]["components"]}
    assert parts["weight_decay"]["origin"] == f"{PLUGIN_DIST}==0.1.0" and parts["weight_decay"]["version"] == "0.1.0"
    assert parts["weight_decay"]["preset"] is None  # overridden: named by its configuration
    assert parts["dpsgd"]["preset"] == "dpsgd.sigma1"
    assert parts["weight_decay"]["config"] == {"weight_decay": 0.2}
    details = record["training"]["target"]["defense_details"]
    assert details["weight_decay"]["weight_decay"] == 0.2 and details["weight_decay"]["decayed_parameters"] > 0
    assert details["dpsgd"]["steps"] >= 1 and details["dpsgd"]["epsilon"] > 0
