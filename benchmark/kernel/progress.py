"""Stage timing and rich progress bars for long work."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from benchmark.kernel.interrupts import raise_if_interrupted

Advance = Callable[[int], None]


class StageTimer:
    """Times named stages and shows one progress bar per stage."""

    def __init__(self, console: Console | None = None, *, show: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.timings: dict[str, float] = {}
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not show,
        )

    def __enter__(self) -> StageTimer:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        # Stage boundaries are where an interrupt that a library swallowed surfaces again.
        raise_if_interrupted()
        task = self._progress.add_task(name, total=total, info="")
        start = time.perf_counter()

        def advance(steps: int = 1, *, info: str = "", total: int | None = None) -> None:
            if total is not None:
                self._progress.update(task, total=total)
            self._progress.update(task, advance=steps, info=info)
            raise_if_interrupted()

        try:
            yield advance
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            if self._progress.tasks[task].total is None:
                self._progress.update(task, total=1, completed=1)
            else:
                self._progress.update(task, completed=self._progress.tasks[task].total)
        raise_if_interrupted()
