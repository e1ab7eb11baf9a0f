"""Flame's ``Instance`` service for the runner, and the hand-off of cells to the main thread.

The service decodes what Flame's executor manager sends and encodes what it returns; it
is given the function that evaluates a cell and knows nothing of how that is done.
gRPC calls arrive on handler threads, but cells run on the main thread (signal handlers,
matplotlib and many GUI or C libraries insist on it): :class:`MainThread` is the queue
between them. Flame sends one task at a time, so the queue never holds more than one cell.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from flame_magic import codec
from flame_magic.protocol import InstanceServicer, cell, instance, types

log = logging.getLogger("flame_magic.runner")

T = TypeVar("T")
R = TypeVar("R")

# Flame records a failed task's message as an event: keep it to a readable line.
MESSAGE_LIMIT = 2000

_NOT_OURS = (
    " flame-magic's runner only runs cells sent by %%flmrun from a notebook with the same "
    "flame-magic version."
)


class RunnerStopped(RuntimeError):
    """The runner is shutting down and will not run the call."""


class _Job:
    __slots__ = ("fn", "arg", "done", "result", "error")

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self.fn = fn
        self.arg = arg
        # A bare lock is the cheapest one-shot "done" signal between two threads.
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class MainThread:
    """Runs calls made on other threads on the main thread, one at a time.

    The main thread calls :meth:`run`, which returns after :meth:`stop`. Other threads
    call :meth:`call`, which blocks until the main thread has run the function.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = False
        #: True while a call runs: the signal handler interrupts it only then.
        self.busy = False

    def call(self, fn: Callable[[T], R], arg: T) -> R:
        """Run ``fn(arg)`` on the main thread and return its result or raise its exception.

        Raises
        ------
        RunnerStopped
            If the main thread stopped before running it.
        """
        job = _Job(fn, arg)
        with self._lock:
            if self._closed:
                raise RunnerStopped("the runner is shutting down")
            self._queue.put(job)
        job.done.acquire()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Make :meth:`run` return once the current call, if any, is done (any thread, signal-safe).

        Calls still waiting are refused, not run.
        """
        self._stopping = True
        self._queue.put(None)

    def run(self, poll: float = 1.0) -> None:
        """Run calls until :meth:`stop`; then refuse the calls still waiting.

        Parameters
        ----------
        poll
            Seconds between checks for a signal that woke no one (belt and braces: the
            runner blocks its signals in every other thread).
        """
        try:
            while True:
                try:
                    job = self._queue.get(timeout=poll)
                except queue.Empty:
                    continue
                if job is None or self._stopping:
                    if job is not None:
                        _refuse(job)
                    return
                try:
                    self.busy = True
                    job.result = job.fn(job.arg)
                except BaseException as exc:  # noqa: B036 - the caller reports it; the loop goes on
                    job.error = exc
                finally:
                    self.busy = False
                    job.done.release()
        finally:
            with self._lock:
                self._closed = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    _refuse(job)


def _refuse(job: _Job) -> None:
    job.error = RunnerStopped("the runner is shutting down")
    job.done.release()


class InstanceService(InstanceServicer):  # type: ignore[misc]
    """Flame's ``flame.v1.Instance`` service, running cells with a given function.

    Parameters
    ----------
    evaluate
        Runs one cell and describes the outcome; called on the main thread. Errors of
        the cell are in its result; an exception means the runner itself failed.
    main
        The hand-off to the main thread.
    on_leave
        Called when Flame ends the session (the runner then exits).
    """

    def __init__(
        self,
        evaluate: Callable[[cell.CellRequest], cell.CellResult],
        main: MainThread,
        on_leave: Callable[[], None] | None = None,
    ) -> None:
        self._evaluate = evaluate
        self._main = main
        self._on_leave = on_leave

    def OnSessionEnter(  # noqa: N802 - gRPC method name
        self, request: instance.SessionContext, context: grpc.ServicerContext
    ) -> types.Result:
        """Accept the session if its common data is a hello from a compatible notebook."""
        log.info("session %s: enter (application %s)", request.session_id, request.application.name)
        if request.HasField("common_data"):
            try:
                codec.decode(cell.SessionHello, request.common_data, "the notebook")
            except codec.PayloadError as exc:
                log.error("session %s refused: %s", request.session_id, exc)
                return types.Result(return_code=1, message=str(exc))
        return types.Result(return_code=0)

    def OnTaskInvoke(  # noqa: N802 - gRPC method name
        self, request: instance.TaskContext, context: grpc.ServicerContext
    ) -> types.TaskResult:
        """Run the task's cell on the main thread; code 1 if the cell raised, 2 if not run."""
        if not request.HasField("input"):
            return _not_run(request, "The task has no input: it should carry a cell." + _NOT_OURS)
        try:
            cell_request = codec.decode(cell.CellRequest, request.input, "the notebook")
        except codec.PayloadError as exc:
            return _not_run(request, f"{exc}{'' if str(exc).endswith('.') else '.'}{_NOT_OURS}")
        try:
            result = self._main.call(self._evaluate, cell_request)
        except RunnerStopped:
            return _not_run(
                request, "The runner was shutting down (Flame ended the session); run the cell again."
            )
        except BaseException as exc:  # noqa: B036 - includes the interrupt sent by SIGTERM
            log.exception("task %s: the runner failed", request.task_id)
            return _not_run(request, f"flame-magic's runner failed while running the cell: {exc!r}")
        output = codec.encode(result)
        if result.HasField("error"):
            message = _clip(f"{result.error.ename}: {result.error.evalue}")
            log.debug("task %s: the cell raised %s", request.task_id, message)
            return types.TaskResult(return_code=1, output=output, message=message)
        return types.TaskResult(return_code=0, output=output)

    def OnSessionLeave(  # noqa: N802 - gRPC method name
        self, request: types.EmptyRequest, context: grpc.ServicerContext
    ) -> types.Result:
        """Acknowledge the end of the session; the runner then stops."""
        log.info("session: leave")
        if self._on_leave is not None:
            self._on_leave()
        return types.Result(return_code=0)


def _not_run(request: instance.TaskContext, message: str) -> types.TaskResult:
    log.error("task %s not run: %s", request.task_id, message)
    return types.TaskResult(return_code=2, message=_clip(message))


def _clip(message: str) -> str:
    if len(message) <= MESSAGE_LIMIT:
        return message
    return message[: MESSAGE_LIMIT - 3] + "..."
