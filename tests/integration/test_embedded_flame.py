"""The embedded Flame, driven as a client sees it: real processes, real gRPC.

Each test talks to an embedded Flame through ``protocol.FrontendStub`` and checks what a
Flame client would see (messages, states, events, gRPC status codes), with
``apps/echo_app.py`` as the application.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flame_magic import applications, protocol
from flame_magic.embedded import EmbeddedFlame
from flame_magic.embedded.session_manager import EVENT_NO_EXECUTOR

types = protocol.types
fe = protocol.frontend

ECHO_APP = Path(__file__).parent / "apps" / "echo_app.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
CODE = grpc.StatusCode


# -- helpers -------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that.

    ``timeout`` is a guard against a hang, not a speed limit: keep it generous.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before or while reading
        return False


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """Run a call that must fail and return its error."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def echo_spec(tmp_path: Path, **overrides: Any) -> protocol.types.ApplicationSpec:
    """The echo application, run by this interpreter."""
    spec = types.ApplicationSpec(
        shim=types.Host,
        description="echo app for tests",
        command=sys.executable,
        arguments=[str(ECHO_APP), "--tag", "${ECHO_TAG}"],
        environments=[types.Environment(name="ECHO_TAG", value="tag-from-app-env")],
        working_directory=str(tmp_path),
    )
    for key, value in overrides.items():
        if isinstance(value, list):
            del getattr(spec, key)[:]
            getattr(spec, key).extend(value)
        else:
            setattr(spec, key, value)
    return spec


def session_spec(app: str, **kw: Any) -> protocol.types.SessionSpec:
    """A session spec for ``app``."""
    return types.SessionSpec(application=app, **kw)


def watch(stub: protocol.FrontendStub, sid: str, tid: str, timeout: float = 90) -> list[protocol.types.Task]:
    """All messages of a WatchTask stream, to its end."""
    return list(stub.WatchTask(fe.WatchTaskRequest(session_id=sid, task_id=tid), timeout=timeout))


def run_task(
    stub: protocol.FrontendStub, sid: str, data: bytes
) -> tuple[list[protocol.types.Task], protocol.types.Task]:
    """Create a task, watch it to the end, and fetch it with events."""
    task = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=data)))
    stream = watch(stub, sid, task.metadata.id)
    final = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=task.metadata.id))
    return stream, final


def meet(directory: Path, count: int) -> bytes:
    """The echo app's input for a task that waits until ``count`` processes run such tasks."""
    directory.mkdir(exist_ok=True)
    return f"meet:{directory}:{count}".encode()


def executors_of(stub: protocol.FrontendStub, sid: str) -> list[protocol.types.Executor]:
    """The executors Flame lists for a session (a released one stays listed until its release ends)."""
    return [e for e in stub.ListExecutor(fe.ListExecutorRequest()).executors if e.status.session_id == sid]


def task_json(task: protocol.types.Task) -> dict[str, Any]:
    """The echo app's JSON output of a task."""
    assert task.status.state == types.Succeed, task
    return json.loads(task.spec.output)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flame(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFlame]:
    """One embedded Flame for the module."""
    with EmbeddedFlame.start(working_directory=str(tmp_path_factory.mktemp("flmrun-cwd"))) as f:
        yield f


@pytest.fixture(scope="module")
def stub(flame: EmbeddedFlame) -> Iterator[protocol.FrontendStub]:
    """A Frontend client of that Flame."""
    with grpc.insecure_channel(flame.endpoint) as channel:
        yield protocol.FrontendStub(channel)


