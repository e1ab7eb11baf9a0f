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
import functools
import json
import logging
import os
import platform
import secrets
import socket
import string
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from flame_magic import protocol
from flame_magic.embedded.apps import default_applications
from flame_magic.embedded.errors import FrontendError
from flame_magic.embedded.executor import BindError, Instance, InvokeError, like_flame_06
from flame_magic.embedded.installer import Installer

log = logging.getLogger(__name__)

types = protocol.types
frontend = protocol.frontend

# Flame's defaults (common/src/apis/types.rs, session_manager/src/apiserver/frontend.rs).
DEFAULT_DELAY_RELEASE = 60  # seconds an idle instance is kept
REPORTED_MAX_INSTANCES = 1_000_000  # what Flame reports for an application without a limit
DEFAULT_RESREQ = types.ResourceRequirement(cpu=1, memory=1024**3, gpu=0)
BIND_RETRY_LIMIT = 5
BIND_RETRY_DELAY = 0.1  # seconds before launching again after a failed bind
MAX_CLOSED_SESSIONS = 1000
# A session event of ours (Flame has no code for it): no executor can run the application.
EVENT_NO_EXECUTOR = 1101  # closed sessions kept for Get/List before the oldest are dropped


_ALNUM = string.ascii_letters + string.digits
_TERMINAL = protocol.TERMINAL_TASK_STATES


def node_cpus() -> int:
    """This node's CPUs, as reported (``FLAME_EMBEDDED_CPUS`` overrides, e.g. to test a small cluster)."""
    given = os.environ.get("FLAME_EMBEDDED_CPUS", "")
    return int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)


def now_ms() -> int:
    """Current time in Unix milliseconds, Flame's unit for every timestamp."""
    return int(time.time() * 1000)


def _event(code: int, message: str) -> protocol.types.Event:
    return types.Event(code=code, message=message, creation_time=now_ms())


@dataclass(eq=False)
class ApplicationRecord:
    """A registered application."""

    name: str
    spec: protocol.types.ApplicationSpec
    state: protocol.types.ApplicationState = types.Enabled
    creation_time: int = field(default_factory=now_ms)

    def to_proto(self) -> protocol.types.Application:
        """As Flame reports it (unset max_instances and delay_release filled in)."""
        spec = types.ApplicationSpec()
        spec.CopyFrom(self.spec)
        # Flame fills these two in when they are unset, and reports them.
        if not spec.HasField("max_instances"):
            spec.max_instances = REPORTED_MAX_INSTANCES
        if not spec.HasField("delay_release"):
            spec.delay_release = DEFAULT_DELAY_RELEASE
        return types.Application(
            metadata=types.Metadata(id=self.name, name=self.name),
            spec=spec,
            status=types.ApplicationStatus(state=self.state, creation_time=self.creation_time),
        )


@dataclass(eq=False)
class TaskRecord:
    """A task and the queues of the WatchTask streams following it."""

    id: str
    session_id: str
    input: bytes | None
    state: protocol.types.TaskState = types.Pending
    output: bytes | None = None
    creation_time: int = field(default_factory=now_ms)
    completion_time: int | None = None
    events: list[protocol.types.Event] = field(default_factory=list)
    watchers: list[asyncio.Queue[protocol.types.Task]] = field(default_factory=list)

    def to_proto(self, with_events: bool) -> protocol.types.Task:
        """As a message; events only for GetTask, as Flame (streams never carry them)."""
        return types.Task(
            metadata=types.Metadata(id=self.id, name=self.id),
            spec=types.TaskSpec(session_id=self.session_id, input=self.input, output=self.output),
            status=types.TaskStatus(
                state=self.state,
                creation_time=self.creation_time,
                completion_time=self.completion_time,
                events=self.events if with_events else None,
            ),
        )


@dataclass(eq=False)
class SessionRecord:
    """A session, its tasks, its pending queue and its instances."""

    id: str
    spec: protocol.types.SessionSpec
    state: protocol.types.SessionState = types.Open
    creation_time: int = field(default_factory=now_ms)
    completion_time: int | None = None
    events: list[protocol.types.Event] = field(default_factory=list)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    next_task_id: int = 1
    counts: list[int] = field(default_factory=lambda: [0] * len(types.TaskState.values()))
    pending: deque[TaskRecord] = field(default_factory=deque)
    instances: list[Instance] = field(default_factory=list)  # binding or bound, not leaving
    bind_failures: int = 0
    paused: bool = False
    shim_noted: bool = False  # the session event saying no executor has its shim was added

    def to_proto(self) -> protocol.types.Session:
        """As a message, with exact per-state task counts and the session events."""
        c = self.counts
        return types.Session(
            metadata=types.Metadata(id=self.id, name=self.id),
            spec=self.spec,
            status=types.SessionStatus(
                state=self.state,
                creation_time=self.creation_time,
                completion_time=self.completion_time,
                pending=c[types.Pending],
                running=c[types.Running],
                succeed=c[types.Succeed],
                failed=c[types.Failed],
                cancelled=c[types.Cancelled],
                events=self.events,
            ),
        )


