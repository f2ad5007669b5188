"""Grid runs: every defense preset x scenario x attack model x seed, resumable and safe to run twice at once.

A suite is a list of units, one per (defense, seed): each unit fine-tunes one
target (and its shadows) and runs `run_matrix` over the unit's missing cells.
A cell is done when the results folder holds a valid record whose configuration
matches the cell's; a resumed suite skips it. Each unit holds an exclusive
`flock` on a lock file in the results folder while it runs, so two suites on one
folder split the units between them instead of both doing (and writing) the same
cells; the kernel drops the lock when a process dies, so a crash leaves no stale lock.
An executor (`benchmark.app.executors`: this process, or Ray tasks) decides where
units run; each runs a unit through `UnitTask`, so the rules above hold everywhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from attacks.families import DEFAULT_FAMILY
from attacks.scenarios import Scenario
from benchmark.app import runner
from benchmark.app.config import RunConfig, upgrade_config_dict
from benchmark.kernel.cache import cache_key, check_cache_dir
from benchmark.kernel.errors import ConfigError
from benchmark.pipeline.records import RecordError, check_writable, read_record, record_files

LOCK_DIR = ".locks"
# Where a record's configuration may differ from the cell's without making it another cell:
# where outputs go, and where and with how much memory it was computed (a cell done on a GPU is done).
_NOT_PART_OF_A_CELL = ("results_dir", "cache_dir", "device", "gradient_checkpointing")


@dataclass(frozen=True)
class SuiteSpec:
    """What a suite runs: the cross product of these lists on one base configuration."""

    config: RunConfig
    defenses: tuple[str, ...]
    scenarios: tuple[Scenario, ...]
    attack_models: tuple[str, ...]
    seeds: tuple[int, ...]

    def units(self, *, devices_here: bool = True) -> list[RunConfig]:
        """One validated configuration per (defense, seed); scenario and attack model are the first cell's.

        `devices_here`: False when the units run on other machines, whose devices this one cannot check.
        """
        return [
            self.config.replace(
                defense=d, seed=s, scenario=self.scenarios[0], attack_model=self.attack_models[0]
            ).validate(devices_here=devices_here)
            for d in self.defenses
            for s in self.seeds
        ]

    def cells(self, unit: RunConfig) -> list[RunConfig]:
        return [unit.replace(scenario=sc, attack_model=a) for sc in self.scenarios for a in self.attack_models]


@dataclass
class SuiteReport:
    """What a suite did: cells written, skipped as already done, failures, time per stage and unit."""

    written: list[Path] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    unit_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    # Units an executor ran more than once (a Ray task that failed or whose worker died): label -> retries.
    retries: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": [str(p) for p in self.written],
            "skipped": self.skipped,
            "failed": [{"unit": u, "error": e} for u, e in self.failed],
            "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
            "unit_seconds": {k: round(v, 1) for k, v in self.unit_seconds.items()},
            "wall_seconds": round(self.wall_seconds, 1),
            "retries": dict(self.retries),
        }

    def merge(self, part: SuiteReport) -> None:
        """Add one unit's report (its wall time is the suite's, not summed)."""
        self.written.extend(part.written)
        self.skipped += part.skipped
        self.failed.extend(part.failed)
        for stage, seconds in part.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.unit_seconds.update(part.unit_seconds)
        self.retries.update(part.retries)


def cell_key(config: RunConfig | dict[str, Any]) -> str:
    """Identity of a cell: its whole configuration except where results and caches live.

    A stored configuration is read under today's setting names, so a record written
    before a rename (`preset` -> `profile`) still marks its cell as done.
    """
    data = config.to_dict() if isinstance(config, RunConfig) else upgrade_config_dict(config)
    for name in _NOT_PART_OF_A_CELL:
        data.pop(name, None)
    # The attack family is part of a cell; records written before families existed are
    # Pang & Wang's attack, and the default family keeps the key those records have.
    if data.get("attack", DEFAULT_FAMILY) == DEFAULT_FAMILY and not data.get("attack_args"):
        data.pop("attack", None)
        data.pop("attack_args", None)
    # JSON round trip: tuples and lists, paths and strings compare equal, as they do in a record.
    return cache_key(json.loads(json.dumps(data, default=str)))


def finished_cells(results_dir: Path) -> set[str]:
    """Keys of the cells that have a valid record under `results_dir` (invalid files do not count).

    Files are read by `read_record`, which refuses without blocking anything but a
    regular file within `MAX_RECORD_BYTES` whose figures follow from its own scores:
    a FIFO, a link to a device, an oversized, nested, forged or foreign file never
    marks a cell done, so that cell is run again.
    """
    done: set[str] = set()
    if not Path(results_dir).is_dir():
        return done
    # Plain and compacted records alike: a compacted reference folder still marks its cells done.
    for path in record_files(Path(results_dir)):
        try:
            stat = path.stat()
        except OSError:
            continue
        # Records are never rewritten in place, so (size, mtime) names a validated file:
        # a waiting suite re-reads the folder often and need not re-validate every record.
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in _VALIDATED:
            try:
                _VALIDATED[memo] = cell_key(read_record(path).config)
            except (RecordError, ConfigError, KeyError, TypeError, ValueError):
                # Not a record of a cell (ValueError and friends: a configuration no cell can have).
                _VALIDATED[memo] = None
        key = _VALIDATED[memo]
        if key is not None:
            done.add(key)
    return done


_VALIDATED: dict[tuple[str, int, int], str | None] = {}


@contextmanager
def unit_lock(results_dir: Path, unit: RunConfig, *, wait: bool) -> Iterator[bool]:
    """Hold the unit's lock; yields False (without waiting) when another process holds it and `wait` is off."""
    name = cache_key({"defense": unit.defense, "seed": unit.seed, "cell": cell_key(unit)})
    path = Path(results_dir) / LOCK_DIR / f"{name}.lock"
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {unit.defense} seed {unit.seed}\n".encode())
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file's descriptor; damaged lock state (a folder or a file in the way) is a clear error.

    Lock files hold no state worth keeping (the kernel holds the lock itself), so the fix is always to remove them.

    Raises:
        ConfigError: naming the path and the fix.
    """
    fix = f"remove {path.parent} (lock files are recreated; make sure no other suite uses this --results-dir)"
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"suite lock folder {path.parent} is not a folder; {fix}")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise ConfigError(f"suite lock {path} is not a regular file; {fix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError(f"suite lock {path} cannot be opened ({exc.strerror or exc}); {fix}") from None


@dataclass(frozen=True)
class UnitTask:
    """One unit as an executor schedules it: plain data, so that a Ray task can carry it to another node.

    Every executor runs a unit through this one call of `_run_unit` (its lock, the
    check of its missing cells, `run_matrix`): there is no second code path for a cluster.
    """

    spec: SuiteSpec
    unit: RunConfig
    show_progress: bool = True
    # None: `runner.run_matrix`, looked up where the task runs (tests pass a stand-in).
    run_matrix: Callable[..., list[Any]] | None = None

    @property
    def label(self) -> str:
        return _label(self.unit)

    def __call__(self, *, wait: bool, console: Console) -> SuiteReport | None:
        """Run the unit's missing cells under its lock.

        Args:
            wait: wait for the lock when another suite holds it; otherwise return None at once.
            console: where the unit's progress goes.

        Returns:
            What this unit did, or None when another suite holds it and `wait` is off.

        Raises:
            ConfigError: damaged lock state, or a bad cell (checked before its training).
        """
        report = SuiteReport()
        run_matrix = self.run_matrix or runner.run_matrix
        if not _run_unit(self.spec, self.unit, report, console, self.show_progress, run_matrix, wait=wait):
            return None
        return report


class Executor(Protocol):
    """Runs a suite's units; `benchmark.app.executors` registers them (local, ray)."""

    def run(self, units: Sequence[UnitTask], report: SuiteReport, console: Console) -> None:
        """Run every unit and merge what each did into `report`; a failed unit is reported there, not raised."""
        ...


