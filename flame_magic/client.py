"""A client of Flame's ``Frontend`` service, the same for a cluster and the embedded Flame."""

from __future__ import annotations

import itertools
import secrets
import string
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.experimental

from flame_magic.errors import FlameError, SessionGoneError, SessionStartError, WaitStopped
from flame_magic.protocol import (
    EVENT_BIND_FAILED,
    EVENT_SESSION_PAUSED,
    EVENT_TASK_FAILED,
    MAX_MESSAGE_BYTES,
    TERMINAL_TASK_STATES,
    FrontendStub,
    frontend,
    types,
)
from flame_magic.wire import LIVE_POLL

Req = TypeVar("Req")
Reply = TypeVar("Reply")

# A watch is re-opened after these many seconds, then every last one, to notice
# sessions that cannot start (their tasks would otherwise stay Pending forever).
# Flame's own WatchTask says nothing until the next change, so a task that ended
# before the watch opened is found by the GetTask after the first, short slice.
WATCH_SLICES_SECONDS = (0.25, 1.0)
TICK_SECONDS = LIVE_POLL

# Every streamed Task carries its input and its output, each up to Flame's limit:
# this side's receive limit is ours to set, and must hold both.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2 * MAX_MESSAGE_BYTES + 1024 * 1024),
    # WatchTask on the calling thread: no helper thread started per watch (~0.15 ms a cell).
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


# Seconds any unary call may take: a session manager that accepts connections but never
# answers must fail a cell, not hang it.
CALL_TIMEOUT_SECONDS = 30.0

# The application asked for when probing an endpoint; Flame answers NOT_FOUND.
PROBE_APPLICATION = "flame-magic-probe"


def new_session_id(application: str) -> str:
    """A session id in flamepy's form, ``<app>-<6 random alphanumerics>``."""
    alphabet = string.ascii_lowercase + string.digits
    return f"{application}-{''.join(secrets.choice(alphabet) for _ in range(6))}"


