"""One place per setting: RunConfig's fields are the flags, one converter reads flags and stored JSON."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import math
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from attacks.scenarios import QueryAccess, Scenario, ShadowMode
from benchmark.app.cli import RUN_EXAMPLES, SUITE_EXAMPLES, build_parser, config_from_args, main
from benchmark.app.config import PROFILES, RunConfig, profile
from benchmark.app.flags import DEST_PREFIX, config_flags
from benchmark.app.suite import cell_key
from benchmark.kernel.convert import convert
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.finetune import TrainConfig
from benchmark.pipeline.records import parse_json, read_record_bytes, record_files
from benchmark.pipeline.target import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]

# Flags that are not part of the run's configuration, per subcommand.
NOT_CONFIG = {
    "run": {"--scenario", "--attack-model", "--quiet", "--threads"},
    "suite": {"--defenses", "--scenarios", "--attack-models", "--seeds", "--summary", "--quiet", "--threads"}
    # Where units run (benchmark.app.executors).
    | {"--executor", "--ray-address", "--cpus-per-unit", "--gpus-per-unit", "--unit-retries"}
    # Print what the suite would do instead of doing it (benchmark.app.plan).
    | {"--plan"},
}
# Fields a subcommand sets through one of those flags instead of a flag of their own.
SET_OTHERWISE = {
    "run": {"scenario": "--scenario", "attack_model": "--attack-model"},  # one, a list, or all
    "suite": {"defense": "--defenses", "seed": "--seeds", "scenario": "--scenarios", "attack_model": "--attack-models"},
}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def setting_paths(cls: type, prefix: str = "") -> list[str]:
    """Every setting of `cls` by dotted path; a dataclass-typed field stands for its own fields."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += setting_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def mismatches(parser: argparse.ArgumentParser, cls: type, command: str) -> tuple[list[str], list[str]]:
    """(settings of `cls` with no flag, flags that set no setting of `cls` and are not listed as such)."""
    actions = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    dests = {a.dest for a in actions}
    options = {o for a in actions for o in a.option_strings}
    paths = setting_paths(cls)
    missing = [
        p
        for p in paths
        if DEST_PREFIX + p not in dests and not (p in SET_OTHERWISE[command] and SET_OTHERWISE[command][p] in options)
    ]
    stray = [
        "/".join(a.option_strings)
        for a in actions
        if (a.dest.removeprefix(DEST_PREFIX) not in paths if a.dest.startswith(DEST_PREFIX) else True)
        and not set(a.option_strings) <= NOT_CONFIG[command]
    ]
    return missing, stray


@pytest.mark.parametrize("command", ["run", "suite"])
def test_every_setting_is_a_flag_and_every_flag_a_setting(command: str) -> None:
    assert mismatches(subparser(command), RunConfig, command) == ([], [])


@dataclass(frozen=True)
class _Grown(RunConfig):
    surprise: int = field(default=0, metadata={"help": "a setting the parser was not built for"})


def test_the_flag_check_can_fail() -> None:
    parser = subparser("run")
    assert mismatches(parser, _Grown, "run") == (["surprise"], [])
    parser.add_argument("--bogus")
    parser.add_argument("--ghost", dest=DEST_PREFIX + "ghost")
    assert mismatches(parser, RunConfig, "run")[1] == ["--bogus", "--ghost"]


def test_a_setting_without_help_is_refused() -> None:
    @dataclass(frozen=True)
    class Undocumented:
        size: int = 3

    with pytest.raises(TypeError, match=r"Undocumented.size has no help"):
        config_flags(Undocumented)


def test_every_flag_has_help_and_fixed_sets_have_choices() -> None:
    flags = {f.path: f for f in config_flags(RunConfig)}
    assert all(f.help for f in flags.values())
    assert flags["scenario"].choices == ("I", "II", "III", "IV")
    assert flags["query_access"].choices == ("text", "img2img")
    assert flags["shadow"].choices == ("aware", "naive")
    assert set(flags["profile"].choices) == set(PROFILES)
    assert flags["finetune.epochs"].flag == "--finetune.epochs"
    assert flags["reference_clip.held_out_fraction"].flag == "--reference-clip.held-out-fraction"
    # Defaults of nested flags are the enclosing field's, not the nested class's.
    assert flags["pretrain.epochs"].default == RunConfig().pretrain.epochs == 30


