"""Stage timing, with rich progress bars on a terminal and plain log lines elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from benchmark.kernel.compute import current as current_compute
from benchmark.kernel.interrupts import raise_if_interrupted

Advance = Callable[[int], None]

# Without a terminal, a long stage also logs how far it is, at most this often (seconds).
LOG_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class StageTimer:
    """Times named stages and shows how far each one is.

    On a terminal each stage gets a rich progress bar. Anywhere else (a log file, a
    cluster job's output) a bar would be noise or nothing, so each stage writes one
    plain line when it starts and one when it ends, with the time since the timer
    started and, for stages that know their size, the estimated time left; a long
    stage adds a line at most every `LOG_EVERY_S` seconds.
    """

    def __init__(self, console: Console | None = None, *, show: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.timings: dict[str, float] = {}
        # Peak accelerator memory per stage (MB); stays empty on the CPU.
        self.memory_mb: dict[str, float] = {}
        self._log_lines = show and not self.console.is_terminal
        self._started = time.perf_counter()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not show or self._log_lines,
        )

    def __enter__(self) -> StageTimer:
        self._started = time.perf_counter()
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def _log(self, text: str) -> None:
        if self._log_lines:
            elapsed = _duration(time.perf_counter() - self._started)
            self.console.print(f"[stage] {text} (elapsed {elapsed})", markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        # Stage boundaries are where an interrupt that a library swallowed surfaces again.
        raise_if_interrupted()
        task = self._progress.add_task(name, total=total, info="")
        compute = current_compute()
        compute.reset_peak_memory()
        start = time.perf_counter()
        last_log = start
        self._log(f"{name}: started" + (f", {total} steps" if total else ""))

        def advance(steps: int = 1, *, info: str = "", total: int | None = None) -> None:
            nonlocal last_log
            if total is not None:
                self._progress.update(task, total=total)
            self._progress.update(task, advance=steps, info=info)
            now = time.perf_counter()
            if self._log_lines and now - last_log >= LOG_EVERY_S:
                last_log = now
                state = self._progress.tasks[task]
                done, size = state.completed, state.total
                text = f"{name}: {done:g}" + (f"/{size:g}" if size else "") + f" after {_duration(now - start)}"
                if size and 0 < done < size:
                    text += f", about {_duration((now - start) * (size - done) / done)} left"
                self._log(text)
            raise_if_interrupted()

        finished = False
        try:
            yield advance
            finished = True
        finally:
            took = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + took
            peak = compute.peak_memory_mb()
            if peak is not None:
                self.memory_mb[name] = max(peak, self.memory_mb.get(name, 0.0))
            if self._progress.tasks[task].total is None:
                self._progress.update(task, total=1, completed=1)
            else:
                self._progress.update(task, completed=self._progress.tasks[task].total)
            self._log(f"{name}: {'done in' if finished else 'stopped after'} {_duration(took)}")
        raise_if_interrupted()
