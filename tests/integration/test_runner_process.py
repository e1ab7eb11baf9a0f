"""The runner as Flame's executor manager sees it: a real process serving a Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flame_magic import codec
from flame_magic.protocol import InstanceStub, cell, instance, types

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 60.0  # a guard against a hang, not a speed limit


def runner_env(endpoint: str | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "FLAME_INSTANCE_ENDPOINT"}
    if endpoint is not None:
        env["FLAME_INSTANCE_ENDPOINT"] = endpoint
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def short_private_dir() -> str:
    # Unix socket paths are limited to about 107 bytes: pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="fm-runner-")
    os.chmod(path, 0o700)
    return path


def wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            details = log.read_text() if log is not None and log.exists() else ""
            pytest.fail(f"timed out waiting for {what}\n{details}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """Whether a process (not necessarily our child) has exited: missing or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as status:
            state = status.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


class Runner:
    """``python -m flame_magic_runner`` started as Flame's executor manager starts it."""

    def __init__(self, directory: str, endpoint_prefix: str = "") -> None:
        self.path = os.path.join(directory, "instance.sock")
        self.log = Path(directory, "runner.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flame_magic_runner"],
                env=runner_env(endpoint_prefix + self.path),
                cwd=directory,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, STARTUP_TIMEOUT, "the runner's socket", self.log)
        self.channel = grpc.insecure_channel(f"unix://{self.path}")
        grpc.channel_ready_future(self.channel).result(timeout=STARTUP_TIMEOUT)
        self.stub = InstanceStub(self.channel)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the runner exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return os.path.exists(self.path)

    def invoke(self, request: cell.CellRequest | None = None, data: bytes | None = None) -> types.TaskResult:
        if request is not None:
            data = codec.encode(request)
        task = instance.TaskContext(task_id="1", session_id="s-1")
        if data is not None:
            task.input = data
        return self.stub.OnTaskInvoke(task, timeout=30)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def cell_request(source: str, **fields) -> cell.CellRequest:  # type: ignore[no-untyped-def]
    fields.setdefault("filename", "<flmrun cell 1>")
    fields.setdefault("first_line", 1)
    return cell.CellRequest(header=codec.local_header(), source=source, **fields)


def hello(header: cell.Header) -> bytes:
    return codec.encode(cell.SessionHello(header=header))


@pytest.fixture
def directory() -> Iterator[str]:
    path = short_private_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    """One runner for the tests that only talk to it; given ``unix://path`` as Flame may."""
    path = short_private_dir()
    started = Runner(path, endpoint_prefix="unix://")
    yield started
    started.close()
    shutil.rmtree(path, ignore_errors=True)


def test_session_enter_accepts_a_hello_from_the_same_versions(runner: Runner) -> None:
    context = instance.SessionContext(session_id="s-1", common_data=hello(codec.local_header()))

    assert runner.stub.OnSessionEnter(context).return_code == 0
    assert runner.stub.OnSessionEnter(instance.SessionContext(session_id="s-1")).return_code == 0


def test_session_enter_refuses_other_versions_with_a_message_naming_them(runner: Runner) -> None:
    other = cell.Header(protocol=codec.PROTOCOL_VERSION, python="2.7", cloudpickle=codec.CLOUDPICKLE_VERSION)

    reply = runner.stub.OnSessionEnter(instance.SessionContext(session_id="s-1", common_data=hello(other)))

    assert reply.return_code == 1
    assert "Python 2.7 there" in reply.message
    assert f"{codec.PYTHON_VERSION} here" in reply.message


def test_a_cell_round_trips(runner: Runner) -> None:
    request = cell_request("y = x * 2\nprint('hello')\ny + 1", assign=["y"])
    request.inputs.add(name="x", pickle=codec.dumps(20))

    reply = runner.invoke(request)

    assert reply.return_code == 0
    result = codec.decode(cell.CellResult, reply.output, "the runner")
    assert [output.stream.text for output in result.outputs] == ["hello\n"]
    assert json.loads(result.result.data_json)["text/plain"] == "41"
    assert {value.name: codec.loads(value.pickle) for value in result.assigned} == {"y": 40}


def test_cells_share_the_process_namespace(runner: Runner) -> None:
    runner.invoke(cell_request("import math\nbase = 3"))

    reply = runner.invoke(cell_request("math.factorial(base)"))

    result = codec.decode(cell.CellResult, reply.output, "the runner")
    assert json.loads(result.result.data_json)["text/plain"] == "6"


def test_cells_run_on_the_main_thread(runner: Runner) -> None:
    reply = runner.invoke(
        cell_request("import threading\nthreading.current_thread() is threading.main_thread()")
    )

    result = codec.decode(cell.CellResult, reply.output, "the runner")
    assert json.loads(result.result.data_json)["text/plain"] == "True"


