"""What Flame says about a session's runners: started, never starting, dead, or waiting for room.

Flame 0.6 fails in ways a client has to notice by itself (see ``flame-protocol.md``):

- a runner process that died stays bound to its session: the session's later tasks fail at
  once with ``Connection refused (os error 111)``, so such a session is never used again;
- a process that exits before it creates its socket leaves its executor ``Binding``, with
  no event: the task stays Pending, so a cell gives up after ``start_timeout`` seconds;
- a task also stays Pending while every executor of the cluster is bound to other
  sessions (an idle runner is kept for its application's ``delay_release``): the cell says
  so, once, naming this notebook's sessions that hold executors.

This module reads ``ListExecutor`` for a session whose task waits; it does not present
anything (the note goes to a ``notify`` callable) and does not close sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flame_magic.client import FlameClient, failure_message
from flame_magic.errors import FlameError, RunnerStartTimeout
from flame_magic.protocol import types

# Seconds between two looks at Flame's executors while a task waits.
CHECK_SECONDS = 1.0
# Looks in a row that find no executor for the session before the cell says it waits for
# room: Flame's scheduler assigns one within a tick when the cluster has room.
ROOM_CHECKS = 3
# What Flame 0.6 records for a task sent to a runner process that is gone.
REFUSED = ("Connection refused", "os error 111")
# Words of the failure messages of a task whose call to its runner failed (the process died
# or cannot be reached): Flame 0.6's transport errors, and the embedded Flame's own. A runner
# that answers, even to refuse a task, says something else.
LOST = (
    "transport error",
    "connection refused",
    "connection reset",
    "broken pipe",
    "error trying to connect",
    "h2 protocol",
    "os error",
    "application process of executor",
    "lost contact",
)
# States of an executor that holds a node's resources for a session.
_HOLDING = frozenset({types.ExecutorBinding, types.ExecutorBound, types.ExecutorUnbinding})


def runner_lost(task: types.Task) -> bool:
    """Whether a finished task failed because the call to its runner failed (it died or is gone).

    The runner answers a cell that raised with a result; it answers a task it cannot run
    with a message and no result; only a failed call leaves a transport error.
    """
    if task.status.state != types.Failed or (task.spec.HasField("output") and task.spec.output):
        return False
    message = failure_message(task).lower()
    return any(marker in message for marker in LOST)


def never_reached(message: str) -> bool:
    """Whether Flame's failure message says the task never reached a runner process."""
    return any(marker in message for marker in REFUSED)


def _holding(executors: list[types.Executor], session_id: str) -> list[types.Executor]:
    return [e for e in executors if e.status.session_id == session_id and e.status.state in _HOLDING]


