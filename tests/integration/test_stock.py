"""The same cells on both paths: flame-magic's runner, and Flame's stock flmrun (flamepy's runner).

On the embedded Flame, flamepy's runner is registered as Flame registers its default
``flmrun`` (``python -m flamepy.runner.runpy``, here with this test's Python), and the cells
reach it with nothing deployed: flame-magic's evaluator travels with each session.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from pathlib import Path

import pytest
from test_kernel import execute, messages_until_idle
from test_live import interrupt_on

from flame_magic.errors import CellFailed
from flame_magic.protocol import types

STOCK = "flmrun-stock"  # flamepy's runner, as Flame's default flmrun runs it
OWN = "flame-magic"


def stock_spec(*arguments: str) -> types.ApplicationSpec:
    """flamepy's runner under this Python, started through ``python -c WRAPPER`` when given one."""
    return types.ApplicationSpec(
        shim=types.Host,
        description="flamepy's runner, as Flame's default flmrun",
        command=sys.executable,
        arguments=list(arguments) or ["-m", "flamepy.runner.runpy"],
        installer="python",
    )


# Runs flamepy's runner in a process that cannot import IPython or matplotlib_inline: a bare
# cluster's runner has only flamepy's dependencies.
BARE = (
    "import runpy, sys\n"
    "sys.modules.update(dict.fromkeys(['IPython', 'matplotlib_inline'], None))\n"
    "runpy.run_module(sys.argv[1], run_name='__main__', alter_sys=True)\n"
)
# Runs flamepy's runner in a process that reports Python 3.99 (as a runner of another
# Python minor version would); a real second interpreter is used too when the test is told one.
OTHER_PYTHON = (
    "import collections, importlib, sys\n"
    "runner = importlib.import_module(sys.argv[1])\n"  # libraries check the version when imported
    "sys.version_info = collections.namedtuple('v', 'major minor micro releaselevel serial')"
    "(3, 99, 0, 'final', 0)\n"
    "runner.main()\n"
)
RUNPY = "flamepy.runner.runpy"


def magics_of(shell):
    return shell.magics_manager.registry["FlameMagics"]


def register(shell, name: str, spec: types.ApplicationSpec) -> None:
    client = magics_of(shell).connection().client()
    if client.get_application(name) is None:
        client.register_application(name, spec)


@pytest.fixture(params=[OWN, STOCK])
def path(request, shell, run):
    """The notebook's cells on flame-magic's runner, or on Flame's stock flmrun."""
    magics = magics_of(shell)
    saved = magics.application
    if request.param == STOCK:
        register(shell, STOCK, stock_spec())
        magics.application = STOCK
    else:
        deployed = run("%flame deploy")
        assert deployed.error is None, deployed.error
    yield request.param
    magics.application = saved


def test_value_names_print_and_errors(path, run, shell):
    ran = run("%%flmrun\nprint('hello from', 'the runner')\nanswer = 6 * 7\nanswer + 0.5")
    assert ran.error is None, ran.error
    assert ran.value == 42.5
    assert "hello from the runner" in ran.stdout
    assert shell.user_ns["answer"] == 42

    failed = run("%%flmrun\ndef inner():\n    return 1 / 0\ninner()")
    assert isinstance(failed.error, ZeroDivisionError), failed.error
    remote = failed.error.remote_traceback
    assert "return 1 / 0" in remote and "inner()" in remote and "<flmrun-cell-" in remote

    assert run("%%flmrun\nanswer - 2").value == 40  # the next cell works


def test_ten_megabytes_both_ways(path, run, shell):
    blob = os.urandom(10 * 1024 * 1024)
    shell.user_ns["blob"] = blob
    ran = run("%%flmrun\nimport hashlib\nback = blob[::-1]\nhashlib.sha256(blob).hexdigest()")
    assert ran.error is None, ran.error
    assert ran.value == hashlib.sha256(blob).hexdigest()
    assert shell.user_ns["back"] == blob[::-1]


def test_timeout_stops_the_cell_and_the_runner_stays(path, run):
    pid = run("%%flmrun\nimport os\nos.getpid()").value
    stopped = run("%%flmrun --timeout 1\nimport time\nwhile True:\n    time.sleep(0.05)")
    assert isinstance(stopped.error, TimeoutError), stopped.error
    assert "1 s timeout" in str(stopped.error)
    assert run("%%flmrun\nimport os\nos.getpid()").value == pid


def test_map_background_and_named_session(path, run, shell):
    shell.user_ns["xs"] = list(range(30))
    mapped = run("%%flmrun --map x=xs --into squares\nx * x")
    assert mapped.error is None, mapped.error
    assert shell.user_ns["squares"] == [x * x for x in range(30)]

    started = run("%%flmrun --background job\nsum(range(10))")
    assert started.error is None, started.error
    assert shell.user_ns["job"].result(timeout=120) == 45

    kept = run("%%flmrun --session keep --no-assign\nremote_only = 'kept'")
    assert kept.error is None, kept.error
    assert "remote_only" not in shell.user_ns
    assert run("%%flmrun --session keep\nremote_only").value == "kept"
    assert run("%flame close keep").error is None


def test_status_names_the_path(path, run):
    assert run("%%flmrun\n1").value == 1
    status = run("%flame status").stdout
    if path == STOCK:
        assert "Path: Flame's flmrun: 'flmrun-stock' is flamepy's runner" in status, status
        assert "flmrun-stock (Flame's flmrun: flamepy's runner)" in status
    else:
        assert "Path: flame-magic's runner: 'flame-magic' runs it" in status, status