def parse(command: str, *argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args([command, *argv]))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["--strength", "0.3"], ["--img2img-strength", "0.3"]),
        (["--epochs", "5"], ["--finetune.epochs", "5"]),
        (["--learning-rate", "0.01"], ["--finetune.learning-rate", "0.01"]),
        (["--inference-steps", "7"], ["--sampling.num-inference-steps", "7"]),
        (["--generations", "4"], ["--generations-per-query", "4"]),
        (["--bootstrap", "10"], ["--bootstrap-resamples", "10"]),
        (["--no-control"], ["--control", "--no-control"]),
        (["--no-utility"], ["--no-utility-metrics"]),
        (["--no-baseline"], ["--no-baseline"]),
        (["--no-captioner-finetune"], ["--no-captioner-finetune"]),
        (["--defense-arg", "rank=8"], ["--defense-args", "rank=8"]),
    ],
)
def test_old_flag_names_still_work(old: list[str], new: list[str]) -> None:
    default = parse("run", "--profile", "micro")
    assert parse("run", "--profile", "micro", *old) == parse("run", "--profile", "micro", *new) != default


def test_flags_set_nested_settings_and_keep_the_rest_of_the_profile() -> None:
    config = parse("run", "--profile", "micro", "--epochs", "5", "--sampling.guidance-scale", "2", "--no-utility")
    micro = profile("micro")
    assert config.finetune == dataclasses.replace(micro.finetune, epochs=5)
    assert config.sampling == dataclasses.replace(micro.sampling, guidance_scale=2.0)
    assert config.utility_metrics is False
    assert config.replace(finetune=micro.finetune, sampling=micro.sampling, utility_metrics=True) == micro
    # An optional setting can be cleared from the command line.
    assert parse("run", "--profile", "micro", "--dataset-size", "none").dataset_size is None


def test_suite_takes_the_same_configuration_flags() -> None:
    args = build_parser().parse_args(["suite", "--profile", "micro", "--members", "6", "--epochs", "2"])
    config = config_from_args(args)
    assert config.members == 6 and config.finetune.epochs == 2 and config.profile == "micro"


def test_readme_and_help_examples_parse() -> None:
    text = "\n".join(
        [(ROOT / "README.md").read_text(), (ROOT / "CONTRIBUTING.md").read_text(), RUN_EXAMPLES, SUITE_EXAMPLES]
    )
    text = re.sub(r"<[^>]*>", "PLACEHOLDER", text.replace("\\\n", " "))
    commands = re.findall(r"python -m benchmark ((?:run|suite) [^`#\n]*)", text)
    assert len(commands) >= 8
    for command in commands:
        if "--help" not in command:
            config_from_args(build_parser().parse_args(shlex.split(command)))


def test_preset_is_a_deprecated_alias_of_profile(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "suite"):
        old = parse(command, "--preset", "micro")
        err = capsys.readouterr().err
        assert "--preset is deprecated" in err and "use --profile" in err
        new = parse(command, "--profile", "micro")
        assert "deprecated" not in capsys.readouterr().err
        assert old == new == profile("micro") and new.profile == "micro"


def test_bad_flag_values_exit_2_naming_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run", "--profile", "micro", "--quiet", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path)]
    for flags, expected in [
        (["--learning-rate", "nan"], "--finetune.learning-rate: expected a finite number, got 'nan'"),
        (["--strength", "inf"], "--img2img-strength: expected a finite number, got 'inf'"),
        (["--members", "many"], "--members: expected an integer, got 'many'"),
        (["--defense", "dpsgd", "--defense-arg", "target_epsilon=nan"], "expected a finite number"),
    ]:
        assert main([*base, *flags]) == 2
        assert expected in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r").exists()


class Colour(enum.Enum):
    RED = "red"
    GREEN = "Green"


@dataclass(frozen=True)
class Inner:
    steps: int
    rate: float = 0.5
    path: Path | None = None