@pytest.fixture
def echo_app(stub: protocol.FrontendStub, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """Register the echo application under a fresh name; close its sessions and unregister after."""
    name = "echo-" + re.sub(r"\W", "-", request.node.name)[:40]
    result = stub.RegisterApplication(
        fe.RegisterApplicationRequest(name=name, application=echo_spec(tmp_path))
    )
    assert result.return_code == 0
    yield name
    for ssn in stub.ListSession(fe.ListSessionRequest()).sessions:
        if ssn.spec.application == name and ssn.status.state == types.Open:
            wait_for(functools.partial(_try_close, stub, ssn.metadata.id), timeout=30)
    stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def _try_close(stub: protocol.FrontendStub, sid: str) -> bool:
    try:
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    except grpc.RpcError:
        return False  # a task is still running
    return True


def open_session(stub: protocol.FrontendStub, app: str, sid: str = "", **kw: Any) -> str:
    """Create a session of ``app``; return its id."""
    return stub.CreateSession(
        fe.CreateSessionRequest(session_id=sid, session=session_spec(app, **kw))
    ).metadata.id


# -- applications --------------------------------------------------------------------------


def test_default_applications(stub: protocol.FrontendStub, flame: EmbeddedFlame) -> None:
    """Flame's three defaults, as Flame registers them, and flame-magic's runner under its own name."""
    names = [a.metadata.name for a in stub.ListApplication(fe.ListApplicationRequest()).applications]
    assert {protocol.FLMRUN, "flmexec", "flmping", applications.DEFAULT_NAME} <= set(names)

    flmrun = stub.GetApplication(fe.GetApplicationRequest(name=protocol.FLMRUN))
    assert flmrun.status.state == types.Enabled and flmrun.status.creation_time > 0
    assert flmrun.spec.command == sys.executable
    assert list(flmrun.spec.arguments) == ["-m", "flamepy.runner.runpy"]
    assert flmrun.spec.installer == "python" and not flmrun.spec.HasField("url")
    assert not flmrun.spec.working_directory  # a directory per executor, as on Flame
    assert applications.is_stock_runner(flmrun.spec) and not applications.is_our_runner(flmrun.spec)

    ours = stub.GetApplication(fe.GetApplicationRequest(name=applications.DEFAULT_NAME))
    assert ours.spec.shim == types.Host and applications.is_our_runner(ours.spec)
    assert ours.spec.command == sys.executable
    assert list(ours.spec.arguments) == ["-m", "flame_magic_runner"]
    assert ours.spec.delay_release == 600
    assert os.path.isabs(ours.spec.working_directory) and "flmrun-cwd" in ours.spec.working_directory

    flmexec = stub.GetApplication(fe.GetApplicationRequest(name="flmexec"))
    assert json.loads(flmexec.spec.schema.input)["required"] == ["language", "code"]


def test_application_lifecycle_and_errors(stub: protocol.FrontendStub, tmp_path: Path) -> None:
    name = "echo-lifecycle"
    spec = echo_spec(tmp_path, max_instances=3)
    assert (
        stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec)).return_code == 0
    )

    names = [a.metadata.name for a in stub.ListApplication(fe.ListApplicationRequest()).applications]
    assert protocol.FLMRUN in names and name in names
    app = stub.GetApplication(fe.GetApplicationRequest(name=name))
    assert app.spec.command == sys.executable and app.spec.max_instances == 3
    assert app.spec.delay_release == 60  # Flame's default, reported as Flame reports it
    assert [(e.name, e.value) for e in app.spec.environments] == [("ECHO_TAG", "tag-from-app-env")]

    dup = rpc_error(
        lambda: stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    )
    assert dup.code() == CODE.ALREADY_EXISTS and name in dup.details()
    relative = echo_spec(tmp_path, working_directory="relative/dir")
    bad = rpc_error(
        lambda: stub.RegisterApplication(fe.RegisterApplicationRequest(name="x", application=relative))
    )
    assert bad.code() == CODE.INVALID_ARGUMENT and "absolute" in bad.details()
    missing = rpc_error(lambda: stub.GetApplication(fe.GetApplicationRequest(name="no-such-app")))
    assert missing.code() == CODE.NOT_FOUND and "no-such-app" in missing.details()

    # Update and unregister are refused while a session is open.
    sid = open_session(stub, name)
    busy = rpc_error(lambda: stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name)))
    assert busy.code() == CODE.FAILED_PRECONDITION and "open session" in busy.details()
    busy = rpc_error(lambda: stub.UpdateApplication(fe.UpdateApplicationRequest(name=name, application=spec)))
    assert busy.code() == CODE.FAILED_PRECONDITION
    stub.CloseSession(fe.CloseSessionRequest(session_id=sid))

    updated = echo_spec(tmp_path, max_instances=1, description="updated")
    assert (
        stub.UpdateApplication(fe.UpdateApplicationRequest(name=name, application=updated)).return_code == 0
    )
    assert stub.GetApplication(fe.GetApplicationRequest(name=name)).spec.description == "updated"

    assert stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name)).return_code == 0
    gone = rpc_error(lambda: stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name)))
    assert gone.code() == CODE.NOT_FOUND
    # Its closed sessions went with it, as on Flame.
    assert rpc_error(lambda: stub.GetSession(fe.GetSessionRequest(session_id=sid))).code() == CODE.NOT_FOUND


def test_nodes(stub: protocol.FrontendStub) -> None:
    nodes = stub.ListNodes(fe.ListNodesRequest()).nodes
    assert len(nodes) == 1
    node = nodes[0]
    assert node.spec.hostname and node.status.state == types.Ready
    assert node.status.capacity.cpu == os.cpu_count() and node.status.capacity.memory > 0
    assert node.status.info.arch and node.status.info.os
    got = stub.GetNode(fe.GetNodeRequest(name=node.metadata.name)).node
    assert got.metadata.name == node.metadata.name
    assert rpc_error(lambda: stub.GetNode(fe.GetNodeRequest(name="elsewhere"))).code() == CODE.NOT_FOUND


# -- sessions ------------------------------------------------------------------------------


