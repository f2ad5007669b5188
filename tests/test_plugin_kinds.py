"""Plugins of every kind: built-ins and plugins share the entry-point path; an encoder plugin end to end.

The defense plugin (tests/plugin_example) is covered in test_plugins.py. Here:
- every registry has an entry-point group, and the built-ins are exactly the entry
  points this project's own distribution declares;
- BENCHMARK_DISABLE_PLUGINS=1 turns off third-party plugins only, never a built-in;
- a built-in that fails to load is an error, not a warning;
- an encoder plugin (a fake installed distribution on sys.path) is found through its
  entry point, passes `EncoderContract`, is recorded with its distribution as
  origin, is listed by `list`, and is checked by `RunConfig.validate()` through its
  own `check` hook;
- `validate()` asks each component's hooks instead of special-casing names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks.attack_models import ATTACK_MODELS
from attacks.captioners import CAPTIONERS
from attacks.distances import DISTANCES
from attacks.encoders import ENCODERS, EncoderRequest
from attacks.families import ATTACK_FAMILIES
from attacks.testing import EncoderContract
from benchmark import __version__
from benchmark.app.config import RunConfig, profile
from benchmark.kernel.errors import ConfigError, ModelError, PluginError
from benchmark.kernel.plugins import builtin_entry_points, component_origin
from benchmark.kernel.registry import Registry
from benchmark.pipeline.data.base import DATASETS, DatasetError
from benchmark.pipeline.models.registry import MODELS
from defenses import DEFENSES

REPO = Path(__file__).resolve().parents[1]
BUILTIN = f"diffusion-mia-bench=={__version__}"
REGISTRIES: dict[str, Registry] = {  # type: ignore[type-arg]
    "benchmark.datasets": DATASETS,
    "benchmark.models": MODELS,
    "benchmark.defenses": DEFENSES,
    "benchmark.attack_models": ATTACK_MODELS,
    "benchmark.attacks": ATTACK_FAMILIES,
    "benchmark.encoders": ENCODERS,
    "benchmark.distances": DISTANCES,
    "benchmark.captioners": CAPTIONERS,
}


def _fake_distribution(folder: Path, dist: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder on sys.path."""
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {value}" for name, value in entries.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


# -- built-ins through entry points ------------------------------------------------------


def test_every_registry_has_a_group_and_its_builtins_are_its_declared_entry_points() -> None:
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert set(declared) == set(REGISTRIES)
    for group, registry in REGISTRIES.items():
        assert registry.entry_point_group == group
        installed = builtin_entry_points(group)
        assert installed == sorted(declared[group]), (
            f"the installed entry points of {group} are stale: run `pip install -e . --no-deps`"
        )
        builtins = sorted(n for n in registry.names() if component_origin(registry, n) == BUILTIN)
        assert builtins == installed, f"{group}: a built-in registered but not declared in pyproject.toml"
        assert registry.plugin_failures() == {}


def test_disabling_plugins_keeps_every_builtin_of_every_registry(tmp_path: Path) -> None:
    """A fresh interpreter (registries load once), with a third-party plugin in every group installed."""
    module = f"mia_everything_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text("raise AssertionError('a disabled plugin was imported')\n")
    _fake_distribution(
        tmp_path, "mia-bench-everything", "9.9", {group: {f"x_{group.split('.')[1]}": module} for group in REGISTRIES}
    )
    script = textwrap.dedent(
        f"""
        import json, sys, warnings
        warnings.simplefilter("error")  # a skipped plugin is silent; a warning fails here
        sys.path.insert(0, {str(tmp_path)!r})
        from importlib import metadata
        from attacks.attack_models import ATTACK_MODELS
        from attacks.captioners import CAPTIONERS
        from attacks.distances import DISTANCES
        from attacks.encoders import ENCODERS
        from attacks.families import ATTACK_FAMILIES
        from benchmark.kernel.plugins import builtin_entry_points, component_origin
        from benchmark.pipeline.data.base import DATASETS
        from benchmark.pipeline.models.registry import MODELS
        from defenses import DEFENSES
        registries = (DATASETS, MODELS, DEFENSES, ATTACK_MODELS, ATTACK_FAMILIES, ENCODERS, DISTANCES, CAPTIONERS)
        assert sorted(r.entry_point_group for r in registries) == {sorted(REGISTRIES)!r}
        seen = {{}}
        for registry in registries:
            group = registry.entry_point_group
            plugin = [ep.name for ep in metadata.entry_points(group=group) if ep.value == {module!r}]
            assert plugin, group  # the plugin is installed ...
            names = registry.names()  # ... but not loaded
            seen[group] = {{n: component_origin(registry, n) for n in names}}
            assert names == builtin_entry_points(group), (group, names)
        assert {module!r} not in sys.modules
        print(json.dumps(seen))
        """
    )
    env = {**os.environ, "BENCHMARK_DISABLE_PLUGINS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for group, origins in seen.items():
        assert origins, f"{group} has no built-ins with plugins disabled"
        assert set(origins.values()) == {BUILTIN}, (group, origins)
    assert {"scenes", "folder"} <= set(seen["benchmark.datasets"])
    assert {"none", "dpsgd", "lora"} <= set(seen["benchmark.defenses"])


@pytest.fixture
def fake_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry[object], str]:
    """A fresh group with one entry point of a distribution 'own-dist' (made 'ours' per test)."""
    group = f"benchmark.test_{uuid.uuid4().hex[:8]}"
    module = f"own_{group.rsplit('_', 1)[1]}"
    (tmp_path / f"{module}.py").write_text("raise ImportError('a built-in with a bug')\n")
    _fake_distribution(tmp_path, "own-dist", "1.0", {group: {"mine": module}})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("BENCHMARK_DISABLE_PLUGINS", raising=False)
    return Registry("thing", entry_point_group=group), module


