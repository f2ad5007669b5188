"""Where a suite's units run: `local` (this process, one after another; the default) or `ray` (a Ray task each).

Every executor runs a unit through `benchmark.app.suite.UnitTask`, the one call of
`_run_unit` (the unit's lock, the check of its missing cells under that lock,
`run_matrix`); an executor only decides where and when. Exactly-once therefore holds
on a cluster as it does for two suites on one machine: the cell keys and the per-unit
`flock` locks live in the results folder, which every Ray node must share (and the
cache folder with it), and records are written atomically, so a worker killed mid-unit
leaves whole records or none, and its retry runs only the cells still missing.

    python -m benchmark suite --defenses none,dpsgd.eps8 --seeds 0,1,2 --executor ray
    python -m benchmark suite --executor ray --ray-address 10.0.0.5:6379 --gpus-per-unit 1 --cpus-per-unit 4

docs/cluster.md says how to set up the cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from benchmark.app.suite import Executor, SuiteReport, SuiteSpec, UnitTask, cell_key, finished_cells, run_locally
from benchmark.kernel.errors import ConfigError
from benchmark.kernel.registry import Registry, RegistryError

EXECUTORS: Registry[Callable[[ExecutorOptions], Executor]] = Registry("executor")
register_executor = EXECUTORS.register

DEFAULT_EXECUTOR = "local"
RAY_INSTALL = 'pip install -e ".[ray]"'
DEFAULT_UNIT_RETRIES = 2
# Long enough for a head across a data-centre network, short enough that a wrong address fails at once.
CONNECT_TIMEOUT_S = 3.0
# The flags only a cluster executor reads, by option name: the local executor refuses them.
CLUSTER_FLAGS = {
    "ray_address": "--ray-address",
    "cpus_per_unit": "--cpus-per-unit",
    "gpus_per_unit": "--gpus-per-unit",
    "unit_retries": "--unit-retries",
}


@dataclass(frozen=True)
class ExecutorOptions:
    """How the suite's units are spread, from its flags; None is a flag not given."""

    ray_address: str | None = None
    cpus_per_unit: float | None = None
    gpus_per_unit: float | None = None
    unit_retries: int | None = None
    # Torch threads of each unit's process (the local executor's are the CLI's own).
    threads: int | None = None

    def check(self) -> None:
        """Numbers in range, before any executor is built.

        Raises:
            ConfigError: naming the flag and what it accepts.
        """
        for name in ("cpus_per_unit", "gpus_per_unit"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{CLUSTER_FLAGS[name]} must be a number >= 0, got {value:g}")
        # Ray splits one GPU between tasks, but never hands out a fraction of several.
        if self.gpus_per_unit is not None and self.gpus_per_unit > 1 and not self.gpus_per_unit.is_integer():
            raise ConfigError(
                f"--gpus-per-unit must be a fraction of one GPU or a whole number, got {self.gpus_per_unit:g}"
            )
        if self.unit_retries is not None and self.unit_retries < 0:
            raise ConfigError(f"--unit-retries must be >= 0, got {self.unit_retries}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")


def build_executor(name: str, options: ExecutorOptions | None = None) -> Executor:
    """The executor registered as `name`, with every check that can fail made now, before any unit runs.

    Raises:
        ConfigError: an unknown executor, a bad number, a flag the executor does not take,
            Ray not installed, or a Ray address where nothing answers.
    """
    options = options or ExecutorOptions()
    try:
        factory = EXECUTORS.get(name)
    except RegistryError as exc:
        raise ConfigError(f"--executor: {exc}") from None
    options.check()
    return factory(options)


@register_executor("local")
class LocalExecutor:
    """Each unit in this process, one after another; units another suite holds are waited for last."""

    devices_here = True

    def __init__(self, options: ExecutorOptions) -> None:
        given = [flag for name, flag in CLUSTER_FLAGS.items() if getattr(options, name) is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} need(s) --executor ray (the local executor runs every unit in this process); "
                "add --executor ray or drop them"
            )

    def run(self, units: Sequence[UnitTask], report: SuiteReport, console: Console) -> None:
        run_locally(units, report, console)


class UnitFailed(Exception):
    """Raised by a Ray task whose unit failed, so that Ray retries it; carries what the attempt did."""

    def __init__(self, message: str, report: SuiteReport) -> None:
        # Both in args: an exception is pickled back to the driver as cls(*args).
        super().__init__(message, report)
        self.report = report

    def __str__(self) -> str:
        return str(self.args[0])