def test_session_lifecycle_and_errors(stub: protocol.FrontendStub, echo_app: str) -> None:
    created = stub.CreateSession(fe.CreateSessionRequest(session=session_spec(echo_app, common_data=b"cd")))
    sid = created.metadata.id
    assert re.fullmatch(re.escape(echo_app) + r"-[A-Za-z0-9]{6}", sid)
    assert created.status.state == types.Open and created.status.creation_time > 0
    assert not created.status.HasField("completion_time")
    assert created.spec.common_data == b"cd" and created.spec.batch_size == 1
    assert created.spec.resreq.cpu == 1 and created.spec.resreq.memory == 1024**3  # Flame's default

    taken = rpc_error(lambda: open_session(stub, echo_app, sid))
    assert taken.code() == CODE.ALREADY_EXISTS
    unknown_app = rpc_error(lambda: open_session(stub, "no-such-app"))
    assert unknown_app.code() == CODE.NOT_FOUND and "no-such-app" in unknown_app.details()
    no_spec = rpc_error(lambda: stub.CreateSession(fe.CreateSessionRequest(session_id="x")))
    assert no_spec.code() == CODE.INVALID_ARGUMENT

    # OpenSession returns the open session when the spec matches (common_data is not compared) ...
    same = stub.OpenSession(
        fe.OpenSessionRequest(session_id=sid, session=session_spec(echo_app, common_data=b"other"))
    )
    assert same.metadata.id == sid and same.spec.common_data == b"cd"
    assert stub.OpenSession(fe.OpenSessionRequest(session_id=sid)).metadata.id == sid
    # ... refuses a different one ...
    for spec in (
        session_spec(echo_app, min_instances=1),
        session_spec(echo_app, max_instances=2),
        session_spec(echo_app, priority=3),
        session_spec(echo_app, resreq=types.ResourceRequirement(cpu=2, memory=1024**3)),
        session_spec(protocol.FLMRUN),
        session_spec(echo_app, batch_size=2),
    ):
        request = fe.OpenSessionRequest(session_id=sid, session=spec)
        err = rpc_error(functools.partial(stub.OpenSession, request))
        assert err.code() == CODE.INVALID_ARGUMENT and "mismatch" in err.details()
    # ... creates one when given a spec, and cannot open what does not exist without one.
    opened = stub.OpenSession(
        fe.OpenSessionRequest(session_id="made-by-open", session=session_spec(echo_app))
    )
    assert opened.metadata.id == "made-by-open"
    missing = rpc_error(lambda: stub.OpenSession(fe.OpenSessionRequest(session_id="nope")))
    assert missing.code() == CODE.NOT_FOUND

    assert stub.GetSession(fe.GetSessionRequest(session_id=sid)).metadata.id == sid
    listed = {s.metadata.id for s in stub.ListSession(fe.ListSessionRequest()).sessions}
    assert {sid, "made-by-open"} <= listed

    still_open = rpc_error(lambda: stub.DeleteSession(fe.DeleteSessionRequest(session_id=sid)))
    assert still_open.code() == CODE.FAILED_PRECONDITION
    closed = stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    assert closed.status.state == types.Closed and closed.status.HasField("completion_time")
    assert stub.CloseSession(fe.CloseSessionRequest(session_id=sid)).status.state == types.Closed
    reopen = rpc_error(lambda: stub.OpenSession(fe.OpenSessionRequest(session_id=sid)))
    assert reopen.code() == CODE.FAILED_PRECONDITION
    no_task = rpc_error(
        lambda: stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"x")))
    )
    assert no_task.code() == CODE.FAILED_PRECONDITION and "closed" in no_task.details()
    unknown = rpc_error(
        lambda: stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id="nope", input=b"x")))
    )
    assert unknown.code() == CODE.NOT_FOUND

    deleted = stub.DeleteSession(fe.DeleteSessionRequest(session_id=sid))
    assert deleted.metadata.id == sid
    assert rpc_error(lambda: stub.GetSession(fe.GetSessionRequest(session_id=sid))).code() == CODE.NOT_FOUND
    assert (
        rpc_error(lambda: stub.CloseSession(fe.CloseSessionRequest(session_id=sid))).code() == CODE.NOT_FOUND
    )


# -- tasks ---------------------------------------------------------------------------------


def test_tasks_are_kept_on_disk_privately_and_still_returned(
    stub: protocol.FrontendStub, flame: EmbeddedFlame, echo_app: str
) -> None:
    """Inputs and outputs live in the state directory (0600 files), not in the Flame's memory."""
    sid = open_session(stub, echo_app)
    payload = b"kept on disk " * 1000
    _, done = run_task(stub, sid, payload)
    assert done.status.state == types.Succeed
    tasks = Path(flame.state_dir) / "tasks"
    files = [p for p in tasks.rglob("*") if p.is_file()]
    assert files, "no task was written to the state directory"
    assert any(payload in p.read_bytes() for p in files)  # the finished task, input and output
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(
        stat.S_IMODE(p.stat().st_mode) == 0o700 for p in [tasks, *(p for p in tasks.rglob("*") if p.is_dir())]
    )
    got = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=done.metadata.id))
    assert got.spec.input == payload and got.spec.output == payload
    assert [e.code for e in got.status.events] == [types.Pending, types.Running, types.Succeed]
    listed = list(stub.ListTask(fe.ListTaskRequest(session_id=sid)))
    assert [(t.spec.input, t.spec.output) for t in listed] == [(payload, payload)]
    assert [t.status.state for t in watch(stub, sid, done.metadata.id)] == [types.Succeed]


