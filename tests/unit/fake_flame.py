"""A fake Flame for unit tests of the engine, in one process, without gRPC.

:class:`FakeFlame` stands for what :class:`flame_magic.client.FlameClient` reaches: Flame's
session manager with flame-magic's runner registered as ``flame-magic``, one runner per
session. The runner is not faked: each session's runner is flame-magic's own evaluator
(``flame_magic_runner.evaluate.Evaluator``), fed the task input as the runner's Instance
service is (a ``CellRequest`` after its version check), so what a cell gives is what a real
runner gives. What is fake is Flame around it: sessions and tasks live in dictionaries, a
task is evaluated when it is created, and it is reported ``Running`` until the test
releases it (``hold=True``), so that a test decides the order in which tasks finish. A
runner can be killed (:meth:`FakeFlame.kill`): its session's next tasks fail as on Flame 0.6,
with ``Connection refused (os error 111)`` and no output. There is no object cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from flame_magic import codec
from flame_magic.errors import FlameError, WaitStopped
from flame_magic.protocol import EVENT_TASK_FAILED, TERMINAL_TASK_STATES, cell, types
from flame_magic_runner.evaluate import Evaluator

RUNNER = types.ApplicationSpec(command="python3", arguments=["-m", "flame_magic_runner"])


class FakeFlame:
    """Flame's Frontend, as the engine uses it (see the module docstring).

    Parameters
    ----------
    hold
        Report each task Running until :meth:`release` (else it finishes when created).
    """

    endpoint = "fake-flame:8080"

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.sessions: dict[str, types.Session] = {}
        self.runners: dict[str, Evaluator] = {}
        self.tasks: dict[tuple[str, str], types.Task] = {}
        self.created: list[tuple[str, str]] = []  # (session, task) in the order created
        self.dead: set[str] = set()
        self.closed = False
        self._finished: dict[tuple[str, str], types.Task] = {}
        self._cond = threading.Condition()

    # -- what the test does ------------------------------------------------------------

    def release(self, index: int) -> None:
        """Let the ``index``-th task created (0-based) finish."""
        with self._cond:
            key = self.created[index]
            self.tasks[key] = self._finished[key]
            self._cond.notify_all()

    def release_all(self) -> None:
        with self._cond:
            for key in self.created:
                self.tasks[key] = self._finished[key]
            self._cond.notify_all()

    def kill(self, session_id: str) -> None:
        """The runner of ``session_id`` dies; Flame 0.6 keeps the session and fails its tasks."""
        self.dead.add(session_id)

    def wait_created(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` tasks were created (a guard against a hang, not a speed limit)."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.created) >= count, timeout), self.created

    # -- FlameClient -------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        for runner in self.runners.values():
            runner.close()

    def wait_ready(self, timeout: float) -> None:
        pass

    def get_application(self, name: str) -> types.Application | None:
        if name != "flame-magic":
            return None
        return types.Application(metadata=types.Metadata(id=name, name=name), spec=RUNNER)

    def list_applications(self) -> list[types.Application]:
        found = self.get_application("flame-magic")
        return [found] if found is not None else []

    def list_nodes(self) -> list[types.Node]:
        return []

    def list_executors(self) -> list[types.Executor]:
        return []

    def open_session(self, session_id: str, spec: types.SessionSpec) -> types.Session:
        with self._cond:
            session = types.Session(metadata=types.Metadata(id=session_id), spec=spec)
            session.status.state = types.Open
            self.sessions[session_id] = session
            self.runners[session_id] = Evaluator()
            return session

    def get_session(self, session_id: str) -> types.Session:
        with self._cond:
            if session_id not in self.sessions:
                raise FlameError(f"session <{session_id}> not found")
            session = types.Session()
            session.CopyFrom(self.sessions[session_id])
            states = [t.status.state for (s, _), t in self.tasks.items() if s == session_id]
            session.status.running = sum(1 for state in states if state == types.Running)
            session.status.succeed = sum(1 for state in states if state == types.Succeed)
            session.status.failed = sum(1 for state in states if state == types.Failed)
            return session

    def list_sessions(self) -> list[types.Session]:
        return [self.get_session(session_id) for session_id in list(self.sessions)]

    def close_session(self, session_id: str) -> types.Session:
        session = self.get_session(session_id)
        if session.status.running:
            raise FlameError(f"close session {session_id!r}: Cannot close session with running tasks")
        with self._cond:
            self.sessions[session_id].status.state = types.Closed
        return self.get_session(session_id)

    def create_task(self, session_id: str, task_input: bytes) -> types.Task:
        with self._cond:
            if self.sessions[session_id].status.state != types.Open:
                raise FlameError(f"create task: session <{session_id}> is not open")
            task_id = str(sum(1 for s, _ in self.tasks if s == session_id) + 1)
            key = (session_id, task_id)
            finished = self._run(session_id, task_id, task_input)
            self._finished[key] = finished
            running = types.Task()
            running.CopyFrom(finished)
            running.status.state = types.Running
            running.ClearField("spec")
            running.spec.session_id = session_id
            self.tasks[key] = running if self.hold else finished
            self.created.append(key)
            self._cond.notify_all()
            return self.tasks[key]

    def create_tasks(self, session_id: str, inputs: Iterable[bytes], depth: int = 16) -> Iterator[types.Task]:
        for data in inputs:
            yield self.create_task(session_id, data)

    def get_task(self, session_id: str, task_id: str) -> types.Task:
        with self._cond:
            if (session_id, task_id) not in self.tasks:
                raise FlameError(
                    f"get task {task_id} of {session_id!r}: task <{session_id}/{task_id}> not found"
                )
            return self.tasks[(session_id, task_id)]

    def get_tasks(self, session_id: str, task_ids: Iterable[str], depth: int = 16) -> Iterator[types.Task]:
        for task_id in list(task_ids):
            yield self.get_task(session_id, task_id)

    def wait_task(
        self,
        session_id: str,
        task_id: str,
        stop: threading.Event | None = None,
        tick: object = None,
        pending: object = None,
    ) -> types.Task:
        key = (session_id, task_id)
        with self._cond:
            while self.tasks[key].status.state not in TERMINAL_TASK_STATES:
                if stop is not None and stop.is_set():
                    raise WaitStopped(f"stopped waiting for task {task_id} of {session_id!r}")
                self._cond.wait(0.05)
            return self.tasks[key]

    # -- the runner --------------------------------------------------------------------

    def _run(self, session_id: str, task_id: str, task_input: bytes) -> types.Task:
        task = types.Task(metadata=types.Metadata(id=task_id))
        task.spec.session_id = session_id
        if session_id in self.dead:
            task.status.state = types.Failed
            task.status.events.add(
                code=EVENT_TASK_FAILED, message="transport error: Connection refused (os error 111)"
            )
            return task
        try:
            request = codec.decode(cell.CellRequest, task_input, "the notebook")
        except codec.PayloadError as exc:  # the runner's service answers so, with no output
            task.status.state = types.Failed
            task.status.events.add(code=EVENT_TASK_FAILED, message=str(exc))
            return task
        result = self.runners[session_id].evaluate(request)
        task.spec.output = codec.encode(result)
        task.status.state = types.Succeed
        return task
