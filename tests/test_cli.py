"""The command line: exit codes and messages a user can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.app.cli import main


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich wraps at 80 columns when not on a terminal; messages are matched whole.
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    argv = [
        "run",
        "--profile",
        "micro",
        "--quiet",
        "--results-dir",
        str(tmp_path / "results"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *args,
    ]
    code = main(argv)
    captured = capsys.readouterr()
    # Nothing may have been computed or written for a rejected configuration.
    assert not (tmp_path / "results").exists()
    return code, " ".join((captured.err + captured.out).split())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--defense", "nonee"], ["unknown defense 'nonee'", "did you mean 'none'", "available: ", "wen; presets:"]),
        (["--dataset", "scene"], ["unknown dataset 'scene'", "did you mean 'scenes'", "folder, scenes"]),
        (["--model", "tinyy"], ["unknown model 'tinyy'", "did you mean 'tiny'", "sd15, tiny"]),
        (["--attack-model", "treshold"], ["did you mean 'threshold'"]),
        (["--encoder", "pixel"], ["did you mean 'pixels'"]),
        (["--distance", "cosin"], ["did you mean 'cosine'"]),
    ],
)
def test_unknown_names_exit_2_with_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: list[str]
) -> None:
    code, err = _run(tmp_path, capsys, *flags)
    assert code == 2
    assert "error:" in err
    for text in expected:
        assert text in err
    assert "Traceback" not in err


def test_sd15_without_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, capsys, "--model", "sd15")
    assert code == 2
    assert "--model-path" in err and "nothing is downloaded" in err


def test_sd15_with_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, err = _run(tmp_path, capsys, "--model", "sd15", "--model-path", str(empty))
    assert code == 2
    assert "model_index.json" in err
    assert "not a diffusers text-to-image folder" in err


def test_sd15_with_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, capsys, "--model", "sd15", "--model-path", str(tmp_path / "nope"))
    assert code == 2
    assert "does not exist" in err


def test_folder_dataset_with_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-data"
    code, err = _run(tmp_path, capsys, "--dataset", "folder", "--dataset-path", str(missing))
    assert code == 2
    assert "does not exist" in err and "no-such-data" in err


def test_folder_dataset_without_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(tmp_path, capsys, "--dataset", "folder")
    assert code == 2
    assert "--dataset-path" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--members", "0"], "members must be >= 1"),
        (["--epochs", "0"], "finetune.epochs must be >= 1"),
        (["--learning-rate", "0"], "--finetune.learning-rate must be > 0"),
        (["--scenario", "V"], "unknown scenario 'V'"),
        (["--scenario", "all", "--attack-model", "threshold,clasifier"], "did you mean 'classifier'"),
        (["--attack", "loss", "--attack-model", "threshold,clid_th"], "reads the features of attack family clid only"),
        (["--generations", "0"], "--generations-per-query must be >= 1"),
        (["--query-batch", "0"], "--query-batch must be >= 1"),
        (["--scenario", "I", "--members", "3"], "the target has only 3"),
        (["--scenario", "all", "--members", "200"], "owner's domain, which has 142 left"),
        (["--query-access", "fax"], "unknown query access 'fax'"),
        (["--query-access", "img2img", "--strength", "0"], "--img2img-strength must be > 0 and <= 1"),
        (["--shadow", "clever"], "unknown shadow mode 'clever'"),
        (["--encoder", "hf"], "--encoder hf needs --encoder-path"),
        (["--encoder", "hf", "--encoder-path", "/no/such/encoder"], "encoder folder /no/such/encoder does not exist"),
        (["--scenario", "II", "--captioner", "blip"], "--captioner blip needs --captioner-path"),
        (["--scenario", "IV", "--captioner", "blipp"], "did you mean 'blip'"),
    ],
)
def test_invalid_values_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    code, err = _run(tmp_path, capsys, *flags)
    assert code == 2
    assert expected in err


def test_unknown_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--profile", "huge", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "unknown profile 'huge'" in err and "micro" in err


def test_error_messages_are_not_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weird = tmp_path / "data[/x]" / "[bold]set"
    code, err = _run(tmp_path, capsys, "--dataset", "folder", "--dataset-path", str(weird))
    assert code == 2
    assert "[bold]set" in err


def test_list_prints_every_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr()
    text = out.err + out.out
    for kind in (
        "datasets",
        "models",
        "defenses",
        "attack models",
        "encoders",
        "distances",
        "scenarios",
        "defense presets",
        "profiles",
    ):
        assert kind in text, kind
    lines = [line.split() for line in text.splitlines()]
    entries = {words[0] for words in lines if words}
    for name in ("none", "threshold", "pixels", "scenes", "folder", "tiny", "sd15", "cosine", "micro", "III"):
        assert name in entries, name


def test_list_shows_attack_families_with_access_and_cost_and_defense_claims(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from attacks.families import ATTACK_FAMILIES
    from defenses import DEFENSES

    assert main(["list"]) == 0
    out = capsys.readouterr()
    lines = (out.err + out.out).splitlines()
    assert any(line.startswith("defense presets") for line in lines)  # still listed
    start = next(i for i, line in enumerate(lines) if line.startswith("attacks "))
    section = lines[start + 1 : next(i for i, line in enumerate(lines) if line.startswith("scenarios"))]
    rows = {line.split()[0]: (line, section[i + 1].strip()) for i, line in enumerate(section) if line[2] != " "}
    assert set(rows) == set(ATTACK_FAMILIES.names())
    # The access each family needs and its declared QueryCost (CLiD: 3 pairs x (1 + 4 captions) UNet calls).
    assert rows["clid"][0].split(None, 1)[1] == "gray-box: 0 images, 15 UNet calls"
    assert rows["loss"][0].split(None, 1)[1] == "gray-box: 0 images, 3 UNet calls"
    assert "black-box: 3 images" in rows["pang-wang"][0] and "black-box-img2img: 3 images" in rows["pang-wang"][0]
    assert rows["rediffuse"][0].split(None, 1)[1] == "black-box-img2img: 10 images, 20 UNet calls"
    assert rows["pang-wang"][1].startswith("Pang & Wang (NDSS'25)")  # the one-line summary
    # Each defense with the parts of the loop it claims.
    defenses = {line.split()[0]: line for line in lines[lines.index("defenses") + 1 : lines.index("attack models")]}
    assert defenses["lora"].endswith("(claims: trainable parameters)")
    assert defenses["none"].endswith("(claims: nothing)")
    for name in DEFENSES.names():
        claims = sorted(DEFENSES.get(name).claims)
        assert defenses[name].endswith(f"(claims: {', '.join(claims) or 'nothing'})"), name
    attack_models = {
        line.split()[0]: line for line in lines[lines.index("attack models") + 1 : lines.index("encoders")]
    }
    assert attack_models["clid_th"].endswith("(only with --attack clid)")


def test_all_attack_models_are_those_of_the_attack_family() -> None:
    import argparse

    from benchmark.app.cli import cells_from_args

    asked = argparse.Namespace(scenario=None, attack_model="all")
    assert "clid_th" in cells_from_args(asked, "clid")[1]
    assert cells_from_args(asked, "loss")[1] == ("classifier", "distribution", "threshold")


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_run_with_unwritable_results_folder_fails_before_training(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(
        [
            "run",
            "--profile",
            "micro",
            "--quiet",
            "--results-dir",
            "/proc/benchmark-results",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "results folder /proc/benchmark-results is not writable" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was trained or cached"


def test_threads_flag(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["suite", "--profile", "micro", "--threads", "0", "--results-dir", str(tmp_path)]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
        code = main(["suite", "--profile", "micro", "--threads", "1", "--seeds", "x", "--results-dir", str(tmp_path)])
        assert code == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
