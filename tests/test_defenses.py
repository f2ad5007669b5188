"""Defense presets, overrides, composition and bad input; a smoke test over every registered defense."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmark.kernel.errors import ConfigError
from benchmark.kernel.registry import Registry
from benchmark.pipeline.finetune import TrainConfig, TrainingHooks
from benchmark.pipeline.models.diffusion import load_model
from defenses import DEFENSES, ComposedDefense, Defense, DefenseConfig, presets, register_defense, resolve
from defenses.augment import AugmentConfig
from defenses.dpsgd import DPSGDConfig
from defenses.lora import LoRAConfig
from defenses.testing import DefenseContract

SMOKE_TRAIN = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-3)


@pytest.fixture(scope="module")
def members(scene_captions: list[str]) -> tuple[torch.Tensor, list[str]]:
    from benchmark.pipeline.data.base import images_to_tensor
    from benchmark.pipeline.data.scenes import ScenesDataset

    dataset = ScenesDataset(resolution=8, size=60)
    return images_to_tensor([dataset.image(i) for i in range(6)]), scene_captions[:6]


# -- presets and overrides ---------------------------------------------------------------


def test_builtin_defenses_and_presets_are_registered() -> None:
    assert {"none", "dpsgd", "lora", "augment", "early_stop"} <= set(DEFENSES.names())
    table = presets()
    for name in ("dpsgd.eps1", "dpsgd.eps4", "dpsgd.eps8", "lora.r4", "lora.r16", "augment.flip", "early_stop.best"):
        assert name in table, name
    for name, preset in table.items():
        defense = resolve(name)
        assert defense.name == name.split(".")[0] == preset.defense.name
        assert defense.preset == name
        for key, value in preset.values.items():
            assert getattr(defense.config, key) == value, (name, key)


def test_preset_with_override_converts_through_field_types() -> None:
    defense = resolve("dpsgd.eps8", overrides={"target_epsilon": "4", "accountant": "rdp", "secure_mode": "false"})
    assert isinstance(defense.config, DPSGDConfig)
    assert defense.config.target_epsilon == 4.0 and isinstance(defense.config.target_epsilon, float)
    assert defense.config.accountant == "rdp" and defense.config.secure_mode is False
    # Overridden, it is no longer the preset: records name it by its configuration.
    assert defense.describe()["preset"] is None
    assert resolve("dpsgd.eps8").describe()["preset"] == "dpsgd.eps8"
    fixed = resolve("dpsgd", [("target_epsilon", "none"), ("noise_multiplier", "1.5"), ("delta", "1e-5")])
    assert fixed.config.target_epsilon is None and fixed.config.noise_multiplier == 1.5 and fixed.config.delta == 1e-5
    lora = resolve("lora.r4", {"rank": "8", "alpha": "16", "target_modules": "to_q, to_v"})
    assert lora.config == LoRAConfig(rank=8, alpha=16.0, target_modules=("to_q", "to_v"))
    augment = resolve("augment", {"transforms": "hflip,crop"})
    assert augment.config.transforms == ("hflip", "crop")
    # Typed values (from Python rather than the command line) pass through.
    assert resolve("lora", {"rank": 2}).config.rank == 2


def test_configs_are_frozen() -> None:
    defense = resolve("lora.r4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        defense.config.rank = 8  # type: ignore[misc]


BAD_INPUT = [
    ("dpsgd", {"target_epsilon": "0"}, ["target_epsilon must be a finite number > 0", "e.g. 1, 4 or 8"]),
    ("dpsgd", {"target_epsilon": "-1"}, ["target_epsilon must be"]),
    # Non-finite numbers are refused by the converter, before the defense sees them.
    ("dpsgd", {"target_epsilon": "inf"}, ["target_epsilon='inf' is not a valid float", "expected a finite number"]),
    ("dpsgd", {"delta": "1"}, ["delta must be in (0, 1)", "below 1/N"]),
    ("dpsgd", {"delta": "0"}, ["delta must be in (0, 1)"]),
    ("dpsgd", {"clipping_norm": "0"}, ["clipping_norm must be a finite number > 0"]),
    ("dpsgd", {"noise_multiplier": "1"}, ["not both", "target_epsilon=none"]),
    ("dpsgd", {"target_epsilon": "none"}, ["needs target_epsilon", "or noise_multiplier"]),
    ("dpsgd", {"target_epsilon": "abc"}, ["target_epsilon='abc' is not a valid float"]),
    ("dpsgd", {"accountant": "gdp"}, ["choose one of prv, rdp"]),
    ("dpsgd", {"epsilon": "4"}, ["unknown defense argument 'epsilon'", "valid keys: accountant,", "target_epsilon"]),
    ("lora.r4", {"rank": "0"}, ["lora rank must be an integer >= 1"]),
    ("lora", {"rank": "2.5"}, ["rank='2.5' is not a valid int"]),
    ("augment", {"transforms": "rotate"}, ["rotate", "choose from hflip, crop, jitter"]),
    ("early_stop", {"validation_fraction": "1"}, ["validation_fraction must be in (0, 1)"]),
    ("early_stop", {"patience": "0"}, ["patience must be >= 1"]),
    ("none", {"x": "1"}, ["unknown defense argument 'x'", "this defense has no settings"]),
    ("dpgsd", {}, ["unknown defense 'dpgsd'", "did you mean 'dpsgd'", "available: augment, captions, dpsgd"]),
    ("lora.r5", {}, ["unknown defense 'lora.r5'", "did you mean 'lora.r", "presets: "]),
    ("lora+lora", {}, ["lora appears twice", "Valid pairs: ", "dpsgd+lora"]),
    ("none+lora", {}, ["'none' composes with nothing", "dpsgd+lora"]),
    ("dpsgd+", {}, ["invalid defense 'dpsgd+'"]),
    ("dpsgd+lora", {"rank": "0"}, ["lora rank must be"]),
    ("dpsgd+lora", {"lora.target_epsilon": "1"}, ["unknown defense argument", "dpsgd.target_epsilon", "lora.rank"]),
]


@pytest.mark.parametrize(("spec", "overrides", "expected"), BAD_INPUT)
def test_bad_input_is_a_clear_config_error(spec: str, overrides: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(spec, overrides)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))


def test_duplicate_override_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        resolve("lora", [("rank", "2"), ("rank", "4")])


def test_configs_validate_without_resolve() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        DPSGDConfig(target_epsilon=0.0)
    with pytest.raises(ConfigError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="clipping_norm"):  # ConfigError is a ValueError
        DPSGDConfig(clipping_norm=-1.0)
    with pytest.raises(ConfigError, match="transforms"):
        AugmentConfig(transforms=())


def test_a_noise_multiplier_the_prv_accountant_cannot_hold_is_refused_before_training() -> None:
    # Below the floor the PRV accountant asks for GiBs to TiBs when epsilon is computed, after training.
    with pytest.raises(ConfigError, match="pass accountant=rdp"):
        DPSGDConfig(target_epsilon=None, noise_multiplier=0.01)
    DPSGDConfig(target_epsilon=None, noise_multiplier=0.01, accountant="rdp")
    DPSGDConfig(target_epsilon=None, noise_multiplier=1.0)


def test_a_target_epsilon_whose_noise_search_would_leave_the_prv_range_is_refused_before_it() -> None:
    from defenses.dpsgd import PRV_SEARCH_FLOOR, _calibrated_noise, _quiet_opacus

    # 32 members in batches of 32 for 100 epochs: at noise 0.3125 epsilon is already in the hundreds.
    with _quiet_opacus():
        with pytest.raises(ConfigError, match=r"target_epsilon 10000 .*pass accountant=rdp"):
            _calibrated_noise(1e4, 1 / 320, 1.0, 100, "prv")
        assert _calibrated_noise(1e4, 1 / 320, 1.0, 100, "rdp") < PRV_SEARCH_FLOOR
        # Ordinary budgets calibrate as before, a one-epoch run below 0.5 included.
        assert _calibrated_noise(8.0, 1 / 320, 1.0, 100, "prv") > 4
        assert PRV_SEARCH_FLOOR < _calibrated_noise(8.0, 1 / 320, 1.0, 1, "prv") < 0.5


# -- composition -------------------------------------------------------------------------


def test_composition_orders_parts_and_routes_prefixed_keys() -> None:
    composed = resolve("lora.r4+dpsgd.eps8", {"lora.rank": "2", "target_epsilon": "4"})
    assert isinstance(composed, ComposedDefense)
    assert composed.name == "dpsgd+lora"  # canonical, whatever order was typed
    assert [p.name for p in composed.parts] == ["lora", "dpsgd"]  # setup order: DP wraps last
    described = composed.describe()
    assert described["config"]["lora"]["rank"] == 2  # type: ignore[index]
    assert described["config"]["dpsgd"]["target_epsilon"] == 4.0  # type: ignore[index]
    # Both parts were overridden, so neither is its preset any more.
    assert [c["preset"] for c in described["components"]] == [None, None]  # type: ignore[index]
    plain = resolve("lora.r4+dpsgd.eps8").describe()
    assert [c["preset"] for c in plain["components"]] == ["dpsgd.eps8", "lora.r4"]  # type: ignore[index]
    assert all(c["origin"].startswith("diffusion-mia-bench==") for c in described["components"])  # type: ignore[index]
    json.dumps(described)


def _fake(name: str, claims: frozenset[str], registry: Registry[type[Defense]], **fields: object) -> type[Defense]:
    config_cls = dataclasses.make_dataclass(
        f"{name}Config",
        [(k, type(v), dataclasses.field(default=v)) for k, v in fields.items()],
        bases=(DefenseConfig,),
        frozen=True,
    )
    cls = type(name.title(), (Defense,), {"Config": config_cls, "claims": claims})
    return register_defense(name, registry=registry)(cls)


def test_conflicting_claims_and_shared_keys_in_a_fresh_registry() -> None:
    registry: Registry[type[Defense]] = Registry("defense")
    _fake("alpha", frozenset({"optimizer step"}), registry, strength=1.0)
    _fake("beta", frozenset({"optimizer step"}), registry, strength=2.0)
    _fake("gamma", frozenset(), registry, strength=3.0)
    with pytest.raises(ConfigError, match="alpha and beta both take over optimizer step. Valid pairs: alpha\\+gamma"):
        resolve("alpha+beta", registry=registry)
    with pytest.raises(ConfigError, match="ambiguous.*use alpha.strength or gamma.strength"):
        resolve("alpha+gamma", {"strength": "5"}, registry=registry)
    composed = resolve("alpha+gamma", {"gamma.strength": "5"}, registry=registry)
    assert isinstance(composed, ComposedDefense)
    assert [p.config.strength for p in composed.parts] == [1.0, 5.0]  # type: ignore[attr-defined]


def test_defense_that_overrides_fine_tune_cannot_be_composed() -> None:
    registry: Registry[type[Defense]] = Registry("defense")
    _fake("plain", frozenset(), registry)

    class Custom(Defense):
        def fine_tune(self, **kwargs):  # type: ignore[no-untyped-def, override]
            raise NotImplementedError

    register_defense("custom", registry=registry)(Custom)
    assert isinstance(resolve("custom", registry=registry), Custom)  # fine alone
    with pytest.raises(ConfigError, match="custom overrides fine_tune"):
        resolve("custom+plain", registry=registry)


def test_bad_preset_fails_at_registration() -> None:
    registry: Registry[type[Defense]] = Registry("defense")
    with pytest.raises(ConfigError, match="preset bad.x sets unknown field"):
        register_defense("bad", presets={"x": {"nope": 1}}, registry=registry)(type("Bad", (Defense,), {}))
    with pytest.raises(ConfigError, match="rank"):
        register_defense("badlora", presets={"r0": {"rank": 0}}, registry=registry)(
            type("BadLora", (Defense,), {"Config": LoRAConfig})
        )
    with pytest.raises(ValueError, match="'.' starts a preset tag"):
        register_defense("a.b", registry=registry)


# -- the smoke test over the registry ----------------------------------------------------

SMOKE_SPECS = (
    sorted(DEFENSES.names())
    + sorted(presets())
    + [
        # Everything at once; early_stop keeps its last weights (restoring, it may give back the base).
        "augment.all+dpsgd.sigma1+early_stop.last30+lora.r4"
    ]
)


@pytest.mark.parametrize("spec", SMOKE_SPECS)
def test_every_defense_and_preset_fine_tunes_the_tiny_model(
    spec: str, tiny_model_dir: Path, members: tuple[torch.Tensor, list[str]]
) -> None:
    model = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    images, captions = members
    result = resolve(spec).fine_tune(model=model, images=images, captions=captions, train_config=SMOKE_TRAIN)
    assert type(model.unet) is UNet2DConditionModel
    assert set(model.unet.state_dict()) == set(before)
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert result.report.steps >= 1
    json.dumps(result.details, allow_nan=False)
    # A defense that acts at generation only has nothing to say about training.
    expected = {part.split(".")[0] for part in spec.split("+") if resolve(part).training_identity() is not None}
    assert set(result.details) == expected - {"none"}


@dataclass
class _Recorder(TrainingHooks):
    calls: list[str] = dataclasses.field(default_factory=list)

    def setup(self, state):  # type: ignore[no-untyped-def]
        self.calls.append("setup")

    def end_epoch(self, state):  # type: ignore[no-untyped-def]
        self.calls.append(f"epoch {state.epoch}")
        return False

    def finish(self, state):  # type: ignore[no-untyped-def]
        self.calls.append("finish")


def test_finish_runs_even_when_training_fails(tiny_model_dir: Path, members: tuple[torch.Tensor, list[str]]) -> None:
    class Exploding(_Recorder):
        def optimizer_step(self, state):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    from benchmark.pipeline.finetune import train

    hooks = Exploding()
    model = load_model(tiny_model_dir)
    with pytest.raises(RuntimeError, match="boom"):
        train(model, *members, SMOKE_TRAIN, hooks=hooks)
    assert hooks.calls == ["setup", "finish"]
    assert not model.unet.training


class TestLoRAContract(DefenseContract):
    """The contract base class, applied to a built-in (plugins subclass it the same way)."""

    spec = "lora.r4"
    overrides = {"alpha": "8"}


# -- every registered defense produces a result record -----------------------------------


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if n != "none"])  # none: the session's micro run
def test_every_registered_defense_produces_a_record(name: str, micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from importlib import metadata

    import benchmark.app.runner as runner
    from benchmark.pipeline.records import load_record

    outcome = runner.run(
        micro_run.config.replace(defense=name, results_dir=tmp_path / "results", control=False), show_progress=False
    )
    data = load_record(outcome.path)  # validates against the schema
    defense = data["components"]["defense"]
    # Built-in defenses are supplied by this package, at its installed version.
    assert defense["name"] == name
    assert defense["origin"] == f"diffusion-mia-bench=={metadata.version('diffusion-mia-bench')}"
    assert outcome.path.parent.name == name
    if resolve(name).training_identity() is None:  # generation only: its hooks report what they did
        assert defense["details"]["sampling"]["prompts"] > 0
    else:
        for which in ("target", "shadow"):
            assert name in data["training"][which]["defense_details"], which
    assert data["config"]["defense"] == name


# -- command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--defense", "dpsgd", "--defense-arg", "target_epsilon=-1"], "target_epsilon must be a finite number > 0"),
        (["--defense", "dpsgd", "--defense-arg", "target_epsilon"], "is not KEY=VALUE"),
        (["--defense", "lora", "--defense-arg", "rnak=4"], "unknown defense argument 'rnak'; valid keys: alpha,"),
        (["--defense", "lora+lora"], "Valid pairs: "),
        (["--defense", "dpsgd.eps9"], "did you mean 'dpsgd.eps"),
    ],
)
def test_cli_rejects_bad_defense_input_before_training(
    flags: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from benchmark.app.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    results = tmp_path / "results"
    code = main(
        ["run", "--profile", "micro", "--quiet", "--results-dir", str(results), "--cache-dir", str(tmp_path), *flags]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and expected in err and "Traceback" not in err
    assert not results.exists() and not (tmp_path / "base-tiny").exists()


def test_cli_defense_args_reach_the_run_config() -> None:
    import argparse

    from benchmark.app.cli import config_from_args

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    from benchmark.app.cli import _add_run_parser

    _add_run_parser(sub)
    args = parser.parse_args(
        ["run", "--profile", "micro", "--defense", "dpsgd.eps8+lora.r4", "--defense-arg", "lora.rank=8",
         "--defense-arg", "delta=1e-4"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.defense == "dpsgd.eps8+lora.r4"
    assert config.defense_args == (("lora.rank", "8"), ("delta", "1e-4"))
    assert config.validate() is config
    defense = resolve(config.defense, config.defense_args)
    assert defense.describe()["config"] == {  # type: ignore[comparison-overlap]
        "dpsgd": dataclasses.asdict(DPSGDConfig(target_epsilon=8.0, delta=1e-4)),
        "lora": dataclasses.asdict(LoRAConfig(rank=8)),
    }


def test_the_whole_grid_includes_dp_lora_at_two_budgets() -> None:
    from defenses import resolve, suite_defenses

    grid = suite_defenses()
    assert grid[0] == "none" and "dpsgd.eps8+lora.r4" in grid and "dpsgd.eps1+lora.r4" in grid
    for name in grid:
        resolve(name)  # every entry is a valid defense
