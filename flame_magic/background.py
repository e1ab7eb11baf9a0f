"""Background cells: a %%flmrun cell that returns at once and delivers its output later.

The cell's task is created before the magic returns; a thread follows it and, when it
ends, hands it to a ``finish`` function (the magics' presentation), whose return value or
exception becomes the handle's. In a Jupyter kernel the output must land in the cell that
started it, not in whichever cell runs then: ipykernel routes output by the *parent*
message, which it keeps per thread (``set_thread_parent``), so the thread captures the
parent at submission and presents the output under it (:func:`output_to`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from flame_magic.client import FlameClient, FlameError, WaitStopped
from flame_magic.protocol import types

if TYPE_CHECKING:
    from flame_magic.remote import LiveChannel


def current_parent(shell: Any) -> Any:
    """The message of the cell now running (Jupyter), or None outside a kernel."""
    get_parent = getattr(shell, "get_parent", None)
    if get_parent is None or not hasattr(shell, "set_thread_parent"):
        return None
    try:
        return get_parent()
    except Exception:
        return None


@contextlib.contextmanager
def output_to(shell: Any, parent: Any) -> Iterator[None]:
    """Send what this thread prints and displays to the cell of ``parent`` (no-op outside a kernel)."""
    if not parent:
        yield
        return
    tokens = shell.set_thread_parent(parent)
    try:
        yield
    finally:
        # Buffered text is keyed by parent: flush it before the thread forgets it.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        shell.reset_thread_parent(tokens)


class BackgroundCell:
    """The handle of a ``%%flmrun --background`` cell, stored in a notebook variable.

    ``done()``, ``result(timeout)``, ``exception(timeout)`` and ``cancel()`` work as on a
    ``concurrent.futures.Future``; ``await handle`` waits without blocking the kernel.
    ``result()`` is the cell's last value, or raises the cell's exception.
    """

    def __init__(self, label: str, stop: Callable[[], None]) -> None:
        self.label = label
        self._stop = stop
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def done(self) -> bool:
        """Whether the cell finished, failed or was cancelled."""
        return self._future.done()

    def running(self) -> bool:
        return not self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def result(self, timeout: float | None = None) -> Any:
        """The cell's last value (None if it ends with a statement); raises its exception.

        Raises ``TimeoutError`` if it is not done within ``timeout`` seconds.
        """
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def cancel(self) -> bool:
        """Stop the cell if it has not started; stop waiting for it otherwise.

        Flame cannot stop a task that runs: a cell already running finishes on its runner,
        but its output is not shown and its names are not assigned. Returns False if the
        cell was already done.
        """
        if not self._future.cancel():
            return False  # done, or its output is being shown
        self._stop()
        return True

    def add_done_callback(self, fn: Callable[[BackgroundCell], Any]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self._future).__await__()

    def _settle(self, value: Any = None, error: BaseException | None = None) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            if error is not None:
                self._future.set_exception(error)
            else:
                self._future.set_result(value)

    def __repr__(self) -> str:
        if self._future.cancelled():
            state = "cancelled"
        elif not self._future.done():
            state = "running"
        elif self._future.exception() is not None:
            error = self._future.exception()
            state = f"failed: {type(error).__name__}: {error}"
        else:
            state = "done"
        return f"<flmrun background cell {self.label}: {state}>"


def follow(
    client: FlameClient,
    session_id: str,
    task_id: str,
    label: str,
    finish: Callable[[types.Task], Any],
    fail: Callable[[BaseException], BaseException],
    close: Callable[[], bool] | None = None,
    live: LiveChannel | None = None,
    pending: Callable[[], None] | None = None,
) -> BackgroundCell:
    """Follow a created task in a thread and return its handle.

    Parameters
    ----------
    client, session_id, task_id
        The task to follow.
    label
        How the handle names the cell.
    finish
        Called in the thread with the finished task: presents it and returns the cell's
        value, or raises its exception (both become the handle's).
    fail
        Called in the thread with a Flame error while waiting; returns the exception the
        handle raises (having shown it where it belongs).
    close
        Closes the cell's own session once the task ended (None: a shared session).
    live
        The cell's live channel: what it shows while it runs is shown as it comes.
    pending
        Called while the task waits to start (see ``FlameClient.wait_task``).
    """
    stop = threading.Event()

    def stop_waiting() -> None:
        stop.set()
        if close is not None:
            close()  # cancels the task if it has not started (refused if it runs)

    handle = BackgroundCell(label, stop_waiting)

    def run() -> None:
        try:
            task = client.wait_task(
                session_id, task_id, stop=stop, tick=live.poll if live else None, pending=pending
            )
            if live is not None:
                live.finish()  # the rest of what it streamed, before what came with its result
        except WaitStopped:
            if close is not None:
                _close_when_done(client, session_id, task_id, close)
            return
        except FlameError as exc:
            if handle._future.set_running_or_notify_cancel():
                handle._settle(error=fail(exc))
            if close is not None:
                close()
            return
        if not handle._future.set_running_or_notify_cancel():
            if close is not None:
                close()
            return  # cancelled meanwhile: show nothing, assign nothing
        value, error = None, None
        try:
            value = finish(task)
        except BaseException as exc:  # noqa: B036 - whatever the cell raised is the handle's
            error = exc
        # Closed only now: the result, and large values, are read from the session's objects.
        if close is not None:
            close()
        if error is not None:
            handle._settle(error=error)
        else:
            handle._settle(value)

    threading.Thread(target=run, name=f"flmrun-background-{label}", daemon=True).start()
    return handle


def _close_when_done(client: FlameClient, session_id: str, task_id: str, close: Callable[[], bool]) -> None:
    """After a cancel: Flame refuses to close while the task runs, so close once it ends."""
    if close():
        return
    with contextlib.suppress(FlameError):
        client.wait_task(session_id, task_id)
    close()