def run_suite(
    spec: SuiteSpec,
    *,
    console: Console | None = None,
    show_progress: bool = True,
    run_matrix: Callable[..., list[Any]] | None = None,
    executor: Executor | None = None,
) -> SuiteReport:
    """Run every missing cell of `spec`; a failing unit is reported and the suite goes on.

    Args:
        run_matrix: stands in for `runner.run_matrix` (tests).
        executor: where the units run (`benchmark.app.executors.build_executor`); default: one after
            another in this process (`run_locally`).

    Raises:
        ConfigError: a bad unit (checked for all units before anything runs) or an unwritable folder.
    """
    console = console or Console(stderr=True)
    units = spec.units(devices_here=getattr(executor, "devices_here", True))
    check_writable(spec.config.results_dir)
    check_cache_dir(spec.config.cache_path)
    tasks = [UnitTask(spec, unit, show_progress=show_progress, run_matrix=run_matrix) for unit in units]
    report = SuiteReport()
    start = time.perf_counter()
    if executor is None:
        run_locally(tasks, report, console)
    else:
        executor.run(tasks, report, console)
    report.wall_seconds = time.perf_counter() - start
    return report


def run_locally(units: Sequence[UnitTask], report: SuiteReport, console: Console) -> None:
    """The local executor: each unit in this process, one after another.

    Units another suite is running are passed over first, then waited for: when
    their lock frees, whatever that suite did not finish is run here.
    """
    pending: list[UnitTask] = []
    for task in units:
        part = task(wait=False, console=console)
        if part is None:
            pending.append(task)
        else:
            report.merge(part)
    for task in pending:
        console.print(f"[yellow]waiting[/] for another suite running {task.label}")
        part = task(wait=True, console=console)
        assert part is not None  # a unit that waits for its lock always runs
        report.merge(part)


