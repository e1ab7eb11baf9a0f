"""Live output and interrupt of %%flmrun cells, through the object cache (real processes)."""

from __future__ import annotations

import sys
import time

from test_kernel import execute, messages_until_idle


class Stamped:
    """A stream that remembers when each write arrived."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def test_output_shows_while_the_cell_runs_and_only_once(shell):
    out, err = Stamped(), Stamped()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        shell.run_cell(
            "%%flmrun\nimport sys, time\nprint('first')\nprint('oops', file=sys.stderr)\n"
            "time.sleep(2)\nprint('second')"
        )
        ended = time.monotonic()
    finally:
        sys.stdout, sys.stderr = saved
    assert out.text() == "first\nsecond\n", out.writes
    assert err.text() == "oops\n", err.writes
    first = next(t for t, text in out.writes if "first" in text)
    assert ended - first > 1.0, "the first line came only at the end"


def test_stream_arrives_in_a_kernel_while_the_cell_is_busy(kernel):
    _, client = kernel
    execute(client, "%load_ext flame_magic")
    msg_id = client.execute(
        "%%flmrun\nimport time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')"
    )
    messages = messages_until_idle(client, msg_id)
    mine = [m for m in messages if m["parent_header"].get("msg_id") == msg_id]
    kinds = [(m["msg_type"], m["content"].get("text", m["content"].get("execution_state"))) for m in mine]
    texts = [m["content"]["text"] for m in mine if m["msg_type"] == "stream"]
    assert "".join(texts) == "before\nafter\n", kinds
    before = next(
        i for i, m in enumerate(mine) if m["msg_type"] == "stream" and "before" in m["content"]["text"]
    )
    after = next(
        i for i, m in enumerate(mine) if m["msg_type"] == "stream" and "after" in m["content"]["text"]
    )
    assert before < after
    stamps = {i: m["header"]["date"] for i, m in enumerate(mine)}
    assert (stamps[after] - stamps[before]).total_seconds() > 1.0, kinds


def interrupt_on(manager, marker: str, started: list[float]):
    """An IOPub hook that interrupts the kernel once the cell has printed ``marker``."""

    def hook(message):
        if message["msg_type"] == "stream" and marker in message["content"]["text"] and not started:
            started.append(time.monotonic())
            manager.interrupt_kernel()

    return hook


def test_interrupt_stops_the_remote_cell_and_keeps_the_runner(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    msg_id = client.execute("%%flmrun\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    started: list[float] = []
    hook = interrupt_on(manager, "sleeping", started)
    messages = messages_until_idle(client, msg_id, timeout=30, on_message=hook)
    assert started and time.monotonic() - started[0] < 10
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", errors
    assert "time.sleep(60)" in "\n".join(errors[0]["content"]["traceback"])
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] == pid


def test_a_cell_that_ignores_the_interrupt_is_killed_and_replaced(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic\n%config FlameMagics.interrupt_grace = 1.5")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    msg_id = client.execute(
        "%%flmrun\nimport time\nprint('stubborn', flush=True)\nwhile True:\n    try:\n"
        "        time.sleep(60)\n    except KeyboardInterrupt:\n        pass"
    )
    started: list[float] = []
    hook = interrupt_on(manager, "stubborn", started)
    messages = messages_until_idle(client, msg_id, timeout=60, on_message=hook)
    assert started and time.monotonic() - started[0] < 20
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert errors and "ignored the interrupt" in "\n".join(errors[0]["content"]["traceback"]), errors
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] != pid
