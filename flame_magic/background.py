"""Background cells: a cell that returns at once and delivers its result later.

The cell's task is created before its future is returned; a thread follows it and, when
it ends, hands it to a ``finish`` function (the magics present it there, in the cell that
started it: :func:`flame_magic.presentation.output_to`), whose return value or exception
becomes the future's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from flame_magic.client import FlameClient
from flame_magic.errors import FlameError, WaitStopped
from flame_magic.protocol import types

if TYPE_CHECKING:
    from flame_magic.live import LiveChannel


class CellFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A cell that runs in the background: a ``concurrent.futures.Future``, also awaitable.

    ``result(timeout)`` is what the cell gave (the magics: its last value; the engine: its
    :class:`~flame_magic.engine.Result`), or raises the cell's exception; ``await handle``
    waits without blocking the event loop. ``cancel()`` stops a cell that has not started;
    Flame cannot stop a task that runs, so a cell already running finishes on its runner,
    but nothing is shown or assigned.
    """

    def __init__(self, label: str, stop: Callable[[], None]) -> None:
        super().__init__()
        self.label = label
        self._stop = stop

    def running(self) -> bool:
        """Whether the cell has not finished yet (submitted cells count as running)."""
        return not self.done()

    def cancel(self) -> bool:
        """Stop the cell if it has not started; stop waiting for it otherwise.

        Returns False if the cell was already done (or its output is being shown).
        """
        if not super().cancel():
            return False
        self._stop()
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def _settle(self, value: Any = None, error: BaseException | None = None) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)

    def __repr__(self) -> str:
        if self.cancelled():
            state = "cancelled"
        elif not self.done():
            state = "running"
        elif self.exception() is not None:
            error = self.exception()
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
) -> CellFuture:
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

    handle = CellFuture(label, stop_waiting)

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
            if handle.set_running_or_notify_cancel():
                handle._settle(error=fail(exc))
            if close is not None:
                close()
            return
        if not handle.set_running_or_notify_cancel():
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
