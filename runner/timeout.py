"""A cell's timeout: a signal on the main thread, an asynchronous exception elsewhere."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .live import raise_in_thread


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the cell after ``seconds`` (0: no limit).

    On the main thread (flame-magic's runner) an interval timer's SIGALRM interrupts even a
    blocking call such as ``time.sleep``. Elsewhere (flamepy's runner calls cells on a gRPC
    worker thread, and signals reach only the main thread) a watchdog thread raises it
    asynchronously, which takes effect at the cell's next Python instruction; a cell blocked
    in one long C call for :data:`HARD_STOP_GRACE` seconds more has its process stopped.
    """
    if seconds <= 0:
        yield
        return
    message = (
        f"the cell ran longer than its {seconds:g} s timeout and was stopped "
        "(%%flmrun --timeout SECONDS, or %config FlameMagics.timeout)"
    )
    if threading.current_thread() is not threading.main_thread():
        with _watchdog(seconds, _timeout_error(message)):
            yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Seconds a cell that ignores its timeout on a worker thread gets before its process exits.
HARD_STOP_GRACE = 5.0


def _timeout_error(message: str) -> type[BaseException]:
    """A TimeoutError raised without arguments (as asynchronous exceptions are) that says ``message``."""

    class CellTimeout(TimeoutError):
        def __init__(self, *args: object) -> None:
            super().__init__(*(args or (message,)))

    # Shown, and mirrored in the notebook, as the builtin it is.
    CellTimeout.__module__ = "builtins"
    CellTimeout.__name__ = CellTimeout.__qualname__ = "TimeoutError"
    return CellTimeout


@contextmanager
def _watchdog(seconds: float, error: type[BaseException]) -> Iterator[None]:
    ident = threading.get_ident()
    lock = threading.Lock()
    done = threading.Event()
    state = {"running": True, "fired": False}

    def watch() -> None:
        if done.wait(seconds):
            return
        with lock:
            if not state["running"]:
                return
            state["fired"] = True
            raise_in_thread(ident, error)
        if done.wait(HARD_STOP_GRACE):
            return
        os.write(2, f"flame-magic: the cell ignored its {seconds:g} s timeout; exiting\n".encode())
        os._exit(3)

    threading.Thread(target=watch, name="flmrun-timeout", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            state["running"] = False
            if state["fired"]:
                raise_in_thread(ident, None)  # not raised yet: the cell ended first
        done.set()