def test_task_succeeds(stub: protocol.FrontendStub, echo_app: str) -> None:
    sid = open_session(stub, echo_app)
    created = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"hello")))
    assert created.metadata.id == "1" and created.status.state == types.Pending
    assert created.spec.session_id == sid and created.spec.input == b"hello"

    stream = watch(stub, sid, "1")
    states = [t.status.state for t in stream]
    assert states[-1] == types.Succeed and states == sorted(set(states))  # each change once, in order
    assert stream[-1].spec.output == b"hello" and stream[-1].spec.input == b"hello"
    assert stream[-1].status.HasField("completion_time")
    assert all(not t.status.events for t in stream)  # as Flame: events only via GetTask

    got = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id="1"))
    assert got.spec.output == b"hello"
    assert [e.code for e in got.status.events] == [types.Pending, types.Running, types.Succeed]

    _, second = run_task(stub, sid, b"again")
    assert second.metadata.id == "2" and second.spec.output == b"again"
    # A watcher that comes after the end gets the final state and the stream ends.
    late = watch(stub, sid, "1")
    assert [t.status.state for t in late] == [types.Succeed]
    assert [t.metadata.id for t in stub.ListTask(fe.ListTaskRequest(session_id=sid))] == ["1", "2"]
    status = stub.GetSession(fe.GetSessionRequest(session_id=sid)).status
    assert (status.pending, status.running, status.succeed, status.failed, status.cancelled) == (
        0,
        0,
        2,
        0,
        0,
    )

    missing = rpc_error(lambda: stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id="99")))
    assert missing.code() == CODE.NOT_FOUND
    missing = rpc_error(lambda: watch(stub, sid, "99"))
    assert missing.code() == CODE.NOT_FOUND
    missing = rpc_error(lambda: list(stub.ListTask(fe.ListTaskRequest(session_id="nope"))))
    assert missing.code() == CODE.NOT_FOUND


def test_failed_task_message_only_in_get_task(stub: protocol.FrontendStub, echo_app: str) -> None:
    sid = open_session(stub, echo_app)
    stream, final = run_task(stub, sid, b"fail please")
    assert stream[-1].status.state == types.Failed
    assert all(not t.status.events for t in stream)
    assert final.status.state == types.Failed and final.spec.output == b"partial"
    failed = [e for e in final.status.events if e.code == protocol.EVENT_TASK_FAILED]
    assert len(failed) == 1 and "echo_app failed on b'fail please'" in failed[0].message
    assert stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.failed == 1


def test_process_death_fails_task_and_next_task_gets_fresh_process(
    stub: protocol.FrontendStub, echo_app: str
) -> None:
    sid = open_session(stub, echo_app)
    _, first = run_task(stub, sid, b"pid")
    pid1 = int(first.spec.output)

    stream, died = run_task(stub, sid, b"die")
    assert stream[-1].status.state == types.Failed
    message = next(e.message for e in died.status.events if e.code == protocol.EVENT_TASK_FAILED)
    assert "died" in message and "exit code 3" in message and f"pid {pid1}" in message
    assert "echo_app: dying on request" in message  # the tail of its log
    log_path = re.search(r"log (\S+\.log)", message)
    assert log_path and Path(log_path.group(1)).is_file()

    _, after = run_task(stub, sid, b"pid")
    assert int(after.spec.output) != pid1
    assert not pid_alive(pid1)


def test_bind_failure_pauses_session_and_tasks_stay_pending(
    stub: protocol.FrontendStub, echo_app: str
) -> None:
    sid = open_session(stub, echo_app, common_data=b"refuse")
    task = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"x")))

    def paused() -> list[protocol.types.Event] | None:
        events = list(stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events)
        return events if any(e.code == protocol.EVENT_SESSION_PAUSED for e in events) else None

    events = wait_for(paused)
    codes = [e.code for e in events]
    assert codes == [protocol.EVENT_BIND_FAILED] * 5 + [protocol.EVENT_SESSION_PAUSED]
    assert "echo_app refuses" in events[0].message and "return_code <12>" in events[0].message
    wait_for(lambda: not executors_of(stub, sid))  # the last refused executor finished releasing
    # A new task asks for an executor at once: paused, the session launches none.
    later = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"y")))
    assert not executors_of(stub, sid)
    assert len(stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events) == 6
    for tid in (task.metadata.id, later.metadata.id):  # not failed for the client
        got = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=tid))
        assert got.status.state == types.Pending


def test_batch_session_starts_tasks_in_full_batches(stub: protocol.FrontendStub, echo_app: str) -> None:
    sid = open_session(stub, echo_app, batch_size=2)
    assert stub.GetSession(fe.GetSessionRequest(session_id=sid)).spec.batch_size == 2
    first = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"env")))
    # A lone task of a batch of two waits, as on Flame: no executor is even started for it.
    assert first.status.state == types.Pending and executors_of(stub, sid) == []
    second = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"env")))
    ends = [watch(stub, sid, t.metadata.id)[-1] for t in (first, second)]
    assert [t.status.state for t in ends] == [types.Succeed, types.Succeed]
    pids = {task_json(t)["pid"] for t in ends}
    assert len(pids) == 2  # the two tasks ran at once, on the batch's two instances

    mismatch = rpc_error(
        lambda: stub.OpenSession(fe.OpenSessionRequest(session_id=sid, session=session_spec(echo_app)))
    )
    assert mismatch.code() == CODE.INVALID_ARGUMENT and "batch_size differs" in mismatch.details()
    unaligned = rpc_error(lambda: open_session(stub, echo_app, batch_size=2, min_instances=1))
    assert unaligned.code() == CODE.INVALID_ARGUMENT and "multiple of batch_size (2)" in unaligned.details()
    stub.CloseSession(fe.CloseSessionRequest(session_id=sid))


