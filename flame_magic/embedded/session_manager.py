"""The session manager of the embedded Flame: applications, sessions, tasks, and scheduling.

It keeps Flame's state in memory and serves it as the ``flame.v1.Frontend`` service with
Flame's semantics (see ``flame-protocol.md``): the same messages, the same task and
session state machines, the same events (task events carry the state as code, a failed
task's message has code 3, bind failures 1001, the pause after five of them 1002). Tasks
are handed to application processes (:class:`~flame_magic.embedded.executor.Instance`)
one at a time per process, with up to ``max_instances`` processes per session.

Everything runs on one asyncio event loop, so the state needs no locks, and every state
change wakes its watchers and the dispatcher at once: nothing here polls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import string
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc

from flame_magic import protocol
from flame_magic.embedded.applications import Applications
from flame_magic.embedded.errors import FrontendError
from flame_magic.embedded.executor import BindError, Instance, InvokeError, like_flame_06
from flame_magic.embedded.installer import Installer
from flame_magic.embedded.records import (
    DEFAULT_DELAY_RELEASE,
    DEFAULT_RESREQ,
    SessionRecord,
    event,
    node_cpus,
    node_message,
    normalised_session_spec,
    now_ms,
    spec_mismatch,
)
from flame_magic.embedded.spare import Spares
from flame_magic.embedded.tasks import TaskRecord, TaskStore

log = logging.getLogger(__name__)

types = protocol.types

BIND_RETRY_LIMIT = 5
BIND_RETRY_DELAY = 0.1  # seconds before launching again after a failed bind
MAX_CLOSED_SESSIONS = 1000
# A session event of ours (Flame has no code for it): no executor can run the application.
EVENT_NO_EXECUTOR = 1101  # closed sessions kept for Get/List before the oldest are dropped


_ALNUM = string.ascii_letters + string.digits
_TERMINAL = protocol.TERMINAL_TASK_STATES


class SessionManager:
    """Flame's state and scheduler, on one event loop.

    Parameters
    ----------
    state_dir
        Private (0700) directory for sockets, logs and per-executor directories.
    working_directory
        Working directory of flame-magic's runner (application ``flame-magic``).
    """

    def __init__(self, state_dir: Path, working_directory: str) -> None:
        self.state_dir = state_dir
        self.working_directory = working_directory
        self.endpoint = ""  # set by the server once it knows its port
        self.cache_endpoint: str | None = None  # the object cache, given to every process
        self.cache_storage: str | None = None
        self.node_name = socket.gethostname()
        self.sessions: dict[str, SessionRecord] = {}
        self.executors: dict[str, Instance] = {}  # every live process, leaving ones too
        self.stopping = False
        self._background: set[asyncio.Task[Any]] = set()
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._bind_tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, TaskRecord] = {}  # executor id -> its task
        self.installer = Installer(state_dir)  # applications with a url, installed on first bind
        self.spares = Spares(self._new_instance, self._spawn)
        self.apps = Applications(self.installer, self.spares, self._open_sessions_of)
        self.applications = self.apps.records
        self.task_store = TaskStore(state_dir / "tasks")  # inputs, outputs, finished tasks

    # -- applications ----------------------------------------------------------------------

    def register_default_applications(self) -> None:
        """Register Flame's defaults and flame-magic's runner (see :class:`Applications`)."""
        self.apps.register_defaults(self.working_directory)

    def start_spare(self, name: str) -> asyncio.Task[Any] | None:
        """Start a process of application ``name`` ahead of its first session (see ``spare``)."""
        app = self.applications.get(name)
        return self.spares.prepare(name, app.spec) if app is not None else None  # type: ignore[no-any-return]

    def _open_sessions_of(self, name: str) -> int:
        return sum(1 for s in self.sessions.values() if s.spec.application == name and s.state == types.Open)

    def unregister_application(self, name: str) -> None:
        """Remove an application without open sessions, and its closed sessions (as Flame does)."""
        self.apps.unregister(name)
        for sid in [s.id for s in self.sessions.values() if s.spec.application == name]:
            del self.sessions[sid]
            self.task_store.drop(sid)

    # -- sessions --------------------------------------------------------------------------

    def _new_session_id(self, app: str) -> str:
        while True:
            sid = f"{app}-{''.join(secrets.choice(_ALNUM) for _ in range(6))}"
            if sid not in self.sessions:
                return sid

    def get_session(self, session_id: str) -> SessionRecord:
        """The session, open or closed."""
        ssn = self.sessions.get(session_id)
        if ssn is None:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"session <{session_id}> not found")
        return ssn

    def create_session(self, session_id: str, spec: protocol.types.SessionSpec) -> SessionRecord:
        """Open a new session (id ``<app>-<6 alphanumerics>`` when empty); start min_instances."""
        app = self.apps.get(spec.application)
        if app.state != types.Enabled:
            raise FrontendError(grpc.StatusCode.FAILED_PRECONDITION, f"application <{app.name}> is disabled")
        if spec.HasField("max_instances") and spec.max_instances < spec.min_instances:
            raise FrontendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_instances ({spec.max_instances}) is less than min_instances ({spec.min_instances})",
            )
        if not session_id:
            session_id = self._new_session_id(app.name)
        elif session_id in self.sessions:
            raise FrontendError(grpc.StatusCode.ALREADY_EXISTS, f"session <{session_id}> already exists")
        ssn = SessionRecord(id=session_id, spec=normalised_session_spec(spec))
        self.sessions[session_id] = ssn
        log.info("session %s opened (application %s)", session_id, app.name)
        self._schedule(ssn)  # pre-warms min_instances
        return ssn

    def open_session(self, session_id: str, spec: protocol.types.SessionSpec | None) -> SessionRecord:
        """Return the open session after checking ``spec`` against it, or create it from ``spec``."""
        ssn = self.sessions.get(session_id) if session_id else None
        if ssn is None:
            if spec is None:
                raise FrontendError(grpc.StatusCode.NOT_FOUND, f"session <{session_id}> not found")
            return self.create_session(session_id, spec)
        if ssn.state != types.Open:
            raise FrontendError(grpc.StatusCode.FAILED_PRECONDITION, f"session <{session_id}> is not open")
        if spec is not None:
            mismatch = spec_mismatch(ssn, normalised_session_spec(spec))
            if mismatch:
                raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, mismatch)
        return ssn

    def close_session(self, session_id: str) -> SessionRecord:
        """Close: refuse while a task runs, cancel pending tasks, release the instances."""
        ssn = self.get_session(session_id)
        if ssn.state == types.Closed:
            return ssn
        if ssn.counts[types.Running]:
            raise FrontendError(grpc.StatusCode.INTERNAL, "Cannot close session with running tasks")
        ssn.state = types.Closed
        ssn.completion_time = now_ms()
        while ssn.pending:
            task = ssn.pending.popleft()
            self._set_state(ssn, task, types.Cancelled, f"Task was cancelled: session <{ssn.id}> was closed")
        for inst in ssn.instances:
            self._retire(inst)
        ssn.instances.clear()
        log.info("session %s closed", session_id)
        self._evict_closed_sessions()
        return ssn

    def delete_session(self, session_id: str) -> SessionRecord:
        """Forget a closed session."""
        ssn = self.get_session(session_id)
        if ssn.state != types.Closed:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session <{session_id}> is open; close it before deleting it",
            )
        del self.sessions[session_id]
        self.task_store.drop(session_id)
        return ssn

    def _evict_closed_sessions(self) -> None:
        closed = [s for s in self.sessions.values() if s.state == types.Closed]
        if len(closed) <= MAX_CLOSED_SESSIONS:
            return
        closed.sort(key=lambda s: s.completion_time or s.creation_time)
        for ssn in closed[: len(closed) - MAX_CLOSED_SESSIONS]:
            del self.sessions[ssn.id]
            self.task_store.drop(ssn.id)

    # -- tasks -----------------------------------------------------------------------------

    def create_task(self, session_id: str, data: bytes | None) -> TaskRecord:
        """Add a Pending task (ids 1, 2, ... per session) and dispatch it at once if possible."""
        ssn = self.get_session(session_id)
        if ssn.state != types.Open:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session <{session_id}> is closed; it accepts no new tasks",
            )
        task = TaskRecord(
            id=str(ssn.next_task_id), session_id=session_id, store=self.task_store, has_input=data is not None
        )
        if data is not None:
            self.task_store.put_input(session_id, task.id, data)
        ssn.next_task_id += 1
        ssn.tasks[task.id] = task
        ssn.counts[types.Pending] += 1
        task.events.append(event(types.Pending, "Task was created with state <Pending>"))
        ssn.pending.append(task)
        self._schedule(ssn)
        return task

    def get_task(self, session_id: str, task_id: str) -> protocol.types.Task:
        """A task of a session as GetTask returns it (with its events), from memory or disk."""
        task = self.live_task(session_id, task_id)
        found = (
            task.to_proto(with_events=True) if task is not None else self.task_store.done(session_id, task_id)
        )
        if found is None:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"task <{session_id}/{task_id}> not found")
        return found

    def live_task(self, session_id: str, task_id: str) -> TaskRecord | None:
        """A task of a session still pending or running (None: it ended, or there is none)."""
        return self.get_session(session_id).tasks.get(task_id)

    def list_tasks(self, ssn: SessionRecord) -> list[protocol.types.Task]:
        """The session's tasks in order, as streams show them (without events)."""
        found = []
        for number in range(1, ssn.next_task_id):
            task = self.live_task(ssn.id, str(number))
            message = (
                task.to_proto(with_events=False)
                if task is not None
                else self.task_store.done(ssn.id, str(number))
            )
            if message is not None:
                message.status.ClearField("events")
                found.append(message)
        return found

    def _set_state(
        self,
        ssn: SessionRecord,
        task: TaskRecord,
        state: protocol.types.TaskState,
        message: str,
        output: bytes | None = None,
    ) -> None:
        ssn.counts[task.state] -= 1
        ssn.counts[state] += 1
        task.state = state
        if state in _TERMINAL:
            task.output = output
            task.completion_time = now_ms()
        task.events.append(event(state, message))
        if task.watchers:
            msg = task.to_proto(with_events=False)
            for queue in task.watchers:
                queue.put_nowait(msg)
        if state in _TERMINAL:  # out of memory, onto disk (see flame_magic.embedded.tasks)
            self.task_store.put_done(task.to_proto(with_events=True))
            del ssn.tasks[task.id]
            task.output = None

    # -- scheduling ------------------------------------------------------------------------

    def _instance_limit(self, ssn: SessionRecord) -> int:
        """How many instances the session may have: its own max_instances, when it asks.

        Otherwise as many as this node holds (its CPUs over the session's ``resreq.cpu``),
        as Flame places executors by node capacity, and at most the application's
        ``max_instances``: a copy of a reported application (flamepy's ``Runner`` copies
        ``flmrun``) carries Flame's "no limit" of a million.
        """
        if ssn.spec.HasField("max_instances"):
            return ssn.spec.max_instances
        slots = max(1, (os.cpu_count() or 1) // max(1, ssn.spec.resreq.cpu))
        app = self.applications.get(ssn.spec.application)
        if app is not None and app.spec.HasField("max_instances"):
            return min(app.spec.max_instances, slots)
        return slots

    def _schedule(self, ssn: SessionRecord) -> None:
        """Give pending tasks to idle instances, then start the instances still needed.

        As Flame's gang scheduling, instances come in whole batches of ``batch_size``: a
        session wants ``(pending + running) // batch_size`` batches (at least its
        ``min_instances``), and its instances take tasks only while they are bound in whole
        batches. A single task of a session with ``batch_size`` 2 waits for a second one.
        """
        if ssn.state != types.Open or self.stopping or not self._runnable(ssn):
            return
        batch = ssn.spec.batch_size
        bound = [i for i in ssn.instances if i.state == types.ExecutorBound]
        if ssn.pending and len(bound) % batch == 0:
            for inst in bound:
                if inst.id not in self._running:
                    self._start_task(ssn, inst, ssn.pending.popleft())
                    if not ssn.pending:
                        break
        if not ssn.paused:
            running = sum(1 for i in ssn.instances if i.id in self._running)
            wanted = max(ssn.spec.min_instances, (len(ssn.pending) + running) // batch * batch)
            room = self._instance_limit(ssn) // batch * batch
            if like_flame_06():  # Flame places executors within the nodes' CPUs, a session at a time
                free = self._free_cpus() // max(1, ssn.spec.resreq.cpu)
                room = min(room, len(ssn.instances) + free // batch * batch)
            for _ in range(min(wanted, room) - len(ssn.instances)):
                self._launch(ssn)
        if len(ssn.instances) > ssn.spec.min_instances:
            for inst in ssn.instances:
                if (
                    inst.state == types.ExecutorBound
                    and inst.id not in self._running
                    and inst.id not in self._idle_timers
                ):
                    self._arm_idle_timer(ssn, inst)

    def _runnable(self, ssn: SessionRecord) -> bool:
        """Whether this Flame's executors can run the session's application (Host shim only).

        Flame leaves the tasks of a shim no executor has pending; so does this, and says
        why once, as a session event.
        """
        app = self.applications.get(ssn.spec.application)
        if app is None or app.spec.shim == types.Host:
            return True
        if not ssn.shim_noted:
            ssn.shim_noted = True
            message = (
                f"No executor for the {types.Shim.Name(app.spec.shim)} shim of application "
                f"<{app.name}>: the embedded Flame runs Host-shim applications only, so the tasks "
                "of this session stay pending."
            )
            log.warning("session %s: %s", ssn.id, message)
            ssn.events.append(event(EVENT_NO_EXECUTOR, message))
        return False

    def _free_cpus(self) -> int:
        used = 0
        for inst in self.executors.values():
            ssn = self.sessions.get(inst.session_id)
            used += ssn.spec.resreq.cpu if ssn is not None else DEFAULT_RESREQ.cpu
        return node_cpus() - used

    def _arm_idle_timer(self, ssn: SessionRecord, inst: Instance) -> None:
        app = self.applications.get(ssn.spec.application)
        delay = DEFAULT_DELAY_RELEASE
        if app is not None and app.spec.HasField("delay_release"):
            delay = max(0, app.spec.delay_release)
        loop = asyncio.get_running_loop()
        self._idle_timers[inst.id] = loop.call_later(delay, self._idle_expired, ssn, inst)

    def _idle_expired(self, ssn: SessionRecord, inst: Instance) -> None:
        self._idle_timers.pop(inst.id, None)
        if inst.id in self._running or inst not in ssn.instances:
            return
        if len(ssn.instances) <= ssn.spec.min_instances:
            return
        log.info("executor %s: idle past delay_release; releasing", inst.id)
        ssn.instances.remove(inst)
        self._retire(inst)

    def _start_task(self, ssn: SessionRecord, inst: Instance, task: TaskRecord) -> None:
        timer = self._idle_timers.pop(inst.id, None)
        if timer is not None:
            timer.cancel()
        self._running[inst.id] = task
        self._set_state(ssn, task, types.Running, "Task state was updated to <Running>")
        self._spawn(self._run_task(ssn, inst, task))

    async def _run_task(self, ssn: SessionRecord, inst: Instance, task: TaskRecord) -> None:
        if inst.returncode is not None and like_flame_06():
            # Flame 0.6 keeps the executor bound to a dead process and sends it every task.
            del self._running[inst.id]
            self._set_state(ssn, task, types.Failed, "Connection refused (os error 111)")
            self._schedule(ssn)
            return
        try:
            result = await inst.invoke(task.id, ssn.id, task.input)
        except InvokeError as err:
            log.warning("task %s/%s failed: %s", ssn.id, task.id, err.message)
            del self._running[inst.id]
            self._set_state(ssn, task, types.Failed, err.message)
            if err.lost and not like_flame_06():
                if inst in ssn.instances:
                    ssn.instances.remove(inst)
                self._retire(inst, leave=False)
        except Exception as err:
            # Whatever went wrong, the task must not stay Running for ever.
            log.exception("task %s/%s: unexpected error", ssn.id, task.id)
            self._running.pop(inst.id, None)
            self._set_state(ssn, task, types.Failed, f"The embedded Flame failed to run the task: {err!r}")
            if inst in ssn.instances:
                ssn.instances.remove(inst)
            self._retire(inst, leave=False)
        else:
            del self._running[inst.id]
            output = result.output if result.HasField("output") else None
            if result.return_code == 0:
                self._set_state(ssn, task, types.Succeed, "Task was completed with state <Succeed>", output)
            else:
                message = result.message or f"Task failed with return_code <{result.return_code}>"
                self._set_state(ssn, task, types.Failed, message, output)
        self._schedule(ssn)

    def _new_instance(
        self, *, executor_id: str, app_name: str, app_spec: protocol.types.ApplicationSpec
    ) -> Instance:
        """A process of an application, not started, not yet given a session."""
        return Instance(
            executor_id=executor_id,
            app_name=app_name,
            app_spec=app_spec,
            session_id="",
            common_data=None,
            state_dir=self.state_dir,
            frontend_endpoint=self.endpoint,
            cache_endpoint=self.cache_endpoint,
            cache_storage=self.cache_storage,
            installer=self.installer,
        )

    def _launch(self, ssn: SessionRecord) -> None:
        app = self.applications[ssn.spec.application]
        inst = self.spares.take(app.name, app.spec) or self._new_instance(
            executor_id=uuid.uuid4().hex[:12], app_name=app.name, app_spec=app.spec
        )
        inst.adopt(ssn.id, ssn.spec.common_data if ssn.spec.HasField("common_data") else None)
        ssn.instances.append(inst)
        self.executors[inst.id] = inst
        self._bind_tasks[inst.id] = self._spawn(self._bind(ssn, inst))

    async def _bind(self, ssn: SessionRecord, inst: Instance) -> None:
        try:
            await inst.bind()
        except asyncio.CancelledError:
            return  # the session closed or we stop; whoever cancelled releases the process
        except BindError as err:
            self._bind_tasks.pop(inst.id, None)  # so that _retire does not cancel this very task
            self._bind_failed(ssn, inst, err)
            return
        self._bind_tasks.pop(inst.id, None)
        log.info("executor %s: bound to session %s (pid %s)", inst.id, ssn.id, inst.pid)
        self._schedule(ssn)

    def _bind_failed(self, ssn: SessionRecord, inst: Instance, err: BindError) -> None:
        if inst in ssn.instances:
            ssn.instances.remove(inst)
        self._retire(inst)
        if ssn.state != types.Open:
            return
        ssn.bind_failures += 1
        message = (
            f"Executor <{inst.id}> on node <{self.node_name}> failed to bind session "
            f"with return_code <{err.return_code}>: {err.message}"
        )
        log.warning("session %s: %s", ssn.id, message)
        ssn.events.append(event(protocol.EVENT_BIND_FAILED, message))
        if ssn.bind_failures >= BIND_RETRY_LIMIT:
            ssn.paused = True
            ssn.events.append(
                event(
                    protocol.EVENT_SESSION_PAUSED,
                    f"Session retry limit reached after {ssn.bind_failures}/{BIND_RETRY_LIMIT} "
                    "failed attempts; new executor assignment is paused for this session; "
                    "existing executors are unchanged.",
                )
            )
            return
        asyncio.get_running_loop().call_later(BIND_RETRY_DELAY, self._schedule, ssn)

    def _retire(self, inst: Instance, leave: bool = True, leave_timeout: float = 5.0) -> None:
        """Release an instance in the background; it stays in ``executors`` until reaped."""
        timer = self._idle_timers.pop(inst.id, None)
        if timer is not None:
            timer.cancel()
        bind_task = self._bind_tasks.pop(inst.id, None)
        if bind_task is not None:
            bind_task.cancel()

        async def release() -> None:
            try:
                await inst.release(leave=leave, leave_timeout=leave_timeout)
            finally:
                self.executors.pop(inst.id, None)
            if like_flame_06():  # its CPUs are free: sessions that waited for room get them
                for waiting in list(self.sessions.values()):
                    if waiting.pending:
                        self._schedule(waiting)

        self._spawn(release())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background job failed", exc_info=task.exception())

    async def shutdown(self) -> None:
        """Release every instance: OnSessionLeave (briefly), SIGTERM, SIGKILL, reap."""
        self.stopping = True
        for ssn in self.sessions.values():
            ssn.instances.clear()
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        for bind_task in list(self._bind_tasks.values()):
            bind_task.cancel()
        leaving = [*self.executors.values(), *self.spares.all()]
        await asyncio.gather(
            *(inst.release(leave_timeout=1.0, grace=1.0) for inst in leaving),
            return_exceptions=True,
        )
        self.executors.clear()

    # -- nodes -----------------------------------------------------------------------------

    def node(self) -> protocol.types.Node:
        """This machine as Flame's only node."""
        return node_message(self.node_name)
