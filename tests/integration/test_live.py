"""Live output and interrupt of %%flmrun cells, through the object cache (real processes)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from test_kernel import execute, messages_until_idle

# A cell that goes on only once the notebook has shown its first line: it prints, then waits
# for a file that the test creates when that line arrives. Had the line come only with the
# cell's end, the cell would wait out its guard and say so.
GATED_CELL = """%%flmrun
import os, sys, time
print({first!r}, flush=True)
print('oops', file=sys.stderr)
deadline = time.monotonic() + 60  # a guard against a hang, not a speed limit
while not os.path.exists({gate!r}) and time.monotonic() < deadline:
    time.sleep(0.02)
print('second' if os.path.exists({gate!r}) else 'the first line was not shown while the cell ran')
"""


class OpensGate:
    """A stream that keeps what was written, and creates ``gate`` once ``marker`` was."""

    def __init__(self, marker: str = "", gate: Path | None = None) -> None:
        self.marker, self.gate = marker, gate
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        if self.gate is not None and self.marker in self.text():
            self.gate.touch()
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.writes)


def test_output_shows_while_the_cell_runs_and_only_once(shell, tmp_path):
    gate = tmp_path / "first-shown"
    out, err = OpensGate("first\n", gate), OpensGate()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        shell.run_cell(GATED_CELL.format(first="first", gate=str(gate)))
    finally:
        sys.stdout, sys.stderr = saved
    assert out.text() == "first\nsecond\n", out.writes
    assert err.text() == "oops\n", err.writes


def test_stream_arrives_in_a_kernel_while_the_cell_is_busy(kernel, tmp_path):
    _, client = kernel
    execute(client, "%load_ext flame_magic")
    gate = tmp_path / "before-shown"
    msg_id = client.execute(GATED_CELL.format(first="before", gate=str(gate)))

    def open_gate(message: dict) -> None:
        if message["msg_type"] == "stream" and "before" in message["content"]["text"]:
            gate.touch()

    messages = messages_until_idle(client, msg_id, timeout=90, on_message=open_gate)
    mine = [m for m in messages if m["parent_header"].get("msg_id") == msg_id]
    kinds = [(m["msg_type"], m["content"].get("text", m["content"].get("execution_state"))) for m in mine]
    streams = [m["content"] for m in mine if m["msg_type"] == "stream"]
    assert "".join(c["text"] for c in streams if c["name"] == "stdout") == "before\nsecond\n", kinds


def interrupt_on(manager, marker: str, started: list[float]):
    """An IOPub hook that interrupts the kernel once the cell has printed ``marker``."""

    def hook(message):
        if message["msg_type"] == "stream" and marker in message["content"]["text"] and not started:
            started.append(time.monotonic())  # when the interrupt was sent
            manager.interrupt_kernel()

    return hook


def test_interrupt_stops_the_remote_cell_and_keeps_the_runner(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    # It sleeps far longer than the test may take: it ends only if the interrupt stops it.
    msg_id = client.execute("%%flmrun\nimport time\nprint('sleeping', flush=True)\ntime.sleep(3600)")
    started: list[float] = []
    hook = interrupt_on(manager, "sleeping", started)
    messages = messages_until_idle(client, msg_id, timeout=90, on_message=hook)
    assert started
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", errors
    assert "time.sleep(3600)" in "\n".join(errors[0]["content"]["traceback"])
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] == pid


def test_a_cell_that_ignores_the_interrupt_is_killed_and_replaced(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic\n%config FlameMagics.interrupt_grace = 1.5")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    msg_id = client.execute(
        "%%flmrun\nimport time\nprint('stubborn', flush=True)\nwhile True:\n    try:\n"
        "        time.sleep(3600)\n    except KeyboardInterrupt:\n        pass"
    )
    started: list[float] = []
    hook = interrupt_on(manager, "stubborn", started)
    messages = messages_until_idle(client, msg_id, timeout=90, on_message=hook)
    assert started
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert errors and "ignored the interrupt" in "\n".join(errors[0]["content"]["traceback"]), errors
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] != pid