def test_instances_are_bounded_by_the_node_when_the_session_sets_no_limit(
    stub: protocol.FrontendStub, tmp_path: Path
) -> None:
    """As Flame places executors by node capacity: an application's "no limit" (a million, as
    a copy of a reported application says) starts no more instances than the CPUs hold."""
    name = "echo-unbounded"
    spec = echo_spec(tmp_path, max_instances=1_000_000)
    stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    try:
        whole_node = types.ResourceRequirement(cpu=os.cpu_count() or 1, memory=1024**3)
        sid = open_session(stub, name, resreq=whole_node)
        tasks = [
            stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"pid")))
            for _ in range(3)
        ]
        assert len(executors_of(stub, sid)) == 1  # one instance holds the node's CPUs
        pids = {int(watch(stub, sid, t.metadata.id)[-1].spec.output) for t in tasks}
        assert len(pids) == 1  # the three tasks took turns on it
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    finally:
        wait_for(lambda: _try_unregister(stub, name))


def test_application_without_command_registers_and_fails_to_bind(stub: protocol.FrontendStub) -> None:
    """As Flame 0.6: registered, listed, and each bind fails (shim creation) until the pause."""
    name = "no-command"
    spec = types.ApplicationSpec(shim=types.Host, description="nothing to start")
    assert (
        stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec)).return_code == 0
    )
    try:
        sid = open_session(stub, name)
        task = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"x")))

        def paused() -> list[protocol.types.Event] | None:
            events = list(stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events)
            return events if any(e.code == protocol.EVENT_SESSION_PAUSED for e in events) else None

        events = wait_for(paused, timeout=30)
        assert [e.code for e in events] == [protocol.EVENT_BIND_FAILED] * 5 + [protocol.EVENT_SESSION_PAUSED]
        assert "return_code <11>" in events[0].message and "has no command" in events[0].message
        got = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=task.metadata.id))
        assert got.status.state == types.Pending
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    finally:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def test_wasm_application_registers_and_its_tasks_stay_pending(
    stub: protocol.FrontendStub, tmp_path: Path
) -> None:
    name = "wasm-app"
    spec = echo_spec(tmp_path, shim=types.Wasm)
    assert (
        stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec)).return_code == 0
    )
    try:
        assert stub.GetApplication(fe.GetApplicationRequest(name=name)).spec.shim == types.Wasm
        sid = open_session(stub, name, min_instances=1)
        task = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"x")))
        ssn = stub.GetSession(fe.GetSessionRequest(session_id=sid))
        assert ssn.status.pending == 1 and executors_of(stub, sid) == []
        (event,) = ssn.status.events
        assert event.code == EVENT_NO_EXECUTOR and "Wasm shim" in event.message and "pending" in event.message
        got = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=task.metadata.id))
        assert got.status.state == types.Pending
        closed = stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
        assert closed.status.cancelled == 1
    finally:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def test_bind_failure_when_command_cannot_start(stub: protocol.FrontendStub, tmp_path: Path) -> None:
    name = "echo-no-such-command"
    spec = echo_spec(tmp_path, command=str(tmp_path / "no-such-command"))
    stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    try:
        sid = open_session(stub, name, min_instances=1)
        events = wait_for(
            lambda: [e for e in stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events],
        )
        assert events[0].code == protocol.EVENT_BIND_FAILED and "no-such-command" in events[0].message
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    finally:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def test_process_dying_at_start_reports_its_log(stub: protocol.FrontendStub, tmp_path: Path) -> None:
    name = "echo-dies-at-start"
    spec = echo_spec(
        tmp_path, command=sys.executable, arguments=["-c", "print('boom at start'); raise SystemExit(4)"]
    )
    stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    try:
        sid = open_session(stub, name, min_instances=1)
        event = wait_for(lambda: list(stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events))[0]
        assert event.code == protocol.EVENT_BIND_FAILED
        assert "exit code 4" in event.message and "boom at start" in event.message
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    finally:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def test_close_cancels_pending_tasks_and_tells_watchers(stub: protocol.FrontendStub, echo_app: str) -> None:
    # A paused session keeps its tasks pending: the only way to have pending tasks to cancel.
    sid = open_session(stub, echo_app, common_data=b"refuse")
    ids = [
        stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"x"))).metadata.id
        for _ in range(2)
    ]
    seen: dict[str, list[int]] = {t: [] for t in ids}
    started = [threading.Event() for _ in ids]

    def follow(tid: str, first: threading.Event) -> None:
        for msg in stub.WatchTask(fe.WatchTaskRequest(session_id=sid, task_id=tid), timeout=90):
            seen[tid].append(msg.status.state)
            first.set()

    watchers = [threading.Thread(target=follow, args=(t, e)) for t, e in zip(ids, started, strict=True)]
    for w in watchers:
        w.start()
    for e in started:
        assert e.wait(60)

    closed = stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    for w in watchers:
        w.join(60)
    assert seen == {t: [types.Pending, types.Cancelled] for t in ids}
    assert (closed.status.pending, closed.status.cancelled) == (0, 2)
    task = stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=ids[0]))
    assert task.status.state == types.Cancelled and task.status.HasField("completion_time")


def test_close_with_running_task_is_refused(
    stub: protocol.FrontendStub, echo_app: str, tmp_path: Path
) -> None:
    sid = open_session(stub, echo_app)
    gate = tmp_path / "go-on"
    task = stub.CreateTask(
        fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=f"wait:{gate}".encode()))
    )
    tid = task.metadata.id
    stream = stub.WatchTask(fe.WatchTaskRequest(session_id=sid, task_id=tid), timeout=90)
    assert next(m for m in stream if m.status.state == types.Running)
    refused = rpc_error(lambda: stub.CloseSession(fe.CloseSessionRequest(session_id=sid)))
    assert refused.code() == CODE.INTERNAL and refused.details() == "Cannot close session with running tasks"
    gate.touch()  # the task ends only now: it was running when the close was refused
    assert [m.status.state for m in stream] == [types.Succeed]
    assert stub.CloseSession(fe.CloseSessionRequest(session_id=sid)).status.state == types.Closed


