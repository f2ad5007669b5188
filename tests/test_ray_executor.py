"""The Ray executor: a micro suite on a real two-CPU Ray cluster writes each cell once, survives a killed worker,
resumes without writing anything, and refuses bad flags in one line before any work.

The cluster is started once for the module (`ray start --head --block`, stopped at teardown),
and the suites share one cache folder, so the tiny base model is pretrained only once.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from attacks.scenarios import Scenario
from benchmark.app import executors, runner
from benchmark.app.cli import main
from benchmark.app.config import profile
from benchmark.app.executors import ExecutorOptions, RayExecutor, UnitFailed
from benchmark.app.suite import LOCK_DIR, SuiteReport, SuiteSpec, UnitTask, cell_key, run_suite
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import load_record, record_files

GRID = ["--defenses", "none,augment.all", "--scenarios", "III", "--attack-models", "threshold", "--seeds", "0"]
LABELS = {"none seed 0", "augment.all seed 0"}
# No network here, and none needed: Ray would otherwise try to report usage.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
# The test head takes no authentication token: a driver reads RAY_AUTH_MODE once, when Ray is
# first imported into its process, so a token mode set here could come too late for this one.
HEAD_ENV = {**RAY_ENV, "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _suite_args(results: Path, cache: Path, *flags: str) -> list[str]:
    return [
        "suite",
        "--profile",
        "micro",
        "--quiet",
        *GRID,
        "--results-dir",
        str(results),
        "--cache-dir",
        str(cache),
        *flags,
    ]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error")] == lines[-1:], err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])


def _records_per_cell(results: Path) -> collections.Counter[str]:
    return collections.Counter(cell_key(load_record(path)["config"]) for path in record_files(results))


# --- a real cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """HOST:PORT of a two-CPU Ray head started for this module; stopped (with its workers) at teardown."""
    pytest.importorskip("ray")
    port = _free_port()
    # Short: Ray's unix sockets live under it, and a socket path may not pass 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-")
    log = open(Path(temp) / "head.log", "w+")  # noqa: SIM115 - closed at teardown
    command = [
        *(sys.executable, "-c", "from ray.scripts.scripts import main; main()"),
        *("start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port)),
        *("--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--temp-dir", temp),
    ]
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **HEAD_ENV})
    with pytest.MonkeyPatch.context() as mp:
        for name, value in RAY_ENV.items():
            mp.setenv(name, value)
        try:
            deadline = time.monotonic() + 120
            while "This command will now block" not in Path(log.name).read_text():
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Ray head did not start:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.2)
            yield f"127.0.0.1:{port}"
        finally:
            # `ray start --block` stops what it started (raylet, workers) when it gets SIGTERM.
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                head.kill()
                head.wait(10)
            log.close()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_session(ray_address: str) -> Iterator[None]:
    """This process joined to the cluster for the module: its workers import the benchmark once, not once a test.

    The executor finds Ray started and leaves it so; the killed-worker test's driver, a
    process of its own, goes through the executor's own connection.
    """
    import ray

    ray.init(address=ray_address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the first suite pretrains the micro base model, the others reuse it."""
    return tmp_path_factory.mktemp("ray-cache")