def _label(unit: RunConfig) -> str:
    return f"{unit.defense} seed {unit.seed}"


def _run_unit(
    spec: SuiteSpec,
    unit: RunConfig,
    report: SuiteReport,
    console: Console,
    show_progress: bool,
    run_matrix: Callable[..., list[Any]],
    *,
    wait: bool,
) -> bool:
    """Run the unit's missing cells under its lock; False if another suite holds it and `wait` is off."""
    results_dir = spec.config.results_dir
    with unit_lock(results_dir, unit, wait=wait) as held:
        if not held:
            return False
        # Read under the lock: another suite may have finished cells of this unit meanwhile.
        done = finished_cells(results_dir)
        missing = [c for c in spec.cells(unit) if cell_key(c) not in done]
        report.skipped += len(spec.cells(unit)) - len(missing)
        if not missing:
            return True
        console.rule(f"{_label(unit)}: {len(missing)} cell(s) to run")
        unit_start = time.perf_counter()
        try:
            for scenarios, attack_models in _groups(missing):
                outcomes = run_matrix(
                    unit,
                    scenarios=scenarios,
                    attack_models=attack_models,
                    console=console,
                    show_progress=show_progress,
                )
                report.written.extend(o.path for o in outcomes)
                _add_stage_seconds(report.stage_seconds, [o.record for o in outcomes])
        except ConfigError:
            raise
        except Exception as exc:  # one unit's failure must not lose the rest of the suite
            report.failed.append((_label(unit), f"{type(exc).__name__}: {exc}"))
            console.print(f"[red]failed:[/] {_label(unit)}: {type(exc).__name__}: {exc}")
        report.unit_seconds[_label(unit)] = time.perf_counter() - unit_start
    return True


def _groups(missing: Sequence[RunConfig]) -> list[tuple[tuple[Scenario, ...], tuple[str, ...]]]:
    """Missing cells as (scenarios, attack models) products: scenarios missing the same attack models go together."""
    by_scenario: dict[Scenario, list[str]] = {}
    for cell in missing:
        by_scenario.setdefault(cell.scenario, []).append(cell.attack_model)
    groups: dict[tuple[str, ...], list[Scenario]] = {}
    for scenario, models in by_scenario.items():
        groups.setdefault(tuple(models), []).append(scenario)
    return [(tuple(scenarios), models) for models, scenarios in groups.items()]


def _add_stage_seconds(totals: dict[str, float], records: Sequence[Any]) -> None:
    """Stage times of one matrix call, each counted once.

    Records of one call repeat its shared stages; records of one scenario repeat
    that scenario's own stages.
    """
    seen_scenarios: set[str] = set()
    shared: dict[str, float] | None = None
    for record in records:
        timings = dict(record.timings_s)
        if shared is None:
            shared = {k: v for k, v in timings.items() if not _scenario_stage(k)}
            for k, v in shared.items():
                totals[k] = totals.get(k, 0.0) + v
        if record.scenario in seen_scenarios:
            continue
        seen_scenarios.add(record.scenario)
        for k, v in timings.items():
            if _scenario_stage(k):
                totals[k] = totals.get(k, 0.0) + v


def _scenario_stage(name: str) -> bool:
    return name.startswith(("fine-tune shadow", "captioner", "captioning", "attack:"))
