"""A real Jupyter kernel: errors fail the cell, and nothing outlives the kernel."""

from __future__ import annotations

import os
import signal
import time

import pytest
from jupyter_client.manager import start_new_kernel


@pytest.fixture
def kernel(isolated_home):
    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ})
    yield manager, client
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (alive(runner_pid) or alive(flame_pid)):
        time.sleep(0.1)
    assert not alive(flame_pid), "the embedded Flame outlived the kernel"
    assert not alive(runner_pid), "the runner outlived the kernel"
