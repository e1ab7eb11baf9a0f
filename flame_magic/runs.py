"""Running one cell as a Flame task: create it, follow it, interrupt it, read its result.

:class:`Runs` works in the sessions of a :class:`~flame_magic.remote.Connection` (which
opens, reuses, replaces and closes them) and speaks to each session's runner through its
backend (:mod:`flame_magic.backends`). What a cell shows while it runs goes to a ``show``
function, through its :class:`~flame_magic.live.LiveChannel`; nothing is presented here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from flame_magic import codec, environments, shm, wire
from flame_magic.capture import check_size
from flame_magic.client import FlameClient, failure_message
from flame_magic.errors import (
    CacheError,
    CellFailed,
    FlameError,
    PayloadError,
    RunnerStartTimeout,
    SessionGoneError,
    SessionStartError,
)
from flame_magic.live import LiveChannel
from flame_magic.protocol import cell, types
from flame_magic.runners import PendingWatch, never_reached, runner_lost
from flame_magic.sessions import DEFAULT, SessionKey

if TYPE_CHECKING:
    from flame_magic.remote import Connection

# What a task's input may take (the map checks its items against it).
TASK_INPUT_LIMIT = wire.PAYLOAD_LIMIT


class Runs:
    """The tasks of cells in ``connection``'s sessions."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def run(
        self,
        request: cell.CellRequest,
        key: SessionKey = DEFAULT,
        show: Callable[[cell.Output], None] | None = None,
        grace: float = wire.INTERRUPT_GRACE,
    ) -> tuple[cell.CellResult, str]:
        """Run one cell as a task of this notebook's session for ``key``; its result, and the session.

        Values in ``request`` that travel by reference were stored by :meth:`shipper` for the
        same ``key``; the runner is told to send large results back the same way.

        With ``show`` and an object cache, what the cell shows is given to ``show`` while it
        runs (the result then holds only the rest), and a KeyboardInterrupt while waiting
        interrupts the remote cell; if it does not stop within ``grace`` seconds its runner
        is stopped. Without a cache, an interrupt stops waiting and the cell runs on.
        """
        client = self.connection.client()
        if self.connection.cache() is None:  # refused before a session (and a runner) is started for it
            check_size(request, TASK_INPUT_LIMIT, no_cache=True)
        task, session_id = self._run_once(client, request, key, show, grace)
        if runner_lost(task) and never_reached(failure_message(task)):
            # The cell never reached a runner: the session's runner had died before. Once, in a new one.
            self.connection.reopen(session_id, key, f"Flame: {failure_message(task)}")
            task, session_id = self._run_once(self.connection.client(), request, key, show, grace)
        if runner_lost(task):
            self.connection.close_quietly(session_id)  # cancels what waits there, unless a task still runs
        return self._result(task), session_id

    def _run_once(
        self,
        client: FlameClient,
        request: cell.CellRequest,
        key: SessionKey,
        show: Callable[[cell.Output], None] | None,
        grace: float,
    ) -> tuple[types.Task, str]:
        """Create the cell's task in the session for ``key`` and wait for it to end."""
        session_id = self.connection.session(key)
        self._allow_cache(request, session_id)
        live = self._live(request, session_id, show)
        check_size(request, TASK_INPUT_LIMIT)
        data = self.task_input(session_id, codec.encode(request))
        try:
            task = client.create_task(session_id, data)
        except FlameError:
            # The embedded Flame dying as this cell started (it says so), or the session closed.
            restarted = self.connection.drop_stopped_embedded("this runs on a new one", wait=1.0)
            if not restarted and not self.connection.session_gone(session_id):
                raise
            self.connection.forget(session_id)  # a fresh one, once
            gone = session_id
            client = self.connection.client()
            session_id = self.connection.session(key)
            self._allow_cache(request, session_id)
            live = self._live(request, session_id, show)
            data = self.task_input(session_id, codec.encode(request))
            if not restarted:
                self.connection.notify(
                    f"Session {gone} was closed or deleted outside this notebook (flmctl, an "
                    f"administrator, or a Flame restart); this cell runs in a new session, {session_id}: "
                    "what earlier cells left on the runner (imports, definitions) is gone."
                )
            task = client.create_task(session_id, data)
        try:
            task = self._wait(client, session_id, task.metadata.id, live, grace)
        except RunnerStartTimeout as exc:
            self.connection.abandon(session_id)
            raise CellFailed(f"{exc}. The session was closed.") from None
        except SessionStartError as exc:
            self.connection.abandon(session_id)
            failed = self.connection.install_failure(session_id, exc)
            if failed is not None:
                raise CellFailed(failed) from None
            application = self.connection.application
            raise CellFailed(
                f"{exc}. The session was closed. If {application!r} is not flame-magic's runner "
                "with this notebook's flame-magic, Python and cloudpickle versions, run `%flame deploy` "
                "to register one and switch to it; otherwise fix the runner's environment and run the "
                "cell again."
            ) from None
        except SessionGoneError as exc:
            self.connection.forget(session_id)
            raise CellFailed(f"{exc} Run the cell again: a new session starts.") from None
        except FlameError:
            if not self.connection.drop_stopped_embedded("the next cell starts a new one", wait=1.0):
                raise
            raise CellFailed("The cell did not finish: the embedded Flame stopped while it ran.") from None
        return task, session_id

    def _live(
        self, request: cell.CellRequest, session_id: str, show: Callable[[cell.Output], None] | None
    ) -> LiveChannel | None:
        """A channel for the cell's live output and interrupt, when the cache allows one."""
        request.channel = ""
        cache = self.connection.cache()
        if show is None or cache is None or not request.HasField("cache"):
            return None
        live = LiveChannel(cache, request.cache.key_prefix, uuid.uuid4().hex, show)
        request.channel = live.channel
        return live

    def live_channel(
        self, session_id: str, show: Callable[[cell.Output], None], channel: str | None = None
    ) -> LiveChannel | None:
        """A live channel in ``session_id`` (--background, --map items); None without a cache.

        Set its ``channel`` in the request (or item) before :meth:`prepare` encodes it.
        """
        access = (
            self.connection.shipper_for(session_id).access() if self.connection.cache() is not None else None
        )
        if access is None:
            return None
        cache = self.connection.cache()
        assert cache is not None
        return LiveChannel(cache, access.key_prefix, channel or uuid.uuid4().hex, show)

    def _wait(
        self, client: FlameClient, session_id: str, task_id: str, live: LiveChannel | None, grace: float
    ) -> types.Task:
        """Wait for the task, showing its live output; an interrupt is passed on to the runner.

        An interrupt while the task has not started stops the wait at once (see
        :meth:`_cancel_pending`).
        """
        watch = self.pending_watch(session_id)
        if live is None:
            try:
                return client.wait_task(session_id, task_id, pending=watch)
            except KeyboardInterrupt:
                self._cancel_pending(session_id, task_id)
                raise CellFailed(
                    "Interrupted: this notebook stopped waiting, but the remote cell could not be "
                    "interrupted (no object cache to reach its runner) and keeps running there; the "
                    "next cell of this session waits until it ends (Flame closes no session while a "
                    "task runs in it)."
                ) from None
        try:
            while True:
                try:
                    task = client.wait_task(
                        session_id,
                        task_id,
                        tick=live.poll,
                        pending=watch,
                        tick_seconds=self.connection.live_period,
                    )
                    break
                except KeyboardInterrupt:
                    if live.interrupted:
                        raise  # a second interrupt: stop waiting
                    self._cancel_pending(session_id, task_id)
                    try:
                        live.interrupt(grace)
                    except CacheError as exc:
                        raise CellFailed(
                            f"Interrupted: this notebook stopped waiting, but the remote cell could not "
                            f"be interrupted ({exc}) and keeps running on its runner."
                        ) from None
        finally:
            live.finish()  # the last of the output
        if live.interrupted and task.status.state != types.Succeed and not task.spec.output:
            self.connection.give_up(session_id, "stopped after it ignored an interrupt")
            self.connection.close_quietly(session_id)
            raise CellFailed(
                f"Interrupted: the cell ignored the interrupt for {grace:g} s, so its runner was "
                "stopped; what it held (imports, definitions) is gone: the next cell starts on a "
                "fresh runner."
            )
        return task

    def _cancel_pending(self, session_id: str, task_id: str) -> None:
        """After an interrupt: if the task has not started, stop waiting for it now.

        Flame cannot cancel one task; closing its session cancels it, so the session is
        closed when no other task runs there, and left open (the task then runs later,
        unseen) otherwise. Raises CellFailed saying which; returns when the task runs.
        """
        try:
            if self.connection.client().get_task(session_id, task_id).status.state != types.Pending:
                return
            running = self.connection.client().get_session(session_id).status.running
        except FlameError:
            return
        if not running and self.connection.close_session(session_id):
            raise CellFailed(
                f"Interrupted before the cell started: its session {session_id} was closed, which "
                "cancelled it. The next cell opens a new session."
            )
        raise CellFailed(
            f"Interrupted before the cell started: it stays queued in session {session_id}, behind "
            "a task that runs there, and will run when that ends, unseen (Flame cannot cancel one "
            "task, nor close a session while a task runs in it)."
        )

    def prepare(self, request: cell.CellRequest, session_id: str) -> bytes:
        """``request`` readied for ``session_id`` (large results through the cache) and encoded.

        Raises
        ------
        ShipError
            If it is over Flame's task limit.
        """
        self._allow_cache(request, session_id)
        check_size(request, TASK_INPUT_LIMIT)
        return codec.encode(request)

    def task_input(self, session_id: str, data: bytes) -> bytes:
        """The task input for an encoded ``CellRequest`` (see :meth:`prepare`) to ``session_id``."""
        return self.connection.backend(session_id).task_input(data)

    def _allow_cache(self, request: cell.CellRequest, session_id: str) -> None:
        """Let the runner put large results in the cache, under the session's key prefix."""
        self.connection.environment.check(request, session_id)
        access = self.connection.shipper_for(session_id).access()
        if access is None:
            request.ClearField("cache")
        else:
            request.cache.CopyFrom(access)

    def ask(self, session_id: str, request: cell.CellRequest) -> cell.CellResult:
        """Send a request that runs no cell (e.g. ``debug_fetch``) to ``session_id``'s runner.

        Unlike :meth:`run`, a session that is gone is not replaced (the answer was on its
        runner), and a Flame this connection no longer uses is not started again.

        Raises
        ------
        FlameError
            If the session is gone or Flame cannot be reached.
        CellFailed
            If the runner gave no answer (it died).
        """
        client = self.connection.current_client()
        if client is None:
            raise FlameError("this notebook no longer uses the Flame that ran the cell")
        task = client.create_task(session_id, self.task_input(session_id, codec.encode(request)))
        return self._result(client.wait_task(session_id, task.metadata.id))

    def result_of(self, task: types.Task) -> cell.CellResult:
        """A finished task's CellResult; CellFailed when the runner gave none (died, cancelled)."""
        return self._result(task)

    def _result(self, task: types.Task) -> cell.CellResult:
        state = task.status.state
        session_id = task.spec.session_id
        backend = self.connection.backend(session_id)
        try:
            data = backend.cell_result(task)
            result = (
                codec.decode(cell.CellResult, data, backend.path, backend.same_cloudpickle) if data else None
            )
        except (PayloadError, FlameError) as exc:
            raise CellFailed(str(exc)) from None
        if result is not None:
            self.connection.environment.saw(session_id, result)
            if result.host and self.connection.cache() is not None:
                # A runner on this host: the session's next large inputs go through shared memory.
                self.connection.shipper_for(session_id).local = result.host == shm.host_id()
            if result.HasField("refused"):
                raise CellFailed(result.refused)
            return result
        if state == types.Cancelled:
            raise CellFailed(
                "The cell's task was cancelled because its session was closed. Run the cell again: "
                "a new session starts."
            )
        message = failure_message(task) or "no message"
        if not runner_lost(task):
            raise CellFailed(f"Flame could not run the cell: {message}")
        session_id = task.spec.session_id
        self.connection.give_up(session_id, f"Flame: {message}")
        raise CellFailed(
            f"The runner of session {session_id} did not answer (its process died): what it held "
            "(imports, definitions) is gone, and the next cell opens a new session. Flame says: "
            f"{message}"
        )

    def pending_watch(self, session_id: str) -> PendingWatch:
        """What to call while a task of ``session_id`` waits (see ``FlameClient.wait_task``)."""
        timeout = self.connection.start_timeout
        if timeout and self.connection.installing(session_id):  # its first runners wait for the install
            timeout += environments.INSTALL_SECONDS
        return PendingWatch(
            self.connection.client(),
            session_id,
            self.connection.application_of(session_id),
            timeout,
            self.connection.describe,
            self.connection.notify,
            lambda: self.release_idle_maps(session_id),
        )

    def release_idle_maps(self, waiting: str) -> list[str]:
        """Close this notebook's idle ``--map`` sessions (kept for the next map), so that a cell
        of ``waiting`` gets their executors; return the ids closed."""
        closed = []
        for session_id in self.connection.idle_maps(waiting):
            try:
                status = self.connection.client().get_session(session_id).status
            except FlameError:
                continue
            if not status.pending and not status.running and self.connection.close_session(session_id):
                closed.append(session_id)
        return closed