def test_ray_suite_writes_each_cell_once_then_resumes_writing_nothing(
    ray_address: str, ray_session: None, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, summary = tmp_path / "results", tmp_path / "summary.json"
    args = _suite_args(results, cache_dir, "--executor", "ray", "--ray-address", ray_address, "--summary", str(summary))
    code, err = _main(capsys, *args)
    assert code == 0, err
    report = json.loads(summary.read_text())
    assert len(report["written"]) == 2 and report["skipped"] == 0 and not report["failed"], report
    assert set(report["unit_seconds"]) == LABELS and "fine-tune target" in report["stage_seconds"]
    assert "done 2/2: " in err and "1 cell(s) written" in err
    counts = _records_per_cell(results)
    assert len(counts) == 2 and set(counts.values()) == {1}, counts

    code, err = _main(capsys, *args)
    assert code == 0, err
    again = json.loads(summary.read_text())
    assert again["written"] == [] and again["skipped"] == 2 and not again["failed"], again
    assert _records_per_cell(results) == counts


def test_a_failing_unit_is_retried_then_reported_and_the_rest_still_runs(
    ray_address: str, ray_session: None, cache_dir: Path, tmp_path: Path
) -> None:
    # Nested, so that Ray ships it by value: a worker cannot import this test module.
    def fail_for_none(config, **kwargs):  # type: ignore[no-untyped-def]
        if config.defense == "none":
            raise RuntimeError("boom")
        return runner.run_matrix(config, **kwargs)

    config = profile("micro").replace(results_dir=tmp_path / "results", cache_dir=cache_dir)
    spec = SuiteSpec(config, ("none", "augment.all"), (Scenario.III,), ("threshold",), (0,))
    executor = RayExecutor(ExecutorOptions(ray_address=ray_address, unit_retries=1))
    report = run_suite(spec, show_progress=False, run_matrix=fail_for_none, executor=executor)
    assert report.failed == [("none seed 0", "RuntimeError: boom")]
    assert report.retries == {"none seed 0": 1}  # --unit-retries 1: two attempts in all
    assert len(report.written) == 1 and list(_records_per_cell(config.results_dir).values()) == [1]


def test_a_killed_worker_is_retried_and_every_cell_is_still_written_once(
    ray_address: str, cache_dir: Path, tmp_path: Path
) -> None:
    results, summary = tmp_path / "results", tmp_path / "summary.json"
    args = _suite_args(results, cache_dir, "--executor", "ray", "--ray-address", ray_address, "--summary", str(summary))
    driver = subprocess.Popen(
        [sys.executable, "-m", "benchmark", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **RAY_ENV},
    )
    try:
        killed = _kill_a_worker_running_a_unit(results, driver, timeout_s=180)
        output, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, output
    report = json.loads(summary.read_text())
    assert report["retries"] == {killed: 1} and not report["failed"], (report, output)
    # Written by the retry, or (killed between its record and its end) by the first attempt.
    assert re.search(rf"done ./2: {re.escape(killed)}, . cell\(s\) written.* after 2 attempts", output), output
    counts = _records_per_cell(results)
    assert len(counts) == 2 and set(counts.values()) == {1}, counts
    # A killed worker leaves no half-written record, nor a temporary file a reader could mistake for one.
    assert not [p for p in results.rglob("*") if p.is_file() and p.suffix == ".json" and p not in record_files(results)]


def _kill_a_worker_running_a_unit(results: Path, driver: subprocess.Popen[str], *, timeout_s: float) -> str:
    """SIGKILL the process holding a unit's lock (its line: "<pid> <defense> seed <n>"); the unit's label."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()[0]
        for lock in sorted((results / LOCK_DIR).glob("*.lock")):
            fd = os.open(lock, os.O_RDONLY)
            try:
                try:
                    # Free (a unit not started, or done): take nothing and move on.
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    continue
                except BlockingIOError:
                    line = os.read(fd, 200).decode().split()
            finally:
                os.close(fd)
            if len(line) == 4:
                os.kill(int(line[0]), signal.SIGKILL)
                return " ".join(line[1:])
        time.sleep(0.05)
    pytest.fail("no unit was seen running")


def test_a_unit_no_node_can_hold_is_refused_before_any_work(
    ray_address: str, ray_session: None, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _suite_args(tmp_path / "results", cache_dir, "--executor", "ray", "--ray-address", ray_address)
    code, err = _main(capsys, *args, "--gpus-per-unit", "1")
    _assert_one_line_error(code, err, "no node of the Ray cluster has 1 CPU(s) and 1 GPU(s)", "--gpus-per-unit")
    assert not record_files(tmp_path / "results")


# --- errors before any work (no cluster) ----------------------------------------------------------


def test_ray_not_installed_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code, err = _main(capsys, *_suite_args(tmp_path / "r", tmp_path / "c", "--executor", "ray"))
    _assert_one_line_error(code, err, "--executor ray needs Ray", 'pip install -e ".[ray]"')
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--ray-address", "127.0.0.1:6379"], "--ray-address need(s) --executor ray"),
        (["--gpus-per-unit", "1", "--cpus-per-unit", "2"], "--cpus-per-unit, --gpus-per-unit need(s) --executor ray"),
        (["--unit-retries", "1"], "--unit-retries need(s) --executor ray"),
        (["--executor", "rya"], "unknown executor 'rya'; did you mean 'ray'?"),
        (["--executor", "ray", "--cpus-per-unit", "-1"], "--cpus-per-unit must be a number >= 0, got -1"),
        (["--executor", "ray", "--gpus-per-unit", "1.5"], "fraction of one GPU or a whole number, got 1.5"),
        (["--executor", "ray", "--unit-retries", "-1"], "--unit-retries must be >= 0, got -1"),
        (["--executor", "ray", "--ray-address", "headnode"], "'headnode' is not HOST:PORT"),
    ],
)
def test_bad_executor_flags_fail_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    expected: str,
) -> None:
    # The numbers and the address are checked with or without Ray installed.
    monkeypatch.setattr(executors, "import_ray", lambda: SimpleNamespace())
    code, err = _main(capsys, *_suite_args(tmp_path / "r", tmp_path / "c", *flags))
    _assert_one_line_error(code, err, expected)
    assert not (tmp_path / "r").exists()


def test_an_address_where_nothing_listens_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executors, "import_ray", lambda: SimpleNamespace())
    address = f"127.0.0.1:{_free_port()}"
    start = time.monotonic()
    code, err = _main(
        capsys, *_suite_args(tmp_path / "r", tmp_path / "c", "--executor", "ray", "--ray-address", address)
    )
    _assert_one_line_error(code, err, f"no Ray cluster answers at {address}", "ray start --head --port")
    assert time.monotonic() - start < 30


def test_a_cluster_that_refuses_the_connection_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**_: object) -> None:
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    fake_ray = SimpleNamespace(is_initialized=lambda: False, init=refuse, shutdown=lambda: None)
    monkeypatch.setattr(executors, "import_ray", lambda: fake_ray)
    executor = RayExecutor(ExecutorOptions(ray_address="auto"))  # auto: no host to check first
    spec = SuiteSpec(
        config=profile("micro").replace(results_dir=tmp_path / "r", cache_dir=tmp_path / "c"),
        defenses=("none",),
        scenarios=(Scenario.III,),
        attack_models=("threshold",),
        seeds=(0,),
    )
    with pytest.raises(ConfigError, match=r"cannot connect to the Ray cluster at auto \(Could not find any running"):
        executor.run([UnitTask(spec, unit) for unit in spec.units()], SuiteReport(), Console(stderr=True))


def test_unit_failed_survives_the_trip_back_to_the_driver() -> None:
    part = SuiteReport(failed=[("none seed 0", "RuntimeError: boom")])
    again = pickle.loads(pickle.dumps(UnitFailed("RuntimeError: boom", part)))
    assert str(again) == "RuntimeError: boom" and again.report.failed == part.failed


def test_options_default_to_one_cpu_two_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executors, "import_ray", lambda: SimpleNamespace())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    executor = RayExecutor(ExecutorOptions())
    assert (executor.address, executor.cpus, executor.gpus, executor.retries, executor.threads) == (
        None,
        1.0,
        0.0,
        2,
        1,
    )
    assert RayExecutor(ExecutorOptions(cpus_per_unit=4, threads=None)).threads == 4