def test_two_instances_run_two_tasks_in_parallel(
    stub: protocol.FrontendStub, echo_app: str, tmp_path: Path
) -> None:
    sid = open_session(stub, echo_app, max_instances=2)
    ids = [
        stub.CreateTask(
            fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=meet(tmp_path / "meet", 2)))
        ).metadata.id
        for _ in range(4)
    ]
    for tid in ids:
        assert watch(stub, sid, tid)[-1].status.state == types.Succeed
    outs = [task_json(stub.GetTask(fe.GetTaskRequest(session_id=sid, task_id=t))) for t in ids]
    assert all(o["met"] for o in outs)  # the first task of each process waited for the other
    assert len({o["pid"] for o in outs}) == 2  # never more than max_instances processes
    assert all(o["max_concurrent"] == 1 for o in outs)  # never two tasks at once in one process
    overlaps = [
        (a, b)
        for i, a in enumerate(outs)
        for b in outs[i + 1 :]
        if a["start"] < b["end"] and b["start"] < a["end"]
    ]
    assert overlaps and all(a["pid"] != b["pid"] for a, b in overlaps)  # parallel, in two processes
    executors = [
        e for e in stub.ListExecutor(fe.ListExecutorRequest()).executors if e.status.session_id == sid
    ]
    assert len(executors) == 2 and all(e.status.state == types.ExecutorBound for e in executors)


def test_process_environment_and_group(
    stub: protocol.FrontendStub, echo_app: str, flame: EmbeddedFlame, tmp_path: Path
) -> None:
    sid = open_session(stub, echo_app)
    _, task = run_task(stub, sid, b"env")
    out = task_json(task)
    env = out["env"]
    sock = Path(env["FLAME_INSTANCE_ENDPOINT"])
    assert sock.is_socket() and sock.parent.stat().st_mode & 0o777 == 0o700
    assert env["FLAME_ENDPOINT"] == flame.endpoint
    assert env["ECHO_TAG"] == "tag-from-app-env"
    assert out["argv"][1:] == ["--tag", "tag-from-app-env"]  # ${VAR} expanded from the process env
    assert env["FLAME_LOG"] and env["HOME"]
    assert Path(env["TMPDIR"]).is_dir() and env["TMPDIR"].startswith(flame.state_dir)
    assert out["pgid"] == out["pid"] == out["sid"]  # its own process group (and session)
    assert out["cwd"] == str(tmp_path)
    log_file = Path(flame.state_dir) / "logs"
    assert any(log_file.glob("*.log"))


def test_min_instances_prewarm_and_idle_release(stub: protocol.FrontendStub, tmp_path: Path) -> None:
    name = "echo-release"
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = echo_spec(tmp_path, delay_release=1)
    spec.environments.append(types.Environment(name="ECHO_APP_MARKERS", value=str(markers)))
    stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    try:
        # min_instances processes start with the session, before any task.
        warm = open_session(stub, name, min_instances=1)
        wait_for(
            lambda: [
                e
                for e in stub.ListExecutor(fe.ListExecutorRequest()).executors
                if e.status.session_id == warm and e.status.state == types.ExecutorBound
            ]
        )
        stub.CloseSession(fe.CloseSessionRequest(session_id=warm))

        # An idle instance goes after delay_release: OnSessionLeave, then its process ends.
        sid = open_session(stub, name)
        _, task = run_task(stub, sid, b"pid")
        pid = int(task.spec.output)
        assert pid_alive(pid)
        wait_for(lambda: not pid_alive(pid))
        assert (markers / f"{pid}.leave").exists()
        # Its executor is listed until its release ends (socket and directory removed).
        wait_for(lambda: not executors_of(stub, sid))
        _, again = run_task(stub, sid, b"pid")
        assert int(again.spec.output) != pid
    finally:
        # Flame keeps an application with open sessions: close them, also after a failure.
        for ssn in stub.ListSession(fe.ListSessionRequest()).sessions:
            if ssn.spec.application == name and ssn.status.state == types.Open:
                wait_for(functools.partial(_try_close, stub, ssn.metadata.id))
        wait_for(lambda: _try_unregister(stub, name))


def _try_unregister(stub: protocol.FrontendStub, name: str) -> bool:
    try:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))
    except grpc.RpcError:
        return False
    return True


def test_close_session_ends_its_processes(stub: protocol.FrontendStub, echo_app: str) -> None:
    sid = open_session(stub, echo_app)
    _, task = run_task(stub, sid, b"pid")
    pid = int(task.spec.output)
    stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    wait_for(lambda: not pid_alive(pid))