def open_channel(endpoint: str, ca_file: str | None = None) -> grpc.Channel:
    """A gRPC channel for ``http://``, ``https://`` or ``unix://`` Flame endpoints."""
    if endpoint.startswith("unix:"):
        return grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FlameError(
            f"Cannot use Flame endpoint {endpoint!r}: expected http://HOST:PORT, "
            "https://HOST:PORT or unix:///PATH."
        )
    address = f"{parts.hostname}:{parts.port or 8080}"
    if parts.scheme == "http":
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    root = None
    if ca_file:
        try:
            with open(ca_file, "rb") as handle:
                root = handle.read()
        except OSError as exc:
            raise FlameError(f"Cannot read the CA file {ca_file!r} for {endpoint}: {exc}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class FlameClient:
    """Calls to one Flame session manager, with gRPC errors turned into clear messages.

    Parameters
    ----------
    endpoint
        The session manager's Frontend endpoint.
    ca_file
        CA certificate for ``https://`` endpoints.
    """

    def __init__(self, endpoint: str, ca_file: str | None = None) -> None:
        self.endpoint = endpoint
        self.ca_file = ca_file
        self._channel = open_channel(endpoint, ca_file)
        self._stub = FrontendStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Fail within ``timeout`` seconds, naming the endpoint, unless a Flame session manager answers.

        One cheap Frontend call, not a wait for the channel: a refused connection, a server
        that does not speak gRPC or TLS as configured, or a gRPC server that is not Flame each
        fail at once with gRPC's reason, instead of being retried until the timeout.
        """
        probe = frontend.GetApplicationRequest(name=PROBE_APPLICATION)
        try:
            self._stub.GetApplication(probe, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return  # a Flame that has no such application: the expected answer
            where = (
                "Check that the session manager runs and the endpoint is right (FLAME_ENDPOINT, "
                "~/.flame/flame.yaml, or `%flame connect ENDPOINT`)."
            )
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"no answer within {timeout:g} s"
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                reason = "the server there speaks gRPC but is not a Flame session manager"
                where = "Use the session manager's Frontend endpoint (port 8080 by default)."
            else:
                reason = exc.details() or code.name
                if self.endpoint.startswith("https:") and ("Tls" in reason or "SSL" in reason):
                    ca = f"the CA file {self.ca_file}" if self.ca_file else "the system's CA certificates"
                    where = (
                        f"The TLS handshake failed with {ca}: name the cluster's CA with FLAME_CA_FILE, "
                        "the context's tls.ca_file, or `%flame connect ENDPOINT --ca-file PATH`."
                    )
            raise FlameError(f"Cannot reach Flame at {self.endpoint}: {reason}. {where}") from None

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Req, Reply], request: Req, what: str) -> Reply:
        try:
            return method(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None

    def _error(self, exc: grpc.RpcError, what: str) -> FlameError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return FlameError(f"Flame at {self.endpoint} is unavailable while trying to {what}: {details}")
        name = code.name if code is not None else "ERROR"
        return FlameError(f"Flame at {self.endpoint} refused to {what} ({name}): {details}")

    # Applications

    def get_application(self, name: str) -> types.Application | None:
        """The application, or None when Flame has none by that name."""
        try:
            return self._stub.GetApplication(
                frontend.GetApplicationRequest(name=name), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error(exc, f"get application {name!r}") from None

    def list_applications(self) -> list[types.Application]:
        reply = self._call(self._stub.ListApplication, frontend.ListApplicationRequest(), "list applications")
        return list(reply.applications)

    def list_nodes(self) -> list[types.Node]:
        """Flame's nodes with their capacity (empty when Flame does not say)."""
        try:
            reply = self._stub.ListNodes(frontend.ListNodesRequest(), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return []
            raise self._error(exc, "list nodes") from None
        return list(reply.nodes)

    def list_executors(self) -> list[types.Executor]:
        """Flame's executors: which session each is bound to, and its state."""
        reply = self._call(self._stub.ListExecutor, frontend.ListExecutorRequest(), "list executors")
        return list(reply.executors)

    def register_application(self, name: str, spec: types.ApplicationSpec) -> None:
        request = frontend.RegisterApplicationRequest(name=name, application=spec)
        self._check(self._call(self._stub.RegisterApplication, request, f"register application {name!r}"))

    def update_application(self, name: str, spec: types.ApplicationSpec) -> None:
        request = frontend.UpdateApplicationRequest(name=name, application=spec)
        self._check(self._call(self._stub.UpdateApplication, request, f"update application {name!r}"))

    def unregister_application(self, name: str) -> None:
        request = frontend.UnregisterApplicationRequest(name=name)
        self._check(self._call(self._stub.UnregisterApplication, request, f"unregister application {name!r}"))

    @staticmethod
    def _check(result: types.Result) -> None:
        if result.return_code != 0:
            raise FlameError(result.message)

    # Sessions

    def open_session(self, session_id: str, spec: types.SessionSpec) -> types.Session:
        request = frontend.OpenSessionRequest(session_id=session_id, session=spec)
        return self._call(self._stub.OpenSession, request, f"open session {session_id!r}")

    def get_session(self, session_id: str) -> types.Session:
        request = frontend.GetSessionRequest(session_id=session_id)
        return self._call(self._stub.GetSession, request, f"get session {session_id!r}")

    def list_sessions(self) -> list[types.Session]:
        reply = self._call(self._stub.ListSession, frontend.ListSessionRequest(), "list sessions")
        return list(reply.sessions)

    def close_session(self, session_id: str) -> types.Session:
        request = frontend.CloseSessionRequest(session_id=session_id)
        return self._call(self._stub.CloseSession, request, f"close session {session_id!r}")

    # Tasks

    def create_task(self, session_id: str, task_input: bytes) -> types.Task:
        request = frontend.CreateTaskRequest(task=types.TaskSpec(session_id=session_id, input=task_input))
        return self._call(self._stub.CreateTask, request, f"create a task in session {session_id!r}")

    def create_tasks(self, session_id: str, inputs: Iterable[bytes], depth: int = 16) -> Iterator[types.Task]:
        """Create one task per input, yielded in input order, with up to ``depth`` calls in flight."""
        requests = (
            frontend.CreateTaskRequest(task=types.TaskSpec(session_id=session_id, input=data))
            for data in inputs
        )
        return self._pipelined(
            self._stub.CreateTask, requests, f"create a task in session {session_id!r}", depth
        )

    def get_tasks(self, session_id: str, task_ids: Iterable[str], depth: int = 16) -> Iterator[types.Task]:
        """GetTask for each id, yielded in order, with up to ``depth`` calls in flight."""
        requests = (frontend.GetTaskRequest(task_id=task_id, session_id=session_id) for task_id in task_ids)
        return self._pipelined(self._stub.GetTask, requests, f"get the tasks of {session_id!r}", depth)

    def _pipelined(
        self, method: grpc.UnaryUnaryMultiCallable[Req, Reply], requests: Iterable[Req], what: str, depth: int
    ) -> Iterator[Reply]:
        """Results of unary calls made ``depth`` at a time (one at a time would leave Flame idle
        for a round trip per call)."""
        calls: deque[grpc.Future[Reply]] = deque()
        try:
            for request in requests:
                calls.append(method.future(request, timeout=CALL_TIMEOUT_SECONDS))
                if len(calls) >= depth:
                    yield self._outcome(calls.popleft(), what)
            while calls:
                yield self._outcome(calls.popleft(), what)
        finally:
            for call in calls:  # the caller stopped early: what Flame has not received is not done
                call.cancel()

    def _outcome(self, call: grpc.Future[Reply], what: str) -> Reply:
        try:
            return call.result()
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None

    def get_task(self, session_id: str, task_id: str) -> types.Task:
        request = frontend.GetTaskRequest(task_id=task_id, session_id=session_id)
        return self._call(self._stub.GetTask, request, f"get task {task_id} of {session_id!r}")

    def wait_task(
        self,
        session_id: str,
        task_id: str,
        stop: threading.Event | None = None,
        tick: Callable[[], None] | None = None,
        pending: Callable[[], None] | None = None,
        tick_seconds: float = TICK_SECONDS,
    ) -> types.Task:
        """Follow a task to its terminal state and return it, with its events if it failed.

        While the task waits, the session's events are checked so that an
        application that cannot start fails the wait instead of hanging it.
        When ``stop`` is set, the wait ends (within a second) with :class:`WaitStopped`.
        ``tick``, if given, is called about every ``tick_seconds`` while the task runs
        (the notebook shows the cell's live output with it). ``pending``, if given, is
        called after each slice in which the task was still Pending; what it raises ends
        the wait (see :class:`flame_magic.runners.PendingWatch`).
        """
        started_ms = int(time.time() * 1000) - 1000
        for attempt in itertools.count():
            if stop is not None and stop.is_set():
                raise WaitStopped(f"stopped waiting for task {task_id} of {session_id!r}")
            if tick is not None:
                if attempt:  # a cell done within the first slice never ticks (no cache calls)
                    tick()
                slice_seconds = tick_seconds
            else:
                slice_seconds = WATCH_SLICES_SECONDS[min(attempt, len(WATCH_SLICES_SECONDS) - 1)]
            task = self._watch_slice(session_id, task_id, slice_seconds)
            if task is not None and task.status.state in TERMINAL_TASK_STATES:
                if task.status.state != types.Succeed:
                    # Flame fills events (the failure message) only through GetTask.
                    task = self.get_task(session_id, task_id)
                return task
            if task is None or task.status.state == types.Pending:
                self._raise_if_session_cannot_start(session_id, started_ms)
                if pending is not None:
                    pending()
        raise AssertionError("unreachable")

    def _watch_slice(self, session_id: str, task_id: str, seconds: float) -> types.Task | None:
        """The newest state seen within one watch slice (None when nothing came)."""
        request = frontend.WatchTaskRequest(task_id=task_id, session_id=session_id)
        last = None
        stream = self._stub.WatchTask(request, timeout=seconds)
        try:
            for last in stream:
                if last.status.state in TERMINAL_TASK_STATES:
                    # Read on to the stream's end (Flame ends it after a terminal state): a call
                    # left unfinished keeps about 18 KB of gRPC's memory for good, every cell.
                    for _ in stream:
                        pass
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._error(exc, f"watch task {task_id} of {session_id!r}") from None
        finally:
            stream.cancel()
        if last is None or last.status.state not in TERMINAL_TASK_STATES:
            # A watch that opened after the last change may say nothing: ask directly.
            last = self.get_task(session_id, task_id)
        return last

    def _raise_if_session_cannot_start(self, session_id: str, since_ms: int) -> None:
        try:
            session = self._stub.GetSession(
                frontend.GetSessionRequest(session_id=session_id), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise SessionGoneError(
                    f"Session {session_id!r} was deleted from Flame while its task waited."
                ) from None
            raise self._error(exc, f"get session {session_id!r}") from None
        if session.status.state == types.Closed:
            raise SessionGoneError(f"Session {session_id!r} was closed while its task waited.")
        failures = [
            event
            for event in session.status.events
            if event.code in (EVENT_BIND_FAILED, EVENT_SESSION_PAUSED) and event.creation_time >= since_ms
        ]
        if failures:
            messages = [e.message for e in failures if e.code == EVENT_BIND_FAILED and e.message]
            reason = messages[-1] if messages else failures[-1].message
            raise SessionStartError(
                f"The application of session {session_id!r} could not start: {reason or 'no reason given'}"
            )


def failure_message(task: types.Task) -> str:
    """The message Flame recorded for a failed task (event code 3), if any."""
    # Flame records every state change as an event; only code 3 carries the failure.
    messages = [e.message for e in task.status.events if e.code == EVENT_TASK_FAILED and e.message]
    return messages[-1] if messages else ""
