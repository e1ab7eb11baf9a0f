"""A real cluster's failure modes, through a real kernel, on the embedded Flame failing as Flame 0.6.

``FLAME_EMBEDDED_FAULTS=flame-0.6`` makes the embedded Flame keep a dead runner bound to its
session (later tasks fail with ``Connection refused``), leave a process that exits before
its socket ``Binding`` for ever, and place executors within the node's CPUs
(``FLAME_EMBEDDED_CPUS``), as a small cluster does. Every wait here is for an event (a
reply, a message, a file, a process gone), bounded only against hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_kernel import alive, messages_until_idle

HANG = 180  # seconds: only against hangs, never a measure of speed


@pytest.fixture
def flame06(monkeypatch):
    """The kernel's embedded Flame fails as Flame 0.6 does, on a node of two CPUs."""
    monkeypatch.setenv("FLAME_EMBEDDED_FAULTS", "flame-0.6")
    monkeypatch.setenv("FLAME_EMBEDDED_CPUS", "2")


def run(client, code: str) -> tuple[dict, list[dict]]:
    """Run a cell; its reply and what it showed."""
    outputs: list[dict] = []

    def keep(message: dict) -> None:
        if message["msg_type"] in ("stream", "execute_result", "display_data", "error"):
            outputs.append(message["content"])

    reply = client.execute_interactive(code, timeout=HANG, output_hook=keep)
    return reply["content"], outputs


def text(outputs: list[dict], name: str = "stderr") -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("name") == name)


def value(outputs: list[dict]) -> str:
    return next(o["data"]["text/plain"] for o in outputs if "data" in o)


def traceback(reply: dict) -> str:
    return "\n".join(reply.get("traceback", []))


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {HANG} s: {what}")
        time.sleep(0.05)