def test_input_over_4_mib_is_rejected(stub: protocol.FrontendStub, echo_app: str) -> None:
    sid = open_session(stub, echo_app)
    big = b"x" * (5 * 1024 * 1024)
    err = rpc_error(
        lambda: stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=big)))
    )
    assert err.code() == CODE.RESOURCE_EXHAUSTED
    # Just under the limit still goes through every hop (a small output: every streamed
    # Task carries input AND output, so together they must stay under 4 MiB to be watched).
    size = 4 * 1024 * 1024 - 1024
    _, task = run_task(stub, sid, b"len:" + b"y" * (size - 4))
    assert task.status.state == types.Succeed and task.spec.output == str(size).encode()


def test_output_over_4_mib_fails_the_task_and_keeps_the_process(
    stub: protocol.FrontendStub, echo_app: str
) -> None:
    sid = open_session(stub, echo_app)
    _, before = run_task(stub, sid, b"pid")
    stream, task = run_task(stub, sid, b"big:" + str(5 * 1024 * 1024).encode())
    assert stream[-1].status.state == types.Failed
    message = next(e.message for e in task.status.events if e.code == protocol.EVENT_TASK_FAILED)
    assert "RESOURCE_EXHAUSTED" in message
    _, after = run_task(stub, sid, b"pid")
    assert after.spec.output == before.spec.output  # the process is fine; only that call failed


# -- the process as a whole ----------------------------------------------------------------


def _session_pids(stub: protocol.FrontendStub, sid: str, count: int, meeting: Path) -> set[int]:
    """Run ``count`` tasks that wait for each other, so ``count`` instances run them; their pids."""
    task = types.TaskSpec(session_id=sid, input=meet(meeting, count))
    ids = [stub.CreateTask(fe.CreateTaskRequest(task=task)).metadata.id for _ in range(count)]
    outs = [task_json(watch(stub, sid, t)[-1]) for t in ids]
    assert all(o["met"] for o in outs), outs
    return {o["pid"] for o in outs}


def test_start_and_stop_leave_nothing_behind(tmp_path: Path) -> None:
    flame = EmbeddedFlame.start(working_directory=str(tmp_path))
    # Its own process group: Jupyter interrupts a kernel by signalling the kernel's group.
    assert os.getpgid(flame.pid) == flame.pid != os.getpgid(0)
    with grpc.insecure_channel(flame.endpoint) as channel:
        stub = protocol.FrontendStub(channel)
        stub.RegisterApplication(fe.RegisterApplicationRequest(name="echo", application=echo_spec(tmp_path)))
        pids = _session_pids(stub, open_session(stub, "echo", max_instances=2), 2, tmp_path / "meet")
        busy = open_session(stub, "echo")
        _, task = run_task(stub, busy, b"pid")
        pids.add(int(task.spec.output))
        # Stopping must not wait for a running task (one that outlasts the test).
        stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=busy, input=b"sleep:3600")))
        wait_for(lambda: stub.GetSession(fe.GetSessionRequest(session_id=busy)).status.running == 1)
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    flame.stop(timeout=60)
    flame.stop()  # idempotent
    # It exited on its own after SIGTERM: had it waited for the task, stop() would have killed it.
    assert flame._process.returncode == 0, flame.log()
    assert not flame.running
    wait_for(lambda: not any(pid_alive(p) for p in pids))
    assert not os.path.exists(flame.state_dir)


def test_killed_flame_leaves_no_process(tmp_path: Path) -> None:
    """SIGKILL gives no chance to clean up: the application processes watch their parent."""
    flame = EmbeddedFlame.start(working_directory=str(tmp_path))
    try:
        with grpc.insecure_channel(flame.endpoint) as channel:
            stub = protocol.FrontendStub(channel)
            stub.RegisterApplication(
                fe.RegisterApplicationRequest(name="echo", application=echo_spec(tmp_path))
            )
            pids = _session_pids(stub, open_session(stub, "echo", max_instances=2), 2, tmp_path / "meet")
        os.kill(flame.pid, signal.SIGKILL)
        wait_for(lambda: not flame.running)
        wait_for(lambda: not any(pid_alive(p) for p in pids))
    finally:
        flame.stop()


KERNEL = textwrap.dedent(
    """
    import json, sys, time
    import grpc
    from flame_magic import protocol
    from flame_magic.embedded import EmbeddedFlame

    command, script, workdir = sys.argv[1:4]
    fe, types = protocol.frontend, protocol.types
    flame = EmbeddedFlame.start(working_directory=workdir)
    stub = protocol.FrontendStub(grpc.insecure_channel(flame.endpoint))
    spec = types.ApplicationSpec(command=command, arguments=[script], working_directory=workdir)
    stub.RegisterApplication(fe.RegisterApplicationRequest(name="echo", application=spec))
    ssn = stub.CreateSession(fe.CreateSessionRequest(session=types.SessionSpec(application="echo")))
    sid = ssn.metadata.id
    task = stub.CreateTask(fe.CreateTaskRequest(task=types.TaskSpec(session_id=sid, input=b"pid")))
    *_, done = stub.WatchTask(fe.WatchTaskRequest(session_id=sid, task_id=task.metadata.id))
    print(json.dumps({"flame": flame.pid, "app": int(done.spec.output), "state_dir": flame.state_dir}))
    sys.stdout.flush()
    time.sleep(60)
    """
)


