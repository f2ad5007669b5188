"""Wall time of a micro suite through the Ray executor relative to the local executor, on this machine.

    python -m benchmark.app.bench_executors                     # none,augment.all x seeds 0,1 on 2 CPUs
    python -m benchmark.app.bench_executors --cpus 4 --defenses none,augment.all,lora.r1 --seeds 0,1

Every suite is the same micro suite (scenario III, the threshold attack model), written
into a fresh results folder, on one cache warmed first, so that no run pays for
pretraining the base model or fine-tuning a target. The local executor runs the units
one after another in this process with `--threads` torch threads (1: two threads per unit
on a busy 2-core machine spin against each other, and Ray's units get one each); Ray runs
them as tasks of one CPU (and one thread) each on a Ray instance of `--cpus` CPUs started here. Ray is timed twice: from
a cold start (the instance starts, then each worker starts and imports the benchmark),
which a one-off `python -m benchmark suite --executor ray` pays, and again on the now
warm instance, which is what a long suite pays per unit once the start is amortised.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from attacks.scenarios import Scenario
from benchmark.app.config import profile
from benchmark.app.executors import ExecutorOptions, LocalExecutor, RayExecutor, import_ray
from benchmark.app.suite import Executor, SuiteSpec, run_suite


@dataclass(frozen=True)
class ExecutorTimes:
    """Wall seconds of one suite per executor, and Ray's ratios to the local executor's."""

    local_s: float
    ray_start_s: float
    ray_cold_s: float
    ray_warm_s: float
    units: int
    cpus: int
    threads: int

    @property
    def cold_ratio(self) -> float:
        """Ray from nothing (instance start included) over local."""
        return (self.ray_start_s + self.ray_cold_s) / self.local_s

    @property
    def warm_ratio(self) -> float:
        """Ray on a started instance whose workers have imported the benchmark, over local."""
        return self.ray_warm_s / self.local_s

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "cold_ratio": self.cold_ratio, "warm_ratio": self.warm_ratio}


def measure(
    *,
    defenses: Sequence[str] = ("none", "augment.all"),
    seeds: Sequence[int] = (0, 1),
    cpus: int = 2,
    threads: int = 1,
) -> ExecutorTimes:
    """Time the micro suite of `defenses` x `seeds` with each executor, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench-executors-") as scratch:
        root = Path(scratch)
        config = profile("micro").replace(cache_dir=root / "cache")
        spec = SuiteSpec(
            config=config,
            defenses=tuple(defenses),
            scenarios=(Scenario.III,),
            attack_models=("threshold",),
            seeds=tuple(seeds),
        )
        quiet = Console(quiet=True)

        def wall(results: str, executor: Executor) -> float:
            run = dataclasses.replace(spec, config=config.replace(results_dir=root / results))
            report = run_suite(run, console=quiet, show_progress=False, executor=executor)
            if report.failed or len(report.written) != len(spec.units()):
                raise RuntimeError(f"the {results} suite did not write every cell: {report.failed}")
            return report.wall_seconds

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            wall("warm-up", LocalExecutor(ExecutorOptions()))  # fills the cache; not timed
            local_s = wall("local", LocalExecutor(ExecutorOptions()))
        finally:
            torch.set_num_threads(previous_threads)

        ray = import_ray()
        start = time.perf_counter()
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
        )
        ray_start_s = time.perf_counter() - start
        try:
            executor = RayExecutor(ExecutorOptions(ray_address="local", cpus_per_unit=1))
            ray_cold_s = wall("ray-cold", executor)
            ray_warm_s = wall("ray-warm", executor)
        finally:
            ray.shutdown()
    return ExecutorTimes(
        local_s=local_s,
        ray_start_s=ray_start_s,
        ray_cold_s=ray_cold_s,
        ray_warm_s=ray_warm_s,
        units=len(spec.units()),
        cpus=cpus,
        threads=threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.app.bench_executors", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--defenses", default="none,augment.all", help="comma list (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1", help="comma list (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local run (default: %(default)s)")
    args = parser.parse_args(argv)
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    times = measure(defenses=defenses, seeds=seeds, cpus=args.cpus, threads=args.threads)
    print(
        f"micro suite, {times.units} unit(s) ({','.join(defenses)} x seeds {','.join(map(str, seeds))}), "
        f"{times.cpus} CPUs: local {times.local_s:.1f} s ({times.threads} thread(s)); Ray from a cold start "
        f"{times.ray_start_s + times.ray_cold_s:.1f} s (instance {times.ray_start_s:.1f} s + suite "
        f"{times.ray_cold_s:.1f} s), {times.cold_ratio:.2f}x; Ray on a warm instance {times.ray_warm_s:.1f} s, "
        f"{times.warm_ratio:.2f}x (target: within 1.3x)"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