@register_executor("ray")
class RayExecutor:
    """Each (defense, seed) unit as a Ray task with its own CPUs and GPUs, retried when it fails or its worker dies.

    Without an address (--ray-address or $RAY_ADDRESS) it starts a Ray instance on this
    machine for the suite and stops it at the end; with one, it joins that cluster.
    """

    def __init__(self, options: ExecutorOptions) -> None:
        self.ray = import_ray()
        self.address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
        if self.address is not None:
            check_reachable(self.address)
        # On a cluster the GPUs are the workers', not the driver's: each worker checks --device where it runs.
        self.devices_here = self.address is None
        self.cpus = 1.0 if options.cpus_per_unit is None else float(options.cpus_per_unit)
        self.gpus = 0.0 if options.gpus_per_unit is None else float(options.gpus_per_unit)
        self.retries = DEFAULT_UNIT_RETRIES if options.unit_retries is None else options.unit_retries
        # Torch's default is one thread per core of the node: units sharing a node would fight over them.
        self.threads = options.threads or max(1, int(self.cpus))

    def run(self, units: Sequence[UnitTask], report: SuiteReport, console: Console) -> None:
        if not units:
            return
        # A worker has neither this process's working folder nor its BENCHMARK_CACHE_DIR.
        tasks = [dataclasses.replace(task, spec=anchored(task.spec)) for task in units]
        check_input_paths(tasks[0].spec.config)
        tasks = _unfinished(tasks, report, console)
        if not tasks:
            return
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            self._connect()
        try:
            self._check_resources()
            self._dispatch(tasks, report, console)
        finally:
            if started_here:
                ray.shutdown()

    def _connect(self) -> None:
        """Join the cluster at the address, or start a local instance (without a dashboard: seconds sooner).

        Raises:
            ConfigError: the cluster refused or did not answer.
        """
        ray = self.ray
        where = self.address or "local"
        extra: dict[str, Any] = {} if self.address else {"include_dashboard": False}
        try:
            ray.init(address=where, logging_level=logging.WARNING, **extra)
        except (ConnectionError, TimeoutError) as exc:
            # Ray's own message names the address, not why: that is further down the chain.
            if "InvalidAuthToken" in _chain(exc):
                raise ConfigError(
                    f"the Ray cluster at {where} wants its authentication token; run the suite with "
                    "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN "
                    "(docs/cluster.md)"
                ) from None
            raise ConfigError(
                f"cannot connect to the Ray cluster at {where} ({_first_line(exc)}); start its head with "
                "`ray start --head` or fix --ray-address"
            ) from None
        except RuntimeError as exc:  # e.g. a cluster of another Ray version than this one
            raise ConfigError(
                f"cannot use the Ray cluster at {where}: {_first_line(exc)}; where the message names two Ray "
                "versions, install the cluster's here"
            ) from None

    def _check_resources(self) -> None:
        """Some node can hold one unit: Ray would otherwise leave every task pending, silently, forever.

        Raises:
            ConfigError: naming the largest node and the flags to lower.
        """
        nodes = [node.get("Resources", {}) for node in self.ray.nodes() if node.get("Alive")]
        if any(n.get("CPU", 0.0) >= self.cpus and n.get("GPU", 0.0) >= self.gpus for n in nodes):
            return
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        raise ConfigError(
            f"no node of the Ray cluster has {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s) for one unit "
            f"(the largest has {largest.get('CPU', 0.0):g} CPU(s) and {largest.get('GPU', 0.0):g} GPU(s)); "
            "lower --cpus-per-unit / --gpus-per-unit or add such a node"
        )

    def _dispatch(self, tasks: Sequence[UnitTask], report: SuiteReport, console: Console) -> None:
        """Submit every unit at once; merge each unit's report as it finishes, with a progress line."""
        ray = self.ray
        attempts = _attempt_counter(ray)
        remote = ray.remote(run_unit_task)
        options = {
            "num_cpus": self.cpus,
            "num_gpus": self.gpus,
            "max_retries": self.retries,
            # A unit's failure (reported, not raised, by `_run_unit`) is raised as UnitFailed to be retried;
            # a ConfigError is not worth retrying.
            "retry_exceptions": [UnitFailed],
        }
        pending = {
            remote.options(name=f"unit {task.label}", **options).remote(task, attempts, self.threads): task
            for task in tasks
        }
        finished = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready[0])
                finished += 1
                part = self._outcome(ready[0], task)
                tries = _attempts_of(ray, attempts, task.label)
                if tries > 1:
                    part.retries[task.label] = tries - 1
                report.merge(part)
                console.print(_progress_line(finished, len(tasks), task.label, part, tries), soft_wrap=True)
        finally:
            # Only on an early exit (a ConfigError, Ctrl-C): no unit goes on writing once the suite has stopped,
            # even where this process lives on (a notebook) and its Ray job with it.
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # best effort: the job's end stops them too
                    pass

    def _outcome(self, ref: Any, task: UnitTask) -> SuiteReport:
        """The unit's report; a unit that failed on its last attempt is in its `failed`.

        Raises:
            ConfigError: the unit's configuration or lock state is bad (as the local executor raises it).
        """
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, UnitFailed):
                return cause.report
            if isinstance(cause, ConfigError):
                raise ConfigError(str(cause)) from None
            return SuiteReport(failed=[(task.label, f"{type(cause).__name__}: {_first_line(cause)}")])
        except ray.exceptions.RayError as exc:  # the worker or its node died on the last attempt, or out of memory
            return SuiteReport(failed=[(task.label, f"{type(exc).__name__}: {_first_line(exc)}")])