def test_exits_with_the_kernel_that_started_it(tmp_path: Path) -> None:
    """A notebook kernel killed outright: its embedded Flame notices and takes its processes along."""
    kernel = subprocess.Popen(
        [sys.executable, "-c", KERNEL, sys.executable, str(ECHO_APP), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=_cli_env(),
    )
    try:
        assert kernel.stdout is not None
        seen = json.loads(kernel.stdout.readline())
        assert pid_alive(seen["flame"]) and pid_alive(seen["app"])
    finally:
        kernel.kill()
        kernel.wait()
    wait_for(lambda: not pid_alive(seen["flame"]) and not pid_alive(seen["app"]))
    assert not os.path.exists(seen["state_dir"])


def test_start_failure_reports_stderr(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        EmbeddedFlame.start(working_directory=str(tmp_path / "missing"))
    assert "working directory does not exist" in str(info.value)
    with pytest.raises(RuntimeError) as info:
        EmbeddedFlame.start(listen="https://127.0.0.1:0")  # TLS without a certificate
    assert "--tls-cert" in str(info.value)


def test_endpoint_in_use_is_an_error(tmp_path: Path) -> None:
    sock = f"unix://{tmp_path}/flame.sock"
    with EmbeddedFlame.start(listen="http://127.0.0.1:0") as tcp, EmbeddedFlame.start(listen=sock) as unix:
        for taken in (tcp.endpoint, unix.endpoint):
            with pytest.raises(RuntimeError) as info:
                EmbeddedFlame.start(listen=taken)
            assert "in use" in str(info.value) or "bind" in str(info.value)
        assert unix.endpoint == f"unix://{tmp_path}/flame.sock"
        with grpc.insecure_channel(unix.endpoint) as channel:  # still served by the first one
            protocol.FrontendStub(channel).ListNodes(fe.ListNodesRequest(), timeout=60)
    assert not (tmp_path / "flame.sock").exists()


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_cli_on_tcp_loopback(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "flame_magic.embedded", "--listen", "http://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_cli_env(),
        cwd=tmp_path,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"FLAME_ENDPOINT=http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = protocol.FrontendStub(channel)
            app = stub.GetApplication(fe.GetApplicationRequest(name=applications.DEFAULT_NAME))
            assert app.spec.working_directory == str(tmp_path)  # default: its cwd
            stub.RegisterApplication(
                fe.RegisterApplicationRequest(name="echo", application=echo_spec(tmp_path))
            )
            sid = open_session(stub, "echo")
            _, task = run_task(stub, sid, b"env")
            env = task_json(task)["env"]
            assert env["FLAME_ENDPOINT"] == f"http://127.0.0.1:{port}"
            pid = task_json(task)["pid"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert rest == ""  # exactly one line on stdout
    assert "serving flame.v1.Frontend" in stderr
    wait_for(lambda: not pid_alive(pid))


FLAMEPY_CLIENT = textwrap.dedent(
    """
    import json, sys
    import flamepy
    from flamepy.core.types import FlameError

    app, command, script, workdir = sys.argv[1:5]
    flamepy.register_application(
        app,
        {"command": command, "arguments": [script], "working_directory": workdir},
    )
    apps = [a.name for a in flamepy.list_applications()]
    session = flamepy.create_session(app)
    output = session.invoke(b"hello from flamepy")
    # flamepy looks for the failure message in the WatchTask messages, but Flame (and the
    # embedded Flame) sends events only through GetTask, so flamepy cannot show it.
    try:
        session.invoke(b"fail via flamepy")
        failure = None
    except FlameError as err:
        failure = str(err)
    failed_task = session.get_task("2")
    events = [(e.code, e.message) for e in failed_task.events]
    session_id = session.id
    session.close()
    closed = flamepy.get_session(session_id)
    print(json.dumps({
        "apps": apps,
        "session_id": session_id,
        "output": output.decode(),
        "failure": failure,
        "events": events,
        "closed_state": int(closed.state),
        "succeed": closed.succeed,
        "failed": closed.failed,
    }))
    """
)


def test_flamepy_client(tmp_path: Path) -> None:
    """flamepy 0.6.0, as a client only, against the embedded Flame on TCP loopback.

    flamepy runs in a separate process: its generated protobuf modules register the same
    ``flame.v1`` message names as ours in protobuf's global descriptor pool, and loading
    both in one process fails with a duplicate-symbol conflict.
    """
    flame = EmbeddedFlame.start(working_directory=str(tmp_path), listen="http://127.0.0.1:0")
    try:
        env = _cli_env()
        env["FLAME_ENDPOINT"] = flame.endpoint  # flamepy's override of ~/.flame/flame.yaml
        env["HOME"] = str(tmp_path)  # no ~/.flame config to interfere
        script = tmp_path / "flamepy_client.py"
        script.write_text(FLAMEPY_CLIENT)
        done = subprocess.run(
            [sys.executable, str(script), "echo-flamepy", sys.executable, str(ECHO_APP), str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
    finally:
        flame.stop()
    assert {"flmrun", "flmexec", "flmping", "echo-flamepy"} <= set(result["apps"])
    assert result["session_id"].startswith("echo-flamepy-")
    assert result["output"] == "hello from flamepy"
    # Flame's contract (and ours): no events in WatchTask, so flamepy's future reports no
    # message; GetTask has it as the code-3 event.
    assert result["failure"].startswith("Task failed without error message")
    assert [protocol.EVENT_TASK_FAILED, "echo_app failed on b'fail via flamepy'"] in result["events"]
    assert result["closed_state"] == types.Closed
    assert (result["succeed"], result["failed"]) == (1, 1)
