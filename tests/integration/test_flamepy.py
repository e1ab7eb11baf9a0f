"""Conformance with flamepy 0.6.0, Flame's own Python SDK: a peer we did not write.

Three pairings against the embedded Flame, started as its own process on TCP loopback:

(a) flamepy's client and a flamepy service (``apps/flamepy_service.py``, flamepy's
    ``FlameService`` base class), the service launched by our executor side;
(b) our client (:class:`flame_magic.client.FlameClient`) and the same flamepy service;
(c) flamepy's client and our runner (the embedded Flame's ``flame-magic``).

flamepy runs in separate processes: its generated protobuf modules register the same
``flame.v1`` names as ours in protobuf's global pool, and both cannot load in one process.

Where flamepy and Flame's contract (``flame-protocol.md``) disagree, the assertion says
which behaviour is Flame's; the embedded Flame and our client follow Flame:

- a failed task's message is an event that Flame fills in only through ``GetTask``; flamepy's
  ``invoke`` looks for it in the ``WatchTask`` messages, so it reports "Task failed without
  error message", while ``get_task`` shows it;
- when ``OnSessionEnter`` fails, Flame records event 1001 on the session and leaves its tasks
  Pending; flamepy's ``invoke`` would wait for ever, so here flamepy polls the session's
  events, as our client does;
- closing a session cancels its pending tasks (state 4, Cancelled); flamepy's ``TaskState``
  has no value 4, so its ``get_task`` fails on such a task (and its futures resolve only on
  Succeed or Failed), so the state is read from the raw message.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flame_magic import codec, protocol
from flame_magic.client import FlameClient, SessionStartError, failure_message, new_session_id
from flame_magic.embedded import EmbeddedFlame

types = protocol.types
cell = protocol.cell

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE = Path(__file__).parent / "apps" / "flamepy_service.py"
EVENT_BIND_FAILED = protocol.EVENT_BIND_FAILED
REFUSAL = "flamepy service refuses common_data b'refuse'"


@pytest.fixture(scope="module")
def flame(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFlame]:
    workdir = tmp_path_factory.mktemp("flamepy-cwd")
    with EmbeddedFlame.start(working_directory=str(workdir), listen="http://127.0.0.1:0") as started:
        yield started


def run_flamepy(flame: EmbeddedFlame, tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    """Run a flamepy client script in its own process against ``flame``; return its JSON."""
    path = tmp_path / "flamepy_script.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["FLAME_ENDPOINT"] = flame.endpoint  # flamepy's own override of ~/.flame/flame.yaml
    env["HOME"] = str(tmp_path)  # no ~/.flame/flame.yaml
    done = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=90
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# Polls a session's events for a bind failure (flamepy's invoke would wait for ever); the
# deadline guards against a hang, not a speed limit.
FLAMEPY_WAIT_FOR_EVENT = """
def events_of(session_id, code, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        events = [(e.code, e.message) for e in flamepy.get_session(session_id).events]
        if any(c == code for c, _ in events) or time.monotonic() > deadline:
            return events
        time.sleep(0.05)
"""

FLAMEPY_AND_FLAMEPY_SERVICE = (
    """
    import json, sys, time
    import flamepy
    from flamepy.core.types import FlameError
    from flamepy.proto.frontend_pb2 import GetTaskRequest
    """
    + textwrap.indent(textwrap.dedent(FLAMEPY_WAIT_FOR_EVENT), "    ")
    + """
    app, service = sys.argv[1:3]
    flamepy.register_application(
        app, {"command": sys.executable, "arguments": [service], "description": "flamepy service"}
    )
    registered = flamepy.get_application(app)
    session = flamepy.create_session(app, common_data=b"shared")
    output = json.loads(session.invoke(b"hello"))
    try:
        session.invoke(b"fail now")
        failure = None
    except FlameError as err:
        failure = str(err)
    failed = session.get_task("2")
    listed = [(t.id, int(t.state)) for t in session.list_tasks()]
    session.close()
    closed = flamepy.get_session(session.id)

    refusing = flamepy.create_session(app, common_data=b"refuse")
    refusing.create_task(b"never runs")
    events = events_of(refusing.id, 1001)
    waiting = refusing.get_task("1")
    refusing.close()
    try:
        refusing.get_task("1")
        flamepy_cancelled = "read"
    except ValueError as err:
        flamepy_cancelled = str(err)
    raw = refusing.connection._frontend.GetTask(GetTaskRequest(session_id=refusing.id, task_id="1"))
    print(json.dumps({
        "registered": [registered.command, registered.arguments, int(registered.state)],
        "output": output,
        "failure": failure,
        "failed": [int(failed.state), [(e.code, e.message) for e in failed.events]],
        "listed": listed,
        "closed": [int(closed.state), closed.succeed, closed.failed],
        "bind_events": events,
        "waiting": int(waiting.state),
        "cancelled": raw.status.state,
        "flamepy_cancelled": flamepy_cancelled,
    }))
    """
)


def test_a_flamepy_client_and_a_flamepy_service(flame: EmbeddedFlame, tmp_path: Path) -> None:
    result = run_flamepy(flame, tmp_path, FLAMEPY_AND_FLAMEPY_SERVICE, "flamepy-echo", str(SERVICE))
    assert result["registered"] == [sys.executable, [str(SERVICE)], types.Enabled]
    assert result["output"]["reversed"] == "olleh"
    assert result["output"]["common"] == "shared"  # common_data reached OnSessionEnter
    assert result["output"]["task"] == "1"  # task ids are integers as strings, per session
    # Flame's behaviour: no events in WatchTask messages, so flamepy's invoke has no message...
    assert result["failure"].startswith("Task failed without error message")
    # ...and GetTask has it, as the code-3 event, with the service's exception text.
    state, events = result["failed"]
    assert state == types.Failed
    assert [protocol.EVENT_TASK_FAILED, "flamepy service failed on b'fail now'"] in events
    assert result["listed"] == [["1", types.Succeed], ["2", types.Failed]]
    assert result["closed"] == [types.Closed, 1, 1]
    # OnSessionEnter failed: event 1001 with the service's message, while the task waits...
    assert any(code == EVENT_BIND_FAILED and REFUSAL in message for code, message in result["bind_events"])
    # ...and the task stays Pending (Flame's behaviour) until the session is closed.
    assert result["waiting"] == types.Pending
    # Closing cancels it: Flame's state 4, which flamepy's wire messages carry but its
    # TaskState enum lacks, so flamepy's get_task cannot read it.
    assert result["cancelled"] == types.Cancelled
    assert result["flamepy_cancelled"] == "4 is not a valid TaskState"


def test_our_client_and_a_flamepy_service(flame: EmbeddedFlame) -> None:
    client = FlameClient(flame.endpoint)
    try:
        client.wait_ready(60)
        spec = types.ApplicationSpec(shim=types.Host, command=sys.executable, arguments=[str(SERVICE)])
        client.register_application("flamepy-echo-ours", spec)

        session_id = new_session_id("flamepy-echo-ours")
        client.open_session(
            session_id, types.SessionSpec(application="flamepy-echo-ours", common_data=b"ours")
        )
        task = client.create_task(session_id, b"abc")
        done = client.wait_task(session_id, task.metadata.id)
        assert done.status.state == types.Succeed
        reply = json.loads(done.spec.output)
        assert (reply["reversed"], reply["common"]) == ("cba", "ours")

        task = client.create_task(session_id, b"fail here")
        failed = client.wait_task(session_id, task.metadata.id)
        assert failed.status.state == types.Failed
        assert failure_message(failed) == "flamepy service failed on b'fail here'"
        assert client.close_session(session_id).status.state == types.Closed

        refusing = new_session_id("flamepy-echo-ours")
        client.open_session(
            refusing, types.SessionSpec(application="flamepy-echo-ours", common_data=b"refuse")
        )
        task = client.create_task(refusing, b"never runs")
        # The task can never run: waiting ends only because the refusal is noticed.
        with pytest.raises(SessionStartError) as info:
            client.wait_task(refusing, task.metadata.id)
        assert REFUSAL in str(info.value)
        client.close_session(refusing)
    finally:
        client.close()


FLAMEPY_AND_OUR_RUNNER = (
    """
    import base64, json, sys, time
    import flamepy
    from flamepy.core.types import FlameError
    """
    + textwrap.indent(textwrap.dedent(FLAMEPY_WAIT_FOR_EVENT), "    ")
    + """
    payloads = json.load(open(sys.argv[1]))
    hello, good, bad, stale = (base64.b64decode(payloads[k]) for k in ("hello", "good", "bad", "stale"))
    session = flamepy.create_session("flame-magic", common_data=hello)
    output = session.invoke(good)
    try:
        session.invoke(bad)
        failure = None
    except FlameError as err:
        failure = str(err)
    failed = session.get_task("2")
    session.close()

    mismatched = flamepy.create_session("flame-magic", common_data=stale)
    mismatched.create_task(good)
    events = events_of(mismatched.id, 1001)
    mismatched.close()
    print(json.dumps({
        "output": base64.b64encode(output).decode(),
        "failure": failure,
        "failed_events": [(e.code, e.message) for e in failed.events],
        "failed_output": base64.b64encode(failed.output or b"").decode(),
        "bind_events": events,
    }))
    """
)


def test_a_flamepy_client_and_our_runner(flame: EmbeddedFlame, tmp_path: Path) -> None:
    header = codec.local_header()

    def request(source: str) -> bytes:
        return codec.encode(
            cell.CellRequest(header=header, source=source, filename="<flamepy>", first_line=1)
        )

    stale = cell.Header(protocol=codec.PROTOCOL_VERSION, python="2.7", cloudpickle=codec.CLOUDPICKLE_VERSION)
    payloads = {
        "hello": codec.encode(cell.SessionHello(header=header)),
        "good": request("print('from our runner')\n6 * 7"),
        "bad": request("1 / 0"),
        "stale": codec.encode(cell.SessionHello(header=stale)),
    }
    path = tmp_path / "payloads.json"
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in payloads.items()}))
    result = run_flamepy(flame, tmp_path, FLAMEPY_AND_OUR_RUNNER, str(path))

    good = codec.decode(cell.CellResult, base64.b64decode(result["output"]), "the runner")
    assert codec.loads(good.value.pickle) == 42
    assert [o.stream.text for o in good.outputs] == ["from our runner\n"]

    # Our runner fails the task with the exception as message (read through GetTask, as
    # Flame fills events only there) and still sends the traceback as output.
    assert result["failure"].startswith("Task failed without error message")
    assert [protocol.EVENT_TASK_FAILED, "ZeroDivisionError: division by zero"] in result["failed_events"]
    bad = codec.decode(cell.CellResult, base64.b64decode(result["failed_output"]), "the runner")
    assert bad.error.ename == "ZeroDivisionError" and "1 / 0" in bad.error.traceback

    # A session hello from another Python refuses the session: event 1001 with the reason.
    reasons = [message for code, message in result["bind_events"] if code == EVENT_BIND_FAILED]
    assert reasons and "Python 2.7 there" in reasons[0]