def _validate_application(name: str, spec: protocol.types.ApplicationSpec) -> None:
    """Flame's checks at registration: a name, an absolute working directory, valid schemas.

    Like Flame 0.6, it accepts applications without a command, with a url, and of any shim:
    what cannot run is found when a session binds (or, for a shim no executor has, never).
    """
    if not name:
        raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application name is empty")
    wd = spec.working_directory
    if wd and not os.path.isabs(wd):
        raise FrontendError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"working_directory must be an absolute path, got: {wd}",
        )
    if spec.HasField("schema"):
        for part in ("input", "output", "common_data"):
            if spec.schema.HasField(part):
                try:
                    json.loads(getattr(spec.schema, part))
                except ValueError as err:
                    raise FrontendError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"invalid {part} schema: {err}"
                    ) from None


def _normalised_session_spec(spec: protocol.types.SessionSpec) -> protocol.types.SessionSpec:
    """The spec as Flame keeps it: ``batch_size`` at least 1, min/max instances in whole batches."""
    out = types.SessionSpec()
    out.CopyFrom(spec)
    out.batch_size = max(1, spec.batch_size)
    if not out.HasField("resreq"):
        out.resreq.CopyFrom(DEFAULT_RESREQ)
    batch = out.batch_size
    if batch > 1:
        if out.min_instances % batch:
            raise FrontendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_instances ({out.min_instances}) must be 0 or a multiple of batch_size ({batch})",
            )
        if out.HasField("max_instances") and out.max_instances % batch:
            raise FrontendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_instances ({out.max_instances}) must be a multiple of batch_size ({batch})",
            )
    return out