@pytest.mark.parametrize(
    ("raw", "hint", "expected"),
    [
        ("4", int, 4),
        (4, int, 4),
        (" 4 ", int, 4),
        ("2.5", float, 2.5),
        (2, float, 2.0),
        ("1e-4", float, 1e-4),
        ("yes", bool, True),
        ("off", bool, False),
        (True, bool, True),
        ("none", int | None, None),
        (None, int | None, None),
        ("7", int | None, 7),
        ("null", Path | None, None),
        ("/x/y", Path, Path("/x/y")),
        ("/x/y", Path | None, Path("/x/y")),
        ("III", Scenario, Scenario.III),
        ("iii", Scenario, Scenario.III),
        ("IMG2IMG", QueryAccess, QueryAccess.IMAGE_TO_IMAGE),
        (ShadowMode.NAIVE, ShadowMode, ShadowMode.NAIVE),
        ("green", Colour, Colour.GREEN),
        ("a, b", tuple[str, ...], ("a", "b")),
        (["a", "b"], tuple[str, ...], ("a", "b")),
        ("1,2", tuple[int, float], (1, 2.0)),
        ([["k", "v"]], tuple[tuple[str, str], ...], (("k", "v"),)),
        ("b", typing.Literal["a", "b"], "b"),
        ({"steps": 3, "path": "/p"}, Inner, Inner(steps=3, path=Path("/p"))),
        ({"steps": "3", "rate": "0.1"}, Inner, Inner(steps=3, rate=0.1)),
    ],
)
def test_one_converter_for_strings_and_json(raw: object, hint: object, expected: object) -> None:
    value = convert(raw, hint)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("raw", "hint", "message"),
    [
        ("nan", float, "finite"),
        ("inf", float, "finite"),
        ("-Infinity", float, "finite"),
        (math.nan, float, "finite"),
        (math.inf, float | None, "finite"),
        ({"steps": 1, "rate": math.nan}, Inner, "rate: expected a finite number"),
        ("abc", int, "expected an integer"),
        (True, int, "expected an integer"),
        (2.5, int, "expected an integer"),
        ("maybe", bool, "true or false"),
        (1, bool, "true or false"),
        (None, int, "required"),
        ("V", Scenario, "unknown scenario 'V'; available: I, II, III, IV"),
        ("fax", QueryAccess, "unknown query access 'fax'"),
        ("1", tuple[int, int], "expected 2 values"),
        ("c", typing.Literal["a", "b"], "choose one of a, b"),
        ({"steps": 1, "speed": 2}, Inner, "unknown Inner setting(s) speed"),
        ({"rate": 1.0}, Inner, "steps"),
        ("", Path, "expected a path"),
    ],
)
def test_the_converter_rejects_with_a_reason(raw: object, hint: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        convert(raw, hint)


def test_the_converter_refuses_types_it_does_not_know() -> None:
    with pytest.raises(TypeError, match="cannot be converted"):
        convert("x", dict[str, int])


def test_from_dict_converts_json_and_rejects_non_finite_numbers() -> None:
    data = json.loads(json.dumps(profile("micro").to_dict()))
    data["finetune"]["learning_rate"] = 1  # an int in JSON is a float setting's value
    data["sampling"]["num_inference_steps"] = "9"
    config = RunConfig.from_dict(data)
    assert config.finetune.learning_rate == 1.0 and isinstance(config.finetune.learning_rate, float)
    assert config.sampling == SamplingConfig(num_inference_steps=9)
    assert isinstance(config.finetune, TrainConfig) and isinstance(config.results_dir, Path)
    data["img2img_strength"] = math.nan
    with pytest.raises(ConfigError, match="img2img_strength: expected a finite number"):
        RunConfig.from_dict(data)


def reference_configs() -> list[dict[str, object]]:
    paths = record_files(ROOT / "leaderboard" / "reference")
    return [parse_json(read_record_bytes(p), source=str(p))["config"] for p in paths]


def test_old_records_with_preset_load_and_keep_their_cell() -> None:
    # The committed records are written with "preset" or, once migrated, "profile": check both spellings.
    configs = reference_configs()
    assert configs, "the committed reference records are missing"
    for stored in configs:
        size = stored.get("profile", stored.get("preset"))
        assert size in PROFILES
        rest = {k: v for k, v in stored.items() if k not in ("preset", "profile")}
        old, new = {"preset": size, **rest}, {"profile": size, **rest}
        config = RunConfig.from_dict(old)
        assert config == RunConfig.from_dict(new) and config.profile == size
        # A resumed suite must not re-run a cell an old record already holds.
        assert cell_key(old) == cell_key(new) == cell_key(config)


def test_an_old_config_equals_the_new_one_it_stands_for() -> None:
    new = profile("micro").replace(defense="lora.r4", seed=2).to_dict()
    old = {("preset" if k == "profile" else k): v for k, v in new.items()}
    assert RunConfig.from_dict(old) == RunConfig.from_dict(new)
    assert cell_key(old) == cell_key(new)
    assert RunConfig.from_dict({**new, "preset": "micro"}).profile == "micro"  # both names, one value
    with pytest.raises(ConfigError, match="'preset' is the old name of 'profile'"):
        RunConfig.from_dict({**new, "preset": "full"})