def test_a_dead_runner_s_session_is_never_reused_and_the_next_cell_says_so_once(flame06, kernel):
    _, client = kernel
    run(client, "%load_ext flame_magic")
    _, outputs = run(client, "%%flmrun\nimport os\nos.getpid()")
    first = int(value(outputs))

    reply, outputs = run(client, "%%flmrun\nimport os\nos._exit(3)")
    assert reply["status"] == "error" and reply["ename"] == "CellFailed"
    assert "did not answer" in traceback(reply) and "the next cell opens a new session" in traceback(reply)

    reply, outputs = run(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok", traceback(reply)
    second = int(value(outputs))
    notes = [line for line in text(outputs).splitlines() if line.startswith("flmrun:")]
    assert len(notes) == 1 and "died" in notes[0] and "is gone" in notes[0] and "new session" in notes[0]
    assert second != first

    reply, outputs = run(client, "%%flmrun\n'once'")
    assert reply["status"] == "ok" and "flmrun:" not in text(outputs)

    # A runner that dies between cells (killed outside): the next task is refused by the dead
    # process, so the cell runs again at once in a new session, saying so once.
    os.kill(second, signal.SIGKILL)
    wait_for(lambda: not alive(second), "the killed runner gone")
    run(  # the embedded Flame has seen it end (Flame 0.6 keeps its executor bound all the same)
        client,
        "import time\n_e = get_ipython().magics_manager.registry['FlameMagics'].connection()._embedded\n"
        f"while 'pid {second} ended' not in _e.log():\n    time.sleep(0.05)",
    )
    reply, outputs = run(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok", traceback(reply)
    notes = [line for line in text(outputs).splitlines() if line.startswith("flmrun:")]
    assert len(notes) == 1 and "Connection refused" in notes[0] and "new session" in notes[0], notes
    assert int(value(outputs)) != second


def test_a_named_session_whose_runner_died_reopens_under_the_same_name(flame06, kernel):
    _, client = kernel
    run(client, "%load_ext flame_magic")
    run(client, "%%flmrun --session work\nimported = 'here'")
    reply, _ = run(client, "%%flmrun --session work\nimport os\nos._exit(4)")
    assert reply["status"] == "error"
    reply, outputs = run(client, "%%flmrun --session work\n'imported' in globals()")
    assert reply["status"] == "ok", traceback(reply)
    assert value(outputs) == "False"
    assert "session 'work'" in text(outputs)
    _, outputs = run(client, "%flame status")
    status = text(outputs, "stdout")
    assert status.count("[named 'work']") == 2 and "Open" in status and "Closed" in status


def test_a_runner_that_cannot_start_fails_the_first_cell_in_bounded_time(flame06, kernel, tmp_path):
    _, client = kernel
    run(
        client,
        "%load_ext flame_magic\n"
        "from flame_magic.protocol import types\n"
        "_c = get_ipython().magics_manager.registry['FlameMagics'].connection().client()\n"
        "_c.register_application('broken', types.ApplicationSpec(shim=types.Host, command='/bin/sh', "
        "arguments=['-c', 'exit 1']))\n"
        "%config FlameMagics.application = 'broken'\n"
        "%config FlameMagics.start_timeout = 2",
    )
    reply, _ = run(client, "%%flmrun\n1")
    assert reply["status"] == "error" and reply["ename"] == "CellFailed"
    message = traceback(reply)
    assert "No runner of application 'broken' started within 2 s" in message
    assert "/bin/sh -c exit 1" in message and "import flame_magic_runner" in message
    reply, _ = run(client, "xs = [1, 2]")
    reply, _ = run(client, "%%flmrun --map x=xs\nx")
    assert reply["status"] == "error" and "No runner of application 'broken'" in traceback(reply)

    # deploy checks that the Python it registers imports the runner.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    reply, _ = run(client, f"%flame deploy --installed --python {bare}/bin/python --name fm-bare")
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    refusal = reply["evalue"]
    assert "cannot import flame-magic's runner" in refusal and "ModuleNotFoundError" in refusal
    _, outputs = run(client, "%flame status")
    assert "fm-bare" not in text(outputs, "stdout")


def test_close_while_a_background_cell_runs_keeps_its_session_and_values(flame06, kernel, tmp_path):
    _, client = kernel
    started, go = tmp_path / "started", tmp_path / "go"
    run(
        client,
        f"%load_ext flame_magic\ndata = b'x' * (6 * 2**20)\nSTARTED, GO = {str(started)!r}, {str(go)!r}",
    )
    run(
        client,
        "%%flmrun --background job\nimport os, time\nopen(STARTED, 'w').close()\n"
        "while not os.path.exists(GO):\n    time.sleep(0.05)\nout = data",
    )
    wait_for(started.exists, "the background cell running")
    reply, outputs = run(client, "%flame close")
    said = text(outputs, "stdout")
    assert "Flame refused to close session" in said and "running tasks" in said, said
    assert "No open sessions" not in said
    go.touch()
    reply, outputs = run(client, "job.result(timeout=120)\nlen(out)")
    assert reply["status"] == "ok", traceback(reply)
    assert value(outputs) == str(6 * 2**20)


def test_waiting_for_room_is_said_once_and_one_interrupt_cancels_the_pending_cell(flame06, kernel):
    manager, client = kernel
    run(client, "%load_ext flame_magic\nxs = list(range(6))")
    run(client, "%%flmrun\n'default session holds one CPU'")
    run(client, "%%flmrun --session hold\n'named session holds the other'")

    msg_id = client.execute("%%flmrun --session third\n'never runs'")
    notes: list[str] = []
    interrupted: list[float] = []

    def on_message(message: dict) -> None:
        content = message["content"]
        if message["msg_type"] == "stream" and "waiting for a free executor" in content["text"]:
            notes.append(content["text"])
            if not interrupted:
                interrupted.append(time.monotonic())
                manager.interrupt_kernel()

    messages = messages_until_idle(client, msg_id, timeout=HANG, on_message=on_message)
    assert len(notes) == 1, notes
    assert "the default session" in notes[0] and "`%flame close hold`" in notes[0], notes[0]
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert errors and "Interrupted before the cell started" in "\n".join(errors[0]["traceback"])
    assert "was closed, which cancelled it" in "\n".join(errors[0]["traceback"])

    # A map asking for more runners than there is room for is told so; its session stays for
    # the next map, until a cell of this notebook needs its executor.
    reply, outputs = run(client, "%flame close hold")
    assert "Closed session 'hold'" in text(outputs, "stdout")
    reply, outputs = run(client, "%%flmrun --map x=xs --into squares --instances 2\nx * x")
    assert reply["status"] == "ok", traceback(reply)
    assert "asked Flame for 2 runners and got 1" in text(outputs)
    reply, outputs = run(client, "squares")
    assert value(outputs) == "[0, 1, 4, 9, 16, 25]"
    reply, outputs = run(client, "%%flmrun --session after\n'runs where the map ran'")
    assert reply["status"] == "ok" and value(outputs) == "'runs where the map ran'"
    assert "closed this notebook's idle --map session" in text(outputs), text(outputs)
    assert "waiting for a free executor" not in text(outputs)