@pytest.fixture
def application(shell):
    """Set ``FlameMagics.application`` for one test."""
    magics = magics_of(shell)
    saved = magics.application

    def use(name: str, spec: types.ApplicationSpec) -> None:
        register(shell, name, spec)
        magics.application = name

    yield use
    magics.application = saved


def test_a_runner_without_ipython_degrades_and_says_so_once(application, run):
    application("flmrun-bare", stock_spec("-c", BARE, RUNPY))
    first = run("%%flmrun\nclass Shown:\n    def _repr_html_(self):\n        return '<b>html</b>'\n[1, 2]")
    assert first.error is None, first.error
    assert first.value == [1, 2]
    assert "lacks IPython" in first.stderr and "plain repr" in first.stderr, first.stderr
    second = run("%%flmrun\nprint('still runs')\n3")
    assert second.value == 3 and "still runs" in second.stdout
    assert "lacks IPython" not in second.stderr  # once per session


def other_pythons() -> list[str]:
    """The simulated version report, and a second interpreter if the test is given one."""
    found = ["simulated"]
    other = os.environ.get("FLAME_MAGIC_TEST_OTHER_PYTHON")  # a Python of another minor with flamepy
    if other:
        found.append(other)
    return found


@pytest.mark.parametrize("other", other_pythons())
def test_a_runner_of_another_python_is_refused_after_trying_a_copy(other, application, run, shell):
    name = f"flmrun-other-{uuid.uuid4().hex[:6]}"
    if other == "simulated":
        spec = stock_spec("-c", OTHER_PYTHON, RUNPY)
    else:
        spec = stock_spec("-m", RUNPY)
        spec.command = other
    application(name, spec)
    shell.user_ns["kept"] = "the notebook's value"
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    copy = f"{name}-py{mine.replace('.', '-')}"

    refused = run("%%flmrun\n1 + 1")
    assert isinstance(refused.error, CellFailed), refused.error
    message = str(refused.error)
    assert f"this notebook Python {mine}" in message and "same minor version" in message, message
    assert f"The copy {copy!r}" in message
    assert f"registered {copy!r}, a copy of it with FLAME_PYTHON_VERSION={mine}" in refused.stderr
    registered = magics_of(shell).connection().client().get_application(copy)
    assert registered is not None
    assert {e.name: e.value for e in registered.spec.environments}["FLAME_PYTHON_VERSION"] == mine

    again = run("%%flmrun\n1 + 1")
    assert isinstance(again.error, CellFailed) and "same minor version" in str(again.error)
    assert "registered" not in again.stderr  # the copy is registered once
    assert shell.user_ns["kept"] == "the notebook's value"


# -- a real kernel: live output, interrupt and hard stop on flmrun --------------------------


def on_stock(client) -> None:
    execute(
        client,
        "%load_ext flame_magic\n"
        "import sys\n"
        "from flame_magic.protocol import types as _types\n"
        "_client = get_ipython().magics_manager.registry['FlameMagics'].connection().client()\n"
        f"_client.register_application({STOCK!r}, _types.ApplicationSpec(shim=_types.Host, "
        "command=sys.executable, arguments=['-m', 'flamepy.runner.runpy']))\n"
        f"%config FlameMagics.application = {STOCK!r}",
    )


def test_live_output_arrives_while_the_flmrun_cell_runs(kernel, tmp_path: Path):
    _, client = kernel
    on_stock(client)
    flag = tmp_path / "seen"
    # The cell waits until the test has seen its first line: without live output it would not end.
    msg_id = client.execute(
        f"%%flmrun\nimport os, time\nprint('before', flush=True)\n"
        f"for _ in range(1200):\n    if os.path.exists({str(flag)!r}):\n        break\n"
        "    time.sleep(0.05)\nelse:\n    raise RuntimeError('the first line was not seen live')\n"
        "print('after')"
    )

    def seen(message: dict) -> None:
        if message["msg_type"] == "stream" and "before" in message["content"]["text"]:
            flag.touch()

    messages = messages_until_idle(client, msg_id, timeout=120, on_message=seen)
    mine = [m for m in messages if m["parent_header"].get("msg_id") == msg_id]
    assert not [m for m in mine if m["msg_type"] == "error"], mine
    assert "".join(m["content"]["text"] for m in mine if m["msg_type"] == "stream") == "before\nafter\n"


def test_interrupt_on_flmrun_stops_the_cell_and_keeps_the_runner(kernel):
    manager, client = kernel
    on_stock(client)
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    msg_id = client.execute(
        "%%flmrun\nimport time\nprint('looping', flush=True)\nwhile True:\n    time.sleep(0.05)"
    )
    started: list[float] = []
    messages = messages_until_idle(
        client, msg_id, timeout=120, on_message=interrupt_on(manager, "looping", started)
    )
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert started and errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", errors
    assert "time.sleep(0.05)" in "\n".join(errors[0]["content"]["traceback"])
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] == pid


def test_a_flmrun_cell_blocked_in_c_is_stopped_after_the_grace_and_the_next_cell_runs(kernel):
    manager, client = kernel
    on_stock(client)
    execute(client, "%config FlameMagics.interrupt_grace = 1")
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    pid = outputs[-1]["data"]["text/plain"]
    # One long C call: an asynchronous exception waits for the next Python instruction.
    msg_id = client.execute("%%flmrun\nimport time\nprint('blocked', flush=True)\ntime.sleep(3600)")
    started: list[float] = []
    messages = messages_until_idle(
        client, msg_id, timeout=120, on_message=interrupt_on(manager, "blocked", started)
    )
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert started and errors, messages
    assert "runner was stopped" in "\n".join(errors[0]["content"]["traceback"]), errors
    reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] != pid
    said = "".join(o.get("text", "") for o in outputs if "text" in o)
    assert "this cell runs in a new session" in said and "is gone" in said, outputs