def _unfinished(tasks: Sequence[UnitTask], report: SuiteReport, console: Console) -> list[UnitTask]:
    """The units with a cell still missing; the others are counted as done.

    Only to spare a resumed suite a Ray task (and a worker's start) per finished unit:
    each task checks its missing cells again under the unit's lock, which is what counts.
    """
    done = finished_cells(tasks[0].spec.config.results_dir)
    unfinished = []
    for task in tasks:
        cells = task.spec.cells(task.unit)
        if all(cell_key(cell) in done for cell in cells):
            report.skipped += len(cells)
        else:
            unfinished.append(task)
    if len(unfinished) < len(tasks):
        console.print(f"{len(tasks) - len(unfinished)} of {len(tasks)} unit(s) already done")
    return unfinished


def run_unit_task(task: UnitTask, attempts: Any, threads: int) -> SuiteReport:
    """A Ray task's body: one unit, through the same call as the local executor's, waiting for its lock.

    Waiting (rather than passing over) because a task has nothing else to do: another
    suite holding the lock finishes what it can, and this task runs whatever is left.

    Raises:
        UnitFailed: the unit's cells failed, so that Ray retries the task.
    """
    try:
        import ray

        ray.get(attempts.start.remote(task.label))
    except Exception:  # counting attempts is for the report; the unit matters more
        pass
    torch.set_num_threads(threads)
    part = task(wait=True, console=Console(stderr=True))
    assert part is not None  # a unit that waits for its lock always runs
    if part.failed:
        raise UnitFailed(part.failed[0][1], part)
    return part


def import_ray() -> Any:
    """The `ray` module.

    Raises:
        ConfigError: Ray is not installed, naming the install command.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed here; run `{RAY_INSTALL}` "
            "(on every node of the cluster too)"
        ) from None
    return ray


def check_reachable(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Something answers at the address's host and port: `ray.init` would otherwise wait for a minute or more.

    `auto` and `local` name no host and are left to Ray.

    Raises:
        ConfigError: a malformed address, or nothing listening there.
    """
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")  # an IPv6 literal, [::1]:6379
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"--ray-address {address!r} is not HOST:PORT; give the head's address, e.g. 10.0.0.5:6379 "
            "(`ray start --head` prints it), ray://HOST:PORT or auto"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({why} within {timeout_s:g} s); "
            f"start one there with `ray start --head --port {port}` or fix the address"
        ) from None


def anchored(spec: SuiteSpec) -> SuiteSpec:
    """The suite with its results and cache folders as absolute paths, the same on every node.

    Neither is part of a cell (nor of a record), so the cells stay the same cells.
    """
    config = spec.config
    config = config.replace(
        results_dir=config.results_dir.expanduser().absolute(),
        cache_dir=config.cache_path.expanduser().absolute(),
    )
    return dataclasses.replace(spec, config=config)


def check_input_paths(config: Any, prefix: str = "") -> None:
    """Every input path is absolute: a worker would read a relative one from its own working folder.

    They cannot be made absolute here instead: an input path is part of its cell, so
    the records would no longer mark the cells of a local suite as done.

    Raises:
        ConfigError: naming the flag.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_input_paths(value, f"{prefix}{f.name}.")
        elif isinstance(value, Path) and not value.is_absolute():
            flag = "--" + (prefix + f.name).replace("_", "-")
            raise ConfigError(
                f"{flag} {value} is relative, and each Ray worker would read it from its own working folder; "
                "give an absolute path that names the same folder on every node"
            )


def _attempt_counter(ray: Any) -> Any:
    """An actor that counts each unit's attempts: Ray retries a task without telling the driver."""

    # Defined in here so that Ray ships the class by value: the actor's worker then starts
    # without importing this package (seconds of torch on a busy node).
    class AttemptCounter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def start(self, label: str) -> int:
            self.counts[label] = self.counts.get(label, 0) + 1
            return self.counts[label]

        def count(self, label: str) -> int:
            return self.counts.get(label, 0)

    return ray.remote(num_cpus=0)(AttemptCounter).remote()


def _attempts_of(ray: Any, attempts: Any, label: str) -> int:
    """How many times the unit was started (1 if the counter cannot say)."""
    try:
        return max(1, ray.get(attempts.count.remote(label), timeout=30))
    except Exception:  # the count only decorates the report
        return 1


def _progress_line(finished: int, total: int, label: str, part: SuiteReport, tries: int) -> str:
    after = f" after {tries} attempts" if tries > 1 else ""
    if part.failed:
        return f"[red]failed[/] {finished}/{total}: {escape(label)}{after}: {escape(part.failed[-1][1])}"
    done = f", {part.skipped} already done" if part.skipped else ""
    return f"done {finished}/{total}: {escape(label)}, {len(part.written)} cell(s) written{done}{after}"


def _chain(exc: BaseException) -> str:
    """The messages of an exception and of those it was raised from."""
    messages, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        messages.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return "\n".join(messages)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
