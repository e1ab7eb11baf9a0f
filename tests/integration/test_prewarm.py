"""The first cell: loading the extension starts the embedded Flame and a runner in the background."""

from __future__ import annotations

import os
import time

from test_kernel import execute

from flame_magic.deploy import RUNNER_MODULE

PREWARMED = """
import threading
for thread in threading.enumerate():
    if thread.name == "flmrun-prewarm":
        thread.join()
connection = get_ipython().magics_manager.registry["FlameMagics"]._engine.connection
print(connection._embedded.pid if connection._embedded and connection._embedded.running else None)
print(connection._session_id is not None)
"""


def children(pid: int) -> list[str]:
    """The command lines of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(command)
    return found


def test_loading_starts_the_embedded_flame_and_a_runner_before_any_cell(kernel):
    _, client = kernel
    reply, _ = execute(client, "%load_ext flame_magic")
    assert reply["status"] == "ok"
    reply, outputs = execute(client, PREWARMED)
    assert reply["status"] == "ok", reply
    pid_line, session_line = "".join(o.get("text", "") for o in outputs).split()
    assert pid_line != "None", "the embedded Flame was not started by loading the extension"
    assert session_line == "True", "the default session was not opened by loading the extension"
    deadline = time.monotonic() + 60  # a guard against a hang, not a speed limit
    while not any(RUNNER_MODULE in c for c in children(int(pid_line))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(RUNNER_MODULE in c for c in children(int(pid_line))), children(int(pid_line))


def test_a_cell_sent_together_with_load_ext_runs(kernel):
    _, client = kernel
    load = client.execute("%load_ext flame_magic")
    cell = client.execute(f"%%flmrun\nimport os\nprint('elsewhere', os.getpid() != {os.getpid()})")
    replies = {}
    while len(replies) < 2:
        message = client.get_shell_msg(timeout=120)
        if message["parent_header"].get("msg_id") in (load, cell):
            replies[message["parent_header"]["msg_id"]] = message["content"]
    assert replies[load]["status"] == "ok"
    assert replies[cell]["status"] == "ok", replies[cell]
    reply, outputs = execute(client, "%%flmrun\n'the next cell runs too'")
    assert reply["status"] == "ok"
    assert any("the next cell runs too" in str(o) for o in outputs), outputs
