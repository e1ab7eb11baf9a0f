"""A real Jupyter kernel: errors fail the cell, nothing outlives the kernel, map progress,
interrupting a map, and background output routing."""

from __future__ import annotations

import os
import queue
import signal
import time


def execute(client, code: str) -> tuple[dict, list[dict]]:
    outputs: list[dict] = []

    def keep(message: dict) -> None:
        if message["msg_type"] in ("stream", "execute_result", "display_data", "error"):
            outputs.append(message["content"])

    reply = client.execute_interactive(code, timeout=60, output_hook=keep)
    return reply["content"], outputs


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie waiting for its reaper is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_remote_error_fails_the_cell_in_a_kernel(kernel):
    _, client = kernel
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nvalue = 1\nvalue / 0")
    assert reply["status"] == "error"
    assert reply["ename"] == "ZeroDivisionError"
    traceback = "\n".join(outputs[-1]["traceback"])
    assert "value / 0" in traceback and "line 3" in traceback
    reply, outputs = execute(client, "%%flmrun\n'next cell runs'")
    assert reply["status"] == "ok"
    assert outputs[-1]["data"]["text/plain"] == "'next cell runs'"


def test_nothing_outlives_a_killed_kernel(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok"
    runner_pid = int(outputs[-1]["data"]["text/plain"])
    _, outputs = execute(
        client, "print(get_ipython().magics_manager.registry['FlameMagics'].connection()._embedded.pid)"
    )
    flame_pid = int(outputs[-1]["text"])
    assert alive(runner_pid) and alive(flame_pid)

    _, outputs = execute(client, "import os; print(os.getpid())")
    os.kill(int(outputs[-1]["text"]), signal.SIGKILL)  # no atexit, no cleanup in the kernel
    deadline = time.monotonic() + 60  # a guard against a hang, not a speed limit
    while time.monotonic() < deadline and (alive(runner_pid) or alive(flame_pid)):
        time.sleep(0.1)
    assert not alive(flame_pid), "the embedded Flame outlived the kernel"
    assert not alive(runner_pid), "the runner outlived the kernel"


def messages_until_idle(client, msg_id: str, timeout: float = 60, on_message=None) -> list[dict]:
    """Every IOPub message (of any cell) until the cell ``msg_id`` is idle."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"cell {msg_id} not idle within {timeout} s; saw {seen}") from None
        seen.append(message)
        if on_message is not None:
            on_message(message)
        parent = message["parent_header"].get("msg_id")
        if (
            parent == msg_id
            and message["msg_type"] == "status"
            and message["content"]["execution_state"] == "idle"
        ):
            return seen


def test_map_progress_is_one_display_updated_in_place(kernel):
    _, client = kernel
    execute(client, "%load_ext flame_magic\nxs = list(range(30))")
    msg_id = client.execute("%%flmrun --map x=xs --into out --instances 2\nimport time\ntime.sleep(0.03)\nx")
    mine = [m for m in messages_until_idle(client, msg_id) if m["parent_header"].get("msg_id") == msg_id]
    displays = [m for m in mine if m["msg_type"] == "display_data"]
    updates = [m for m in mine if m["msg_type"] == "update_display_data"]
    assert len(displays) == 1, [m["msg_type"] for m in mine]
    display_id = displays[0]["content"]["transient"]["display_id"]
    assert updates and {u["content"]["transient"]["display_id"] for u in updates} == {display_id}
    final = updates[-1]["content"]["data"]
    assert "flmrun --map x=xs: 30/30 done" in final["text/plain"] and "items/s" in final["text/plain"]
    assert '<progress value="30" max="30"' in final["text/html"]
    assert not [m for m in mine if m["msg_type"] == "stream"]  # no text progress line in Jupyter
    reply, outputs = execute(client, "print(out == xs)")
    assert outputs[-1]["text"].strip() == "True"


def test_interrupting_a_map_keeps_the_finished_results(kernel):
    manager, client = kernel
    execute(client, "%load_ext flame_magic\nxs = list(range(80))")
    msg_id = client.execute("%%flmrun --map x=xs --into out --instances 2\nimport time\ntime.sleep(0.1)\nx")
    interrupted = []

    def interrupt_after_some(message):
        data = message["content"].get("data", {}).get("text/plain", "")
        if message["msg_type"] == "update_display_data" and not interrupted and " 0/80" not in data:
            done = int(data.split(": ", 1)[1].split("/", 1)[0])
            if done >= 4:
                interrupted.append(done)
                manager.interrupt_kernel()

    messages = messages_until_idle(client, msg_id, on_message=interrupt_after_some)
    assert interrupted
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert errors and "The map stopped after" in "\n".join(errors[0]["content"]["traceback"])
    from flame_magic.fanout import NOT_DONE  # noqa: F401 - the kernel imports it too

    reply, outputs = execute(
        client,
        "from flame_magic.fanout import NOT_DONE\n"
        "done = [i for i, v in enumerate(out) if v is not NOT_DONE]\n"
        "print(len(done), len(out), all(out[i] == i for i in done))",
    )
    done, total, right = outputs[-1]["text"].split()
    assert int(done) >= interrupted[0] and int(done) < 80 and total == "80" and right == "True"


def test_background_output_lands_in_its_own_cell_while_another_runs(kernel, tmp_path):
    _, client = kernel
    execute(client, "%load_ext flame_magic")
    # The background cell goes on only once the busy cell has started, and the busy cell
    # waits for it to finish: its output can only come while the busy cell runs.
    gate = str(tmp_path / "busy-started")
    background = client.execute(
        "%%flmrun --background job\nimport os, time\ndeadline = time.monotonic() + 60\n"
        f"while not os.path.exists({gate!r}) and time.monotonic() < deadline:\n    time.sleep(0.02)\n"
        "print('printed in the background')\n'the value'"
    )
    reply = client.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == background and reply["content"]["status"] == "ok"
    busy = client.execute(f"open({gate!r}, 'w').close()\nprint('busy cell done', job.result(timeout=60))")
    messages = messages_until_idle(client, busy, timeout=90)
    streams = [m for m in messages if m["msg_type"] == "stream"]
    printed = [m for m in streams if "printed in the background" in m["content"]["text"]]
    assert printed, streams
    assert {m["parent_header"]["msg_id"] for m in printed} == {background}
    values = [
        m
        for m in messages
        if m["msg_type"] in ("display_data", "execute_result")
        and m["content"]["data"].get("text/plain") == "'the value'"
    ]
    assert values and values[0]["parent_header"]["msg_id"] == background
    busy_output = [m for m in streams if "busy cell done" in m["content"]["text"]]
    assert busy_output and busy_output[0]["parent_header"]["msg_id"] == busy
    # It arrived while the other cell was running, not after it.
    assert messages.index(printed[0]) < messages.index(busy_output[0])
    assert "the value" in busy_output[0]["content"]["text"]
