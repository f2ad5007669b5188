"""Every bad input ends in one line naming the problem and the fix, exit code 2, before any training."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from benchmark.app import stages
from benchmark.app.cli import main
from benchmark.app.config import PROFILES
from benchmark.app.suite import unit_lock
from benchmark.kernel.cache import cached
from benchmark.kernel.errors import CacheError, ConfigError

FOLDER_CAPTIONS = 4


@pytest.fixture(autouse=True)
def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    # rich wraps at 80 columns when not on a terminal; messages are matched whole.
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.delenv("FORCE_COLOR", raising=False)

    def trained(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was trained before the bad input was reported")

    monkeypatch.setattr(stages, "base_model", trained)
    monkeypatch.setattr(stages, "target", trained)


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str, command: str = "run") -> tuple[int, str]:
    base = [command, "--profile", "micro", "--quiet"]
    if "--results-dir" not in flags:
        base += ["--results-dir", str(tmp_path / "results")]
    if "--cache-dir" not in flags:
        base += ["--cache-dir", str(tmp_path / "cache")]
    if command == "suite":
        base += ["--defenses", "none", "--scenarios", "III", "--attack-models", "threshold"]
    return _main(capsys, *base, *flags)


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    # A suite announces its grid first; the error is the one last line.
    assert lines and lines[-1].startswith("error: "), err
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    assert all(line.startswith("suite: ") for line in lines[:-1]), err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])


# --- numbers: ranges declared next to each field, checked for every field ---------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--learning-rate", "nan"], ["--finetune.learning-rate", "finite"]),
        (["--learning-rate", "0"], ["--finetune.learning-rate must be > 0", "got 0.0"]),
        (["--pretrain.learning-rate", "-1"], ["--pretrain.learning-rate must be > 0"]),
        (["--seed", "-1"], ["--seed must be >= 0 and <= 4294967295", "got -1"]),
        (["--seed", "4294967296"], ["--seed must be >= 0 and <= 4294967295"]),
        (["--public-seed", "-3"], ["--public-seed must be >= 0"]),
        (["--finetune.seed", "4294967296"], ["--finetune.seed must be"]),
        (["--dataset-size", "0"], ["--dataset-size must be >= 1", "got 0"]),
        (["--resolution", "0"], ["--resolution must be >= 1"]),
        (["--epochs", "0"], ["--finetune.epochs must be >= 1"]),
        (["--pretrain.epochs", "0"], ["--pretrain.epochs must be >= 1"]),
        (["--pretrain.batch-size", "0"], ["--pretrain.batch-size must be >= 1"]),
        (["--members", "0"], ["--members must be >= 1"]),
        (["--nonmembers", "-1"], ["--nonmembers must be >= 1"]),
        (["--utility", "-1"], ["--utility must be >= 0"]),
        (["--kid-subset-size", "0"], ["--kid-subset-size must be >= 1"]),
        (["--generations", "0"], ["--generations-per-query must be >= 1"]),
        (["--query-batch", "0"], ["--query-batch must be >= 1"]),
        (["--bootstrap", "-1"], ["--bootstrap-resamples must be >= 0"]),
        (["--strength", "0"], ["--img2img-strength must be > 0 and <= 1"]),
        (["--strength", "1.5"], ["--img2img-strength must be > 0 and <= 1"]),
        (["--sampling.guidance-scale", "-1"], ["--sampling.guidance-scale must be >= 0"]),
        (["--inference-steps", "0"], ["--sampling.num-inference-steps must be >= 1"]),
        (["--sampling.batch-size", "0"], ["--sampling.batch-size must be >= 1"]),
        (["--pretrain.caption-dropout", "1"], ["--pretrain.caption-dropout must be >= 0 and < 1"]),
        (["--finetune.caption-dropout", "-0.1"], ["--finetune.caption-dropout must be >= 0 and < 1"]),
        (["--finetune.lr-warmup-steps", "-1"], ["--finetune.lr-warmup-steps must be >= 0"]),
        (["--finetune.weight-decay", "-1"], ["--finetune.weight-decay must be >= 0"]),
        (["--finetune.max-grad-norm", "0"], ["--finetune.max-grad-norm must be > 0"]),
        (["--encoder-training.mask-fraction", "1"], ["--encoder-training.mask-fraction must be >= 0 and < 1"]),
        (["--encoder-training.epochs", "0"], ["--encoder-training.epochs must be >= 1"]),
        (["--captioner-training.finetune-replay", "-1"], ["--captioner-training.finetune-replay must be >= 0"]),
        (["--captioner-training.hf-learning-rate", "0"], ["--captioner-training.hf-learning-rate must be > 0"]),
        (["--reference-clip.held-out-fraction", "1"], ["--reference-clip.held-out-fraction must be >= 0 and < 1"]),
        (["--reference-clip.steps", "0"], ["--reference-clip.steps must be >= 1"]),
        (["--public", "0"], ["--public must be >= 1"]),
    ],
)
def test_numbers_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: list[str]
) -> None:
    code, err = _run(tmp_path, capsys, *flags)
    _assert_one_line_error(code, err, *expected)
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "cache").exists()


def test_every_profile_is_in_range() -> None:
    for name, config in PROFILES.items():
        config.check_ranges()  # raises ConfigError naming the field if a profile breaks its own ranges
        assert name


def test_numbers_in_stored_configurations_are_checked_too() -> None:
    config = PROFILES["micro"].replace(seed=-1)
    with pytest.raises(ConfigError, match="--seed must be >= 0"):
        config.validate()


# --- folders the run writes to ----------------------------------------------------------------------


def test_cache_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cache").write_text("not a folder")
    code, err = _run(tmp_path, capsys, "--cache-dir", str(tmp_path / "cache"))
    _assert_one_line_error(code, err, f"cache folder {tmp_path / 'cache'}", "--cache-dir", "BENCHMARK_CACHE_DIR")
    assert not (tmp_path / "results").exists()


def test_cache_dir_is_a_file_for_a_suite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cache").write_text("not a folder")
    code, err = _run(tmp_path, capsys, "--cache-dir", str(tmp_path / "cache"), command="suite")
    _assert_one_line_error(code, err, "--cache-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cache_dir_read_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o500)
    try:
        code, err = _run(tmp_path, capsys)
    finally:
        (tmp_path / "cache").chmod(0o700)
    _assert_one_line_error(code, err, "cannot be written", "--cache-dir")


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_cache_full_while_building(tmp_path: Path, error: int) -> None:
    def build(folder: Path) -> None:
        (folder / "half-written").write_bytes(b"x")
        raise OSError(error, os.strerror(error))

    with pytest.raises(CacheError) as caught:
        cached(tmp_path / "cache", "kind", {"a": 1}, build, lambda folder: folder)
    message = str(caught.value)
    assert "--cache-dir" in message and "BENCHMARK_CACHE_DIR" in message
    assert os.strerror(error) in message
    # The staging folder is gone: nothing half-built is left in the cache.
    assert list((tmp_path / "cache" / "kind").iterdir()) == []


def test_other_build_errors_pass_through(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        raise FileNotFoundError(errno.ENOENT, "no such input", "input.txt")

    with pytest.raises(FileNotFoundError):
        cached(tmp_path / "cache", "kind", {"a": 1}, build, lambda folder: folder)


def test_results_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results").write_text("not a folder")
    code, err = _run(tmp_path, capsys, "--results-dir", str(tmp_path / "results"))
    _assert_one_line_error(code, err, "--results-dir")


# --- a folder dataset -------------------------------------------------------------------------------


def _png(side: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _folder(tmp_path: Path, *, bad_line: bytes | None = None, bad_image: bytes | None = None) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i in range(FOLDER_CAPTIONS):
        (root / f"{i}.png").write_bytes(_png())
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a caption {i}"}).encode())
    if bad_image is not None:
        (root / "bad.png").write_bytes(bad_image)
        lines.append(json.dumps({"file_name": "bad.png", "text": "the bad one"}).encode())
    if bad_line is not None:
        lines.append(bad_line)
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def _run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, str]:
    return _run(tmp_path, capsys, "--dataset", "folder", "--dataset-path", str(root))


def test_folder_caption_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path, bad_line=b'{"file_name": "0.png", "text": "caf\xe9"}')
    code, err = _run_folder(tmp_path, capsys, root)
    _assert_one_line_error(
        code, err, f"metadata.jsonl:{FOLDER_CAPTIONS + 1}", "not UTF-8", "save metadata.jsonl as UTF-8"
    )


def test_folder_truncated_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = _png(64)
    root = _folder(tmp_path, bad_image=whole[: len(whole) // 2])
    code, err = _run_folder(tmp_path, capsys, root)
    _assert_one_line_error(code, err, f"metadata.jsonl:{FOLDER_CAPTIONS + 1}", "'bad.png'", "replace or remove it")


@pytest.mark.parametrize("side", [12, 16])  # over MAX_IMAGE_PIXELS (PIL warns), over twice it (PIL raises)
def test_folder_decompression_bomb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    root = _folder(tmp_path, bad_image=_png(side))
    code, err = _run_folder(tmp_path, capsys, root)
    _assert_one_line_error(code, err, "'bad.png'", "too large to decode safely", "resize it or remove it")


def test_folder_dataset_path_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").write_text("x")
    code, err = _run_folder(tmp_path, capsys, tmp_path / "data")
    _assert_one_line_error(code, err, "--dataset-path")


# --- a Stable Diffusion folder ----------------------------------------------------------------------


def _sd_folder(tmp_path: Path, weights_name: str, weights: bytes) -> Path:
    root = tmp_path / "sd"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (root / sub).mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "unet" / weights_name).write_bytes(weights)
    return root


@pytest.mark.parametrize(
    ("name", "weights", "expected"),
    [
        ("diffusion_pytorch_model.safetensors", b"garbage" * 10, ["not a readable safetensors file", "intact copy"]),
        ("diffusion_pytorch_model.safetensors", b"", ["not a readable safetensors file"]),
        ("diffusion_pytorch_model.bin", b"\x80\x04K\x01.", ["only pickled weights", "safe_serialization=True"]),
        ("model.ckpt", b"\x80\x04K\x01.", ["only pickled weights", "never loaded"]),
    ],
)
def test_sd_folder_bad_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, weights: bytes, expected: list[str]
) -> None:
    root = _sd_folder(tmp_path, name, weights)
    code, err = _run(tmp_path, capsys, "--model", "sd15", "--model-path", str(root), "--resolution", "8")
    _assert_one_line_error(code, err, "--model-path", *expected)


# --- suite: lock state and the summary --------------------------------------------------------------


def test_lock_folder_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / ".locks").write_text("x")
    code, err = _run(tmp_path, capsys, command="suite")
    _assert_one_line_error(code, err, ".locks", "is not a folder", "remove")


def test_lock_path_is_a_folder_after_a_good_run(tmp_path: Path) -> None:
    unit = PROFILES["micro"]
    with unit_lock(tmp_path, unit, wait=False) as held:
        assert held
    [lock] = list((tmp_path / ".locks").iterdir())
    lock.unlink()
    lock.mkdir()
    with pytest.raises(ConfigError, match="is not a regular file; remove"):
        with unit_lock(tmp_path, unit, wait=False):
            pass


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_suite_summary_unwritable(tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    (tmp_path / "afile").write_text("x")
    summary = tmp_path if where == "folder" else tmp_path / "afile" / "summary.json"
    code, err = _run(tmp_path, capsys, "--summary", str(summary), command="suite")
    _assert_one_line_error(code, err, "--summary", "pass a writable file path")
    assert not (tmp_path / "results").exists()


# --- other flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected", "command"),
    [
        (["--threads", "0"], ["--threads must be >= 1"], "run"),
        (["--seeds", "a,b"], ["--seeds 'a,b' is not a comma list of integers"], "suite"),
        (["--seeds", "-1"], ["--seed must be >= 0"], "suite"),
        (["--defense", "dpsgd", "--defense-arg", "garbage"], ["is not KEY=VALUE"], "run"),
        (["--clip-model", "FILE"], ["--clip-model"], "run"),
        (["--fid-weights", "FILE"], ["--fid-weights"], "run"),
        (["--encoder", "hf", "--encoder-path", "FILE"], ["--encoder-path"], "run"),
        (["--scenario", "II", "--captioner", "blip", "--captioner-path", "FILE"], ["--captioner-path"], "run"),
    ],
)
def test_other_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: list[str], command: str
) -> None:
    (tmp_path / "afile").write_bytes(b"garbage")
    flags = [str(tmp_path / "afile") if f == "FILE" else f for f in flags]
    code, err = _run(tmp_path, capsys, *flags, command=command)
    _assert_one_line_error(code, err, *expected)


# --- the safety net ---------------------------------------------------------------------------------


def _boom(*args: object, **kwargs: object) -> int:
    raise RuntimeError("something\nnobody foresaw")


@pytest.mark.parametrize("debug_at", [None, 0, -1])
def test_unexpected_errors_are_one_line_unless_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, debug_at: int | None
) -> None:
    monkeypatch.setattr("benchmark.app.cli.cmd_list", _boom)
    argv = ["list"]
    if debug_at is not None:
        argv.insert(len(argv) if debug_at == -1 else 0, "--debug")
    code, err = _main(capsys, *argv)
    assert code == 1
    if debug_at is None:
        assert err.strip() == ("error: RuntimeError: something nobody foresaw (run with --debug for the traceback)")
    else:
        assert "Traceback" in err and "_boom" in err


def test_help_documents_debug_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--debug" in out and "exit codes" in out


@pytest.mark.parametrize(
    ("flag", "extra", "expected"),
    [
        ("--model-path", ["--model", "sd15"], "model folder"),
        ("--dataset-path", ["--dataset", "folder"], "dataset folder"),
        ("--encoder-path", ["--encoder", "hf"], "encoder folder"),
        ("--captioner-path", ["--captioner", "blip", "--scenario", "II"], "captioner folder"),
        ("--clip-model", [], "--clip-model"),
    ],
)
def test_a_file_where_a_folder_is_needed_is_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, extra: list[str], expected: str
) -> None:
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"not a folder")
    code, err = _run(tmp_path, capsys, *extra, flag, str(a_file))
    _assert_one_line_error(code, err, expected, "is a file, not a folder")


@pytest.mark.parametrize("config", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"model_type": "bert"}'])
def test_clip_model_with_a_bad_config_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: bytes
) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    code, err = _run(tmp_path, capsys, "--clip-model", str(folder))
    _assert_one_line_error(code, err, "--clip-model", str(folder))


@pytest.mark.parametrize("command", ["run", "suite"])
def test_a_fine_tuning_seed_is_refused_naming_the_run_seed(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run's seed seeds every fine-tune; a finetune.seed would be recorded and ignored.
    code, err = _run(tmp_path, capsys, "--finetune.seed", "1", command=command)
    _assert_one_line_error(code, err, "finetune.seed 1 is not used", "pass --seed")
