"""Interrupts tell the truth and leave nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmark.app.runner as runner
from benchmark.app import stages
from benchmark.app.cli import main
from benchmark.kernel import leftovers
from benchmark.kernel.cache import cached
from benchmark.kernel.interrupts import Interrupted, interrupted, raise_if_interrupted, watch_interrupts

REPO = Path(__file__).resolve().parents[1]


def _micro_args(micro_run, results: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """A micro run on a copy of the session's cache: other tests count what that cache holds."""
    cache = results.parent / "cache"
    shutil.copytree(micro_run.cache_dir, cache)
    return ["run", "--profile", "micro", "--results-dir", str(results), "--cache-dir", str(cache)]


def test_an_interrupted_matrix_says_which_records_it_kept(
    micro_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """Interrupted while the second scenario's record is written: the first is kept, and said to be."""
    original = runner.write_record
    calls = []

    def write_then_interrupt(record, results_dir):  # type: ignore[no-untyped-def]
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(record, results_dir)

    monkeypatch.setattr(runner, "write_record", write_then_interrupt)
    results = tmp_path / "results"
    code = main([*_micro_args(micro_run, results), "--scenario", "III,IV", "--quiet"])
    err = capsys.readouterr().err
    assert code == 130
    [kept] = sorted(results.rglob("*.json"))
    assert "kept 1 finished record(s)" in err and kept.name in err.replace("\n", "")
    assert "no result was written" not in err and "Traceback" not in err


def test_an_interrupt_before_any_record_says_nothing_was_written(
    micro_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "score_queries", interrupt)
    results = tmp_path / "results"
    assert main([*_micro_args(micro_run, results), "--quiet"]) == 130
    assert "no result was written" in capsys.readouterr().err
    assert not list(results.rglob("*.json"))


def test_an_interrupt_a_library_swallows_still_stops_the_run(
    micro_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """SIGINT raised inside a callback that catches everything: the next stage boundary raises it again."""
    original = stages.attack_encoder
    swallowed = []

    def swallowing(ctx):  # type: ignore[no-untyped-def]
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here and raises
        except KeyboardInterrupt:
            swallowed.append(True)  # what a careless library callback does
        return original(ctx)

    monkeypatch.setattr(stages, "attack_encoder", swallowing)
    results = tmp_path / "results"
    assert main([*_micro_args(micro_run, results), "--quiet"]) == 130
    assert swallowed == [True]
    assert not list(results.rglob("*.json")), "the run stopped at the next stage instead of finishing"
    assert "Traceback" not in capsys.readouterr().err


def test_watch_interrupts_remembers_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGINT)
    with watch_interrupts():
        assert not interrupted()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert interrupted()
        with pytest.raises(Interrupted):
            raise_if_interrupted()
    assert signal.getsignal(signal.SIGINT) is before
    assert not interrupted(), "the memory ends with its watch"
    raise_if_interrupted()  # outside a watch, an old interrupt stops nothing


def test_ctrl_c_while_starting_prints_no_traceback() -> None:
    """The imports take seconds; an interrupt then must not dump an import traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "list"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A user's Ctrl-C meets the default disposition; a test run started in the background by a
        # non-interactive shell would otherwise hand the child an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Past the interpreter's own start-up, inside the project's imports (which take seconds).
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the interrupt arrived after `list` finished; the machine is faster than this test assumes")
    # 130, or death by SIGINT (what a shell also reports as 130): CPython re-raises the signal at exit
    # when the interrupt also landed in code that could not handle it (an import's cleanup), a race.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err and "interrupted" in err


# --- leftovers of killed processes ----------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_only_abandoned_temporaries(tmp_path: Path) -> None:
    host = leftovers._host()
    dead = _dead_pid()
    mine = tmp_path / f".tmp-{host}-{os.getpid()}-abc.json"
    abandoned = tmp_path / "scenes" / f".tmp-{host}-{dead}-abc.json"
    abandoned_dir = tmp_path / f".tmp-{host}-{dead}-dir"
    foreign_recent = tmp_path / ".tmp-otherhost-12-abc.json"
    foreign_old = tmp_path / ".tmp-otherhost-13-abc.json"
    unrelated = tmp_path / ".tmp-probe-not-ours.json"
    record = tmp_path / "scenes" / "record.json"
    abandoned.parent.mkdir()
    for path in (mine, abandoned, foreign_recent, foreign_old, unrelated, record):
        path.write_text("{}")
    abandoned_dir.mkdir()
    (abandoned_dir / "half.bin").write_bytes(b"x")
    old = time.time() - leftovers.FOREIGN_AGE_S - 60
    os.utime(foreign_old, (old, old))

    removed = leftovers.sweep(tmp_path, "tmp", recursive=True)
    assert sorted(removed) == sorted([abandoned, abandoned_dir, foreign_old])
    for path in (mine, foreign_recent, unrelated, record):
        assert path.exists(), path


def test_a_killed_build_leaves_a_staging_folder_that_the_next_build_removes(tmp_path: Path) -> None:
    """SIGKILL skips every `finally`: the staging folder stays until the next start sweeps it."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from benchmark.kernel.cache import cached\n"
        "def build(folder):\n"
        "    (folder / 'half.bin').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "cached(Path(sys.argv[1]), 'thing', {'a': 1}, build, lambda f: None)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, timeout=120, check=False)
    kind = tmp_path / "thing"
    assert [p.name.startswith(".stage-") for p in kind.iterdir()] == [True], "the killed build left its staging"

    def build(folder: Path) -> None:
        (folder / "data.txt").write_text("ok")

    value, hit, entry = cached(tmp_path, "thing", {"a": 1}, build, lambda f: (f / "data.txt").read_text())
    assert (value, hit) == ("ok", False)
    assert [p.name for p in kind.iterdir()] == [entry.name]


def test_a_run_sweeps_temporary_records_of_dead_writers(micro_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = tmp_path / "results"
    stale = results / "scenes" / "III" / "none" / f".tmp-{leftovers._host()}-{_dead_pid()}-x.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{half")
    runner.run(micro_run.config.replace(results_dir=results, cache_dir=tmp_path / "cache"), show_progress=False)
    assert not stale.exists()
    assert len(list(results.rglob("*.json"))) == 1