def _spec_mismatch(ssn: SessionRecord, spec: protocol.types.SessionSpec) -> str | None:
    have = ssn.spec

    def opt_max(s: protocol.types.SessionSpec) -> int | None:
        return s.max_instances if s.HasField("max_instances") else None

    checks = [
        ("application", have.application, spec.application),
        ("resreq", have.resreq, spec.resreq),
        ("min_instances", have.min_instances, spec.min_instances),
        ("max_instances", opt_max(have), opt_max(spec)),
        ("batch_size", have.batch_size, spec.batch_size),
        ("priority", have.priority, spec.priority),
    ]
    for name, expected, got in checks:
        if expected != got:
            show = (lambda r: str(r).replace("\n", " ").strip() or "{}") if name == "resreq" else repr
            return (
                f"session <{ssn.id}> spec mismatch: {name} differs "
                f"(expected {show(expected)}, got {show(got)})"
            )
    return None


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
        self.applications: dict[str, ApplicationRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        self.executors: dict[str, Instance] = {}  # every live process, leaving ones too
        self.stopping = False
        self._background: set[asyncio.Task[Any]] = set()
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._bind_tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, TaskRecord] = {}  # executor id -> its task
        self.installer = Installer(state_dir)  # applications with a url, installed on first bind

    # -- applications ----------------------------------------------------------------------

    def register_default_applications(self) -> None:
        """Register Flame's defaults (``flmrun``, ``flmexec``, ``flmping``) and flame-magic's runner.

        They run on this Python: ``flmrun`` is flamepy's runner, installed with flame-magic;
        ``flmexec`` and ``flmping`` are our servers with the task contracts of Flame's; and
        flame-magic's runner is ``flame-magic``, starting in the notebook's directory.
        """
        for name, spec in default_applications(self.working_directory).items():
            self.register_application(name, spec)

    def register_application(self, name: str, spec: protocol.types.ApplicationSpec) -> None:
        """Register a Host-shim application; its working_directory must be absolute."""
        _validate_application(name, spec)
        if name in self.applications:
            raise FrontendError(grpc.StatusCode.ALREADY_EXISTS, f"application <{name}> already exists")
        self.applications[name] = ApplicationRecord(name=name, spec=spec)
        log.info("registered application %s: %s %s", name, spec.command, list(spec.arguments))
        if spec.shim != types.Host:
            log.warning(
                "application %s asks for the %s shim: the embedded Flame has only Host executors, "
                "so the tasks of its sessions stay pending",
                name,
                types.Shim.Name(spec.shim),
            )

    def _open_sessions_of(self, name: str) -> int:
        return sum(1 for s in self.sessions.values() if s.spec.application == name and s.state == types.Open)

    def _get_application(self, name: str) -> ApplicationRecord:
        app = self.applications.get(name)
        if app is None:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"application <{name}> not found")
        return app

    def unregister_application(self, name: str) -> None:
        """Remove an application without open sessions, and its closed sessions."""
        self._get_application(name)
        count = self._open_sessions_of(name)
        if count:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{count} open sessions in the application <{name}>; close them first",
            )
        del self.applications[name]
        self.installer.forget(name)
        # As Flame does, the application's closed sessions go with it.
        for sid in [s.id for s in self.sessions.values() if s.spec.application == name]:
            del self.sessions[sid]
        log.info("unregistered application %s", name)

    def update_application(self, name: str, spec: protocol.types.ApplicationSpec) -> None:
        """Replace the spec of an application without open sessions."""
        app = self._get_application(name)
        _validate_application(name, spec)
        count = self._open_sessions_of(name)
        if count:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{count} open sessions in the application <{name}>; close them first",
            )
        app.spec = spec
        self.installer.forget(name)

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
        app = self._get_application(spec.application)
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
        ssn = SessionRecord(id=session_id, spec=_normalised_session_spec(spec))
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
            mismatch = _spec_mismatch(ssn, _normalised_session_spec(spec))
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
        return ssn

    def _evict_closed_sessions(self) -> None:
        closed = [s for s in self.sessions.values() if s.state == types.Closed]
        if len(closed) <= MAX_CLOSED_SESSIONS:
            return
        closed.sort(key=lambda s: s.completion_time or s.creation_time)
        for ssn in closed[: len(closed) - MAX_CLOSED_SESSIONS]:
            del self.sessions[ssn.id]

    # -- tasks -----------------------------------------------------------------------------

    def create_task(self, session_id: str, data: bytes | None) -> TaskRecord:
        """Add a Pending task (ids 1, 2, ... per session) and dispatch it at once if possible."""
        ssn = self.get_session(session_id)
        if ssn.state != types.Open:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session <{session_id}> is closed; it accepts no new tasks",
            )
        task = TaskRecord(id=str(ssn.next_task_id), session_id=session_id, input=data)
        ssn.next_task_id += 1
        ssn.tasks[task.id] = task
        ssn.counts[types.Pending] += 1
        task.events.append(_event(types.Pending, "Task was created with state <Pending>"))
        ssn.pending.append(task)
        self._schedule(ssn)
        return task

    def get_task(self, session_id: str, task_id: str) -> TaskRecord:
        """The task of a session."""
        task = self.get_session(session_id).tasks.get(task_id)
        if task is None:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"task <{session_id}/{task_id}> not found")
        return task

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
        task.events.append(_event(state, message))
        if task.watchers:
            msg = task.to_proto(with_events=False)
            for queue in task.watchers:
                queue.put_nowait(msg)

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
            ssn.events.append(_event(EVENT_NO_EXECUTOR, message))
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

    def _launch(self, ssn: SessionRecord) -> None:
        app = self.applications[ssn.spec.application]
        inst = Instance(
            executor_id=uuid.uuid4().hex[:12],
            app_name=app.name,
            app_spec=app.spec,
            session_id=ssn.id,
            common_data=ssn.spec.common_data if ssn.spec.HasField("common_data") else None,
            state_dir=self.state_dir,
            frontend_endpoint=self.endpoint,
            cache_endpoint=self.cache_endpoint,
            cache_storage=self.cache_storage,
            installer=self.installer,
        )
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
        ssn.events.append(_event(protocol.EVENT_BIND_FAILED, message))
        if ssn.bind_failures >= BIND_RETRY_LIMIT:
            ssn.paused = True
            ssn.events.append(
                _event(
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
        await asyncio.gather(
            *(inst.release(leave_timeout=1.0, grace=1.0) for inst in list(self.executors.values())),
            return_exceptions=True,
        )
        self.executors.clear()

    # -- nodes -----------------------------------------------------------------------------

    def node(self) -> protocol.types.Node:
        """This machine as Flame's only node."""
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 0
        capacity = types.ResourceRequirement(cpu=node_cpus(), memory=memory, gpu=0)
        return types.Node(
            metadata=types.Metadata(id=self.node_name, name=self.node_name),
            spec=types.NodeSpec(hostname=self.node_name),
            status=types.NodeStatus(
                state=types.Ready,
                capacity=capacity,
                allocatable=capacity,
                info=types.NodeInfo(arch=platform.machine(), os=platform.system().lower()),
                last_heartbeat_time=now_ms(),
            ),
        )


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _unary(
    method: Callable[[Any, _Req], _Resp],
) -> Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
    """Run a synchronous handler on the loop and turn FrontendError into a gRPC status."""

    @functools.wraps(method)
    async def handler(self: Any, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return method(self, request)
        except FrontendError as err:
            await context.abort(err.code, err.message)
            raise  # unreachable: abort raises

    return handler


def _ok() -> protocol.types.Result:
    return types.Result(return_code=0)


class FrontendService(protocol.FrontendServicer):
    """``flame.v1.Frontend`` over a :class:`SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager

    @_unary
    def RegisterApplication(self, request: Any) -> protocol.types.Result:
        if not request.HasField("application"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application spec is missing")
        self.m.register_application(request.name, request.application)
        return _ok()

    @_unary
    def UnregisterApplication(self, request: Any) -> protocol.types.Result:
        self.m.unregister_application(request.name)
        return _ok()

    @_unary
    def UpdateApplication(self, request: Any) -> protocol.types.Result:
        if not request.HasField("application"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application spec is missing")
        self.m.update_application(request.name, request.application)
        return _ok()

    @_unary
    def GetApplication(self, request: Any) -> protocol.types.Application:
        return self.m._get_application(request.name).to_proto()

    @_unary
    def ListApplication(self, request: Any) -> protocol.types.ApplicationList:
        return types.ApplicationList(applications=[a.to_proto() for a in self.m.applications.values()])

    @_unary
    def ListExecutor(self, request: Any) -> protocol.types.ExecutorList:
        executors = []
        for inst in self.m.executors.values():
            ssn = self.m.sessions.get(inst.session_id)
            resreq = ssn.spec.resreq if ssn is not None else DEFAULT_RESREQ
            executors.append(inst.to_proto(self.m.node_name, resreq))
        return types.ExecutorList(executors=executors)

    @_unary
    def ListNodes(self, request: Any) -> protocol.types.NodeList:
        return types.NodeList(nodes=[self.m.node()])

    @_unary
    def GetNode(self, request: Any) -> protocol.frontend.GetNodeResponse:
        if request.name != self.m.node_name:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"node <{request.name}> not found")
        return frontend.GetNodeResponse(node=self.m.node())

    @_unary
    def CreateSession(self, request: Any) -> protocol.types.Session:
        if not request.HasField("session"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "session spec is missing")
        return self.m.create_session(request.session_id, request.session).to_proto()

    @_unary
    def OpenSession(self, request: Any) -> protocol.types.Session:
        spec = request.session if request.HasField("session") else None
        return self.m.open_session(request.session_id, spec).to_proto()

    @_unary
    def CloseSession(self, request: Any) -> protocol.types.Session:
        return self.m.close_session(request.session_id).to_proto()

    @_unary
    def DeleteSession(self, request: Any) -> protocol.types.Session:
        return self.m.delete_session(request.session_id).to_proto()

    @_unary
    def GetSession(self, request: Any) -> protocol.types.Session:
        return self.m.get_session(request.session_id).to_proto()

    @_unary
    def ListSession(self, request: Any) -> protocol.types.SessionList:
        return types.SessionList(sessions=[s.to_proto() for s in self.m.sessions.values()])

    @_unary
    def CreateTask(self, request: Any) -> protocol.types.Task:
        if not request.HasField("task"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "task spec is missing")
        spec = request.task
        data = spec.input if spec.HasField("input") else None
        return self.m.create_task(spec.session_id, data).to_proto(with_events=False)

    @_unary
    def GetTask(self, request: Any) -> protocol.types.Task:
        return self.m.get_task(request.session_id, request.task_id).to_proto(with_events=True)

    async def WatchTask(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.types.Task]:
        try:
            task = self.m.get_task(request.session_id, request.task_id)
        except FrontendError as err:
            await context.abort(err.code, err.message)
        # Register before sending the current state, so no change can fall in between.
        queue: asyncio.Queue[protocol.types.Task] = asyncio.Queue()
        task.watchers.append(queue)
        try:
            last = task.state
            yield task.to_proto(with_events=False)
            while last not in _TERMINAL:
                msg = await queue.get()
                if msg.status.state != last:
                    last = msg.status.state
                    yield msg
        finally:
            task.watchers.remove(queue)

    async def ListTask(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.types.Task]:
        try:
            ssn = self.m.get_session(request.session_id)
        except FrontendError as err:
            await context.abort(err.code, err.message)
        for task in list(ssn.tasks.values()):
            yield task.to_proto(with_events=False)