class PendingWatch:
    """Called while a cell's task is Pending (see ``FlameClient.wait_task``'s ``pending``).

    Parameters
    ----------
    client
        The Flame client.
    session_id, application
        The session the task waits in, and its application.
    start_timeout
        Seconds the session's executors may stay ``Binding`` (no runner up) before the
        wait fails with :class:`RunnerStartTimeout`; 0 waits for ever.
    describe
        For a session id, how to name it to the user if it is one of this notebook's
        open sessions (None otherwise).
    notify
        Shows the one-line note that the cell waits for room.
    make_room
        Closes this notebook's idle sessions that only a map needed, returning their ids;
        tried once, before the cell says it waits for room.
    """

    def __init__(
        self,
        client: FlameClient,
        session_id: str,
        application: str,
        start_timeout: float,
        describe: Callable[[str], str | None],
        notify: Callable[[str], None],
        make_room: Callable[[], list[str]] | None = None,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.application = application
        self.start_timeout = start_timeout
        self.describe = describe
        self.notify = notify
        self.make_room = make_room
        self.told = False
        self._next_check = 0.0
        self._binding_since: float | None = None
        self._roomless = 0
        self._off = False

    def __call__(self) -> None:
        now = time.monotonic()
        if self._off or now < self._next_check:
            return
        self._next_check = now + CHECK_SECONDS
        try:
            executors = self.client.list_executors()
        except FlameError:
            self._off = True  # a Flame that does not list its executors: nothing to tell from
            return
        ours = _holding(executors, self.session_id)
        if any(e.status.state != types.ExecutorBinding for e in ours):
            self._binding_since, self._roomless = None, 0  # a runner is up: the task waits its turn
            return
        if ours:
            self._roomless = 0
            if self._binding_since is None:
                self._binding_since = now
            if self.start_timeout > 0 and now - self._binding_since >= self.start_timeout:
                raise RunnerStartTimeout(self._start_failure())
            return
        self._binding_since = None
        self._roomless += 1
        others = [e for e in executors if e.status.state in _HOLDING]
        if self.told or not others or self._roomless < ROOM_CHECKS:
            return
        if self.make_room is not None:
            freed, self.make_room = self.make_room(), None
            if freed:
                self._roomless = 0
                self.notify(
                    f"closed this notebook's idle --map session{'s' if len(freed) != 1 else ''} "
                    f"{', '.join(freed)} to give {'their' if len(freed) != 1 else 'its'} executors "
                    "to this cell (the next map starts its runners anew)."
                )
                return
        self.told = True
        self.notify(self._waiting_for_room(others))

    def _start_failure(self) -> str:
        command = "(unknown)"
        try:
            application = self.client.get_application(self.application)
        except FlameError:
            application = None
        if application is not None:
            command = " ".join([application.spec.command, *application.spec.arguments])
        return (
            f"No runner of application {self.application!r} started within {self.start_timeout:g} s "
            f"(session {self.session_id}): Flame's executor is still starting `{command}`, and Flame 0.6 "
            "reports nothing when that process exits before it serves. Check that this command runs on "
            "the executors and that its Python imports flame-magic's runner (`PYTHON -c 'import "
            "flame_magic_runner'`), and read the executor manager's log; `%flame deploy --installed "
            "--python PATH` registers another Python. `%config FlameMagics.start_timeout` sets this limit"
        )

    def _waiting_for_room(self, others: list[types.Executor]) -> str:
        stuck = [e for e in others if e.status.state == types.ExecutorUnbinding]
        held: dict[str, int] = {}
        for executor in others:
            if executor not in stuck:
                held[executor.status.session_id] = held.get(executor.status.session_id, 0) + 1
        mine = {sid: (self.describe(sid), count) for sid, count in held.items()}
        parts = [f"{text} holds {_executors(count)}" for text, count in mine.values() if text]
        advice = " Close one of this notebook's sessions, as shown, to free its executor." if parts else ""
        if stuck:
            parts.append(
                f"{_executors(len(stuck))} being released (one that stays so ran a runner that died: "
                "Flame 0.6 frees it only when its executor manager restarts)"
            )
        foreign = sum(count for text, count in mine.values() if not text)
        if foreign:
            parts.append(f"other notebooks or clients hold {_executors(foreign)}")
        return (
            f"waiting for a free executor: all {_executors(len(others))} of Flame are in use: "
            f"{'; '.join(parts)}. This cell starts when one is free (an idle runner is kept for its "
            f"application's delay_release).{advice}"
        )


def _executors(count: int) -> str:
    return f"{count} executor{'s' if count != 1 else ''}"


class RunnerCount:
    """The most executors Flame gave one session, from looks at most every CHECK_SECONDS."""

    def __init__(self, client: FlameClient, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.most = 0
        self.known = False
        self._next_check = 0.0
        self._off = False

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._off or (not force and now < self._next_check):
            return
        self._next_check = now + CHECK_SECONDS
        try:
            executors = self.client.list_executors()
        except FlameError:
            self._off = True
            return
        self.known = True
        self.most = max(self.most, len(_holding(executors, self.session_id)))