def test_a_plugin_that_fails_is_a_warning_but_a_builtin_that_fails_is_an_error(
    fake_group, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    registry, _ = fake_group
    with pytest.warns(UserWarning, match="own-dist==1.0.*a built-in with a bug"):
        assert registry.names() == []  # a third party's broken plugin: skipped

    import benchmark.kernel.plugins as plugins

    monkeypatch.setattr(plugins, "DISTRIBUTION", "own-dist")  # now the project's own
    builtin: Registry[object] = Registry("thing", entry_point_group=registry.entry_point_group)
    monkeypatch.setenv("BENCHMARK_DISABLE_PLUGINS", "1")  # never skips a built-in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PluginError, match="built-in thing 'mine'.*ImportError: a built-in with a bug"):
            builtin.names()
        with pytest.raises(PluginError, match="a built-in with a bug"):  # and stays one, for every use
            builtin.get("other")


def test_a_builtin_loads_even_with_plugins_disabled(fake_group, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    registry, module = fake_group
    (tmp_path / f"{module}.py").write_text("import fake_kind_host as h\nh.REGISTRY.register('mine')(lambda: 1)\n")
    host = type(sys)("fake_kind_host")
    host.REGISTRY = registry  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_kind_host", host)
    import benchmark.kernel.plugins as plugins

    monkeypatch.setattr(plugins, "DISTRIBUTION", "own-dist")
    monkeypatch.setenv("BENCHMARK_DISABLE_PLUGINS", "1")
    assert registry.names() == ["mine"]
    monkeypatch.delitem(sys.modules, module, raising=False)


# -- an encoder plugin ---------------------------------------------------------------------

ENCODER_DIST = "mia-bench-block-encoder"
ENCODER_NAME = f"blocks_{uuid.uuid4().hex[:6]}"
ENCODER_SOURCE = '''
"""A third-party encoder: 2x2-pixel blocks as patches (no network)."""
import numpy as np
import torch

from attacks.encoders import EncoderRequest, register_encoder
from benchmark.kernel.errors import ConfigError

IMPORTED = True


class BlockEncoder:
    """2x2-pixel blocks, mean-centred per image, as patch embeddings."""

    name = "{name}"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))  # (N, H, W, 3)
        n, h, w, c = x.shape
        x = x[:, : h - h % 2, : w - w % 2]
        blocks = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
        return blocks - blocks.mean(dim=(1, 2), keepdim=True)

    def describe(self) -> dict[str, object]:
        return {{"name": self.name, "version": "0.2.0", "block": 2}}


def check(request: EncoderRequest) -> None:
    if request.path is not None:
        raise ConfigError("--encoder {name} takes no --encoder-path; drop it")


@register_encoder("{name}", check=check, needs_public_data=False)
def build(request: EncoderRequest | None = None) -> BlockEncoder:
    """2x2-pixel blocks as patches (example plugin)."""
    return BlockEncoder()
'''


@pytest.fixture(scope="module")
def encoder_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The encoder plugin installed (a dist-info on sys.path) and ENCODERS as if never loaded."""
    folder = tmp_path_factory.mktemp("encoder-plugin")
    module = f"mia_bench_{ENCODER_NAME}"
    (folder / f"{module}.py").write_text(ENCODER_SOURCE.format(name=ENCODER_NAME))
    _fake_distribution(folder, ENCODER_DIST, "0.2.0", {"benchmark.encoders": {ENCODER_NAME: module}})
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.delenv("BENCHMARK_DISABLE_PLUGINS", raising=False)
        # Restored afterwards: the global registry as the rest of the session knows it.
        for attribute in ("_entries", "_origins", "_capabilities"):
            mp.setattr(ENCODERS, attribute, dict(getattr(ENCODERS, attribute)))
        mp.setattr(ENCODERS, "_plugins_loaded", False)
        mp.setattr(ENCODERS, "_plugin_failures", {})
        assert module not in sys.modules, "nothing is imported before the first lookup"
        yield ENCODER_NAME
        sys.modules.pop(module, None)


def test_encoder_plugin_is_found_through_its_entry_point_with_its_origin(encoder_plugin: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it loads cleanly
        assert encoder_plugin in ENCODERS.names()
    assert sys.modules[f"mia_bench_{encoder_plugin}"].IMPORTED
    assert {"pixels", "cnn", "hf"} <= set(ENCODERS.names())  # the built-ins are still there
    assert component_origin(ENCODERS, encoder_plugin) == f"{ENCODER_DIST}==0.2.0"
    assert component_origin(ENCODERS, "pixels") == BUILTIN
    assert ENCODERS.plugin_failures() == {}
    assert ENCODERS.capability(encoder_plugin, "needs_public_data") is False


@pytest.mark.usefixtures("encoder_plugin")
class TestEncoderPluginContract(EncoderContract):
    name = ENCODER_NAME


def test_encoder_plugin_is_usable_in_a_run_config(encoder_plugin: str) -> None:
    config = profile("micro").replace(encoder=encoder_plugin)
    assert config.validate() is config
    # The plugin's own `check` hook runs in validate(), before any training.
    with pytest.raises(ConfigError, match=f"--encoder {encoder_plugin} takes no --encoder-path"):
        config.replace(encoder_path=Path("/somewhere")).validate()
    embeddings = ENCODERS.get(encoder_plugin)(EncoderRequest()).embed(np.zeros((2, 8, 8, 3), dtype=np.float32))
    assert embeddings.shape == (2, 16, 12) and embeddings.dtype == torch.float32


def test_list_shows_plugins_of_every_kind(encoder_plugin: str, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmark.app.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr()
    lines = [" ".join(line.split()) for line in (out.out + out.err).splitlines()]
    assert f"encoders {encoder_plugin} from {ENCODER_DIST}==0.2.0" in lines


# -- validate() asks the components, not their names ----------------------------------------


def test_builtin_checks_run_in_validate_and_name_the_flag(tmp_path: Path) -> None:
    micro = profile("micro")
    with pytest.raises(DatasetError, match="--dataset folder needs --dataset-path DIR"):
        micro.replace(dataset="folder").validate()
    with pytest.raises(DatasetError, match="does not exist; pass --dataset-path DIR"):
        micro.replace(dataset="folder", dataset_path=tmp_path / "nowhere").validate()
    with pytest.raises(ModelError, match="--model sd15 needs --model-path DIR.*nothing is downloaded"):
        micro.replace(model="sd15").validate()
    with pytest.raises(ModelError, match="not a diffusers text-to-image folder"):
        micro.replace(model="sd15", model_path=tmp_path).validate()
    with pytest.raises(ConfigError, match="tiny model is pretrained on the public split: --public must be >= 1"):
        micro.replace(public=0).validate()


def test_public_split_follows_the_components_needs() -> None:
    plain = RunConfig(model="sd15", encoder="pixels", captioner="blip", utility_metrics=False, public=50)
    assert plain.public_split_size == 0
    assert plain.replace(model="tiny").public_split_size == 50  # tiny declares needs_public_data
    assert plain.replace(encoder="cnn").public_split_size == 50


def test_validate_has_no_component_name_special_case() -> None:
    source = (REPO / "benchmark" / "app" / "config.py").read_text()
    for name in ("sd15", "folder", "tiny"):
        assert f'== "{name}"' not in source and f"== '{name}'" not in source
