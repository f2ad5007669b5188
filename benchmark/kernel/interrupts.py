"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside a
finaliser, a weakref callback or some C extensions' callbacks it is printed as
"Exception ignored" and dropped, and the program carries on as if nothing had
happened. While `watch_interrupts()` is active, SIGINT is also remembered, and
the stage boundaries call `raise_if_interrupted()`, so a swallowed interrupt
surfaces at the next stage at the latest and the command still exits 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_PENDING = threading.Event()


class Interrupted(KeyboardInterrupt):
    """An interrupt that was received earlier and surfaced at a stage boundary."""


def _remember_and_raise(signum: int, frame: FrameType | None) -> None:
    _PENDING.set()
    raise KeyboardInterrupt


@contextmanager
def watch_interrupts() -> Iterator[None]:
    """Remember every SIGINT received inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _PENDING.clear()
    previous = signal.signal(signal.SIGINT, _remember_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        # The memory belongs to this watch: later work outside it must not stop for an old interrupt.
        _PENDING.clear()


def interrupted() -> bool:
    """Whether a SIGINT arrived while `watch_interrupts` was active."""
    return _PENDING.is_set()


def raise_if_interrupted() -> None:
    """Raise the interrupt again if one arrived and something swallowed it."""
    if _PENDING.is_set():
        raise Interrupted("interrupted")