def test_logging_basic_config_in_a_cell_shows_in_the_notebook(runner: Runner) -> None:
    reply = runner.invoke(cell_request("import logging\nlogging.basicConfig()\nlogging.warning('careful')"))

    result = codec.decode(cell.CellResult, reply.output, "the runner")
    assert [(o.stream.name, o.stream.text) for o in result.outputs] == [("stderr", "WARNING:root:careful\n")]


def test_a_cell_that_raises_fails_the_task_with_its_error(runner: Runner) -> None:
    reply = runner.invoke(cell_request("1 / 0"))

    assert reply.return_code == 1
    assert reply.message == "ZeroDivisionError: division by zero"
    result = codec.decode(cell.CellResult, reply.output, "the runner")
    assert result.error.ename == "ZeroDivisionError"
    assert '"<flmrun cell 1>", line 1, in <module>' in result.error.traceback


def test_a_cell_calling_sys_exit_does_not_stop_the_runner(runner: Runner) -> None:
    reply = runner.invoke(cell_request("import sys\nsys.exit(4)"))

    assert (reply.return_code, reply.message) == (1, "SystemExit: 4")
    assert runner.invoke(cell_request("1")).return_code == 0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xffnot a protobuf", "not a flame-magic CellRequest"),
        (None, "The task has no input"),
        (b"", "without a version header"),
    ],
)
def test_input_that_is_not_a_cell_is_refused(runner: Runner, data: bytes | None, expected: str) -> None:
    reply = runner.invoke(data=data)

    assert reply.return_code == 2
    assert expected in reply.message
    assert "%%flmrun" in reply.message
    assert not reply.HasField("output")


def test_a_cell_from_other_versions_is_refused_before_unpickling(runner: Runner) -> None:
    request = cell_request("1")
    request.header.python = "2.7"
    request.inputs.add(name="x", pickle=b"not even a pickle")

    reply = runner.invoke(request)

    assert reply.return_code == 2
    assert "Python 2.7 there" in reply.message
    assert f"cloudpickle=={codec.CLOUDPICKLE_VERSION}" in reply.message


def test_socket_is_private(runner: Runner) -> None:
    mode = os.stat(runner.path).st_mode

    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_session_leave_then_sigterm_exits_cleanly(directory: str) -> None:
    started = Runner(directory)
    try:
        assert started.stub.OnSessionLeave(types.EmptyRequest()).return_code == 0
        try:
            started.proc.send_signal(signal.SIGTERM)  # as Flame does to the process group
        except ProcessLookupError:
            pass

        assert started.proc.wait(timeout=60) == 0
        assert not os.path.exists(started.path)
    finally:
        started.close()


def test_sigterm_alone_exits_cleanly(directory: str) -> None:
    started = Runner(directory)
    try:
        started.proc.send_signal(signal.SIGTERM)

        assert started.proc.wait(timeout=60) == 0
        assert not os.path.exists(started.path)
    finally:
        started.close()


def test_sigterm_interrupts_a_running_cell_and_exits_promptly(directory: str) -> None:
    started = Runner(directory)
    running = os.path.join(directory, "running")
    # It sleeps far longer than the test may take: the runner exits only if SIGTERM stops it.
    source = f"import time\nopen({running!r}, 'w').close()\ntime.sleep(3600)"
    try:
        task = instance.TaskContext(task_id="1", session_id="s-1", input=codec.encode(cell_request(source)))
        reply = started.stub.OnTaskInvoke.future(task, timeout=90)
        wait_for(lambda: os.path.exists(running), 60, "the cell to start")

        started.proc.send_signal(signal.SIGTERM)

        assert started.proc.wait(timeout=60) == 0
        result = reply.result()
        assert result.return_code == 1
        assert result.message == "KeyboardInterrupt: the runner received SIGTERM"
    finally:
        started.close()


def test_runner_exits_when_its_parent_dies(directory: str) -> None:
    path = os.path.join(directory, "instance.sock")
    parent_code = textwrap.dedent(
        """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-m", "flame_magic_runner"])
        print(child.pid, flush=True)
        child.wait()
        """
    )
    with open(os.path.join(directory, "runner.log"), "wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", parent_code],
            env=runner_env(path),
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        wait_for(lambda: os.path.exists(path), STARTUP_TIMEOUT, "the runner's socket")

        parent.kill()
        parent.wait()

        wait_for(lambda: gone(child), 60, "the orphaned runner to exit")
        assert not os.path.exists(path)
    finally:
        parent.stdout.close()
        if not gone(child):
            os.kill(child, signal.SIGKILL)


def test_missing_endpoint_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flame_magic_runner"],
        env=runner_env(None),
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "FLAME_INSTANCE_ENDPOINT is not set" in done.stderr
