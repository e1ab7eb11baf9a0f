"""The notebook survives what a user does (issue 19), through a real kernel or real processes:
its own modules beside the notebook, a dead embedded Flame, private sockets."""

from __future__ import annotations

import os
import queue
import signal
import stat
import threading
import time

import pytest
from jupyter_client.manager import start_new_kernel

from flame_magic.embedded import EmbeddedFlame

FLAME_PID = "print(get_ipython().magics_manager.registry['FlameMagics'].connection()._embedded.pid)"


def execute(client, code: str, timeout: float = 120) -> tuple[dict, list[dict]]:
    """Run ``code`` in the kernel; its reply and what it showed (stream, results, errors)."""
    outputs: list[dict] = []

    def keep(message: dict) -> None:
        if message["msg_type"] in ("stream", "execute_result", "display_data", "error"):
            outputs.append(message["content"])

    reply = client.execute_interactive(code, timeout=timeout, output_hook=keep)
    return reply["content"], outputs


def stream(outputs: list[dict], name: str) -> str:
    return "".join(o["text"] for o in outputs if o.get("name") == name)


def result(outputs: list[dict]) -> str:
    return next(o["data"]["text/plain"] for o in outputs if "data" in o)


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, bound: float = 60) -> None:
    """Wait for ``pid`` to exit; the bound is only against a hang."""
    deadline = time.monotonic() + bound
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {bound} s"
        time.sleep(0.05)


@pytest.fixture
def kernel_in(isolated_home, tmp_path):
    """Start real kernels whose working directory (the notebook's) is a given directory."""
    started = []

    def start(cwd):
        manager, client = start_new_kernel(kernel_name="python3", env={**os.environ}, cwd=str(cwd))
        started.append((manager, client))
        return manager, client

    yield start
    for manager, client in started:
        client.stop_channels()
        if manager.is_alive():
            manager.shutdown_kernel(now=True)


USER_MODULE = "WHO = 'the user'\n"


@pytest.mark.parametrize("layout", ["runner.py", "runner/__init__.py"])
def test_a_runner_module_beside_the_notebook_is_the_cells_own(kernel_in, tmp_path, layout):
    notebook_dir = tmp_path / "notebook"
    (notebook_dir / layout).parent.mkdir(parents=True, exist_ok=True)
    (notebook_dir / layout).write_text(USER_MODULE)
    _, client = kernel_in(notebook_dir)
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nimport os, runner\nprint(runner.WHO, os.getcwd(), sep='|')")
    assert reply["status"] == "ok", outputs
    assert stream(outputs, "stdout").strip() == f"the user|{notebook_dir}"


def test_modules_the_runner_uses_cannot_be_shadowed_by_the_notebooks_files(kernel_in, tmp_path):
    # Files named like what the embedded Flame and its runner import, in the directory the
    # notebook is in when its first cell starts them. The kernel itself was started elsewhere
    # (with them beside it, it could not load the extension either).
    start_dir, notebook_dir = tmp_path / "start", tmp_path / "notebook"
    start_dir.mkdir()
    (notebook_dir / "runner").mkdir(parents=True)
    broken = "raise ImportError('the notebook directory shadowed this module')\n"
    for name in ("grpc.py", "flame_magic.py", "cloudpickle.py"):
        (notebook_dir / name).write_text(broken)
    (notebook_dir / "runner" / "__init__.py").write_text(USER_MODULE)
    _, client = kernel_in(start_dir)
    execute(client, f"%load_ext flame_magic\nimport os\nos.chdir({str(notebook_dir)!r})")
    reply, outputs = execute(client, "%%flmrun\nimport os, runner\nprint(runner.WHO, os.getcwd(), sep='|')")
    assert reply["status"] == "ok", outputs
    assert stream(outputs, "stdout").strip() == f"the user|{notebook_dir}"
    # ... and the directory is still the first place a cell imports from, as in the kernel.
    reply, outputs = execute(client, "%%flmrun\nimport sys\nprint(sys.path[0])")
    assert stream(outputs, "stdout").strip() == str(notebook_dir)
    reply, outputs = execute(client, "%%flmrun\nrunner.WHO")
    assert reply["status"] == "ok" and result(outputs) == "'the user'"


def test_a_dead_embedded_flame_is_replaced_and_the_user_told(kernel_in, tmp_path):
    _, client = kernel_in(tmp_path)
    execute(client, "%load_ext flame_magic")
    reply, outputs = execute(client, "%%flmrun\nx = 1\nx")
    assert reply["status"] == "ok", outputs
    _, outputs = execute(client, FLAME_PID)
    first = int(stream(outputs, "stdout"))
    os.kill(first, signal.SIGKILL)
    wait_gone(first)

    # The next cell starts a new embedded Flame by itself and says, in one line, what was lost.
    reply, outputs = execute(client, "%%flmrun\ny = 2\ny")
    assert reply["status"] == "ok", "\n".join(reply.get("traceback", [])) + str(outputs)
    assert result(outputs) == "2"
    notice = stream(outputs, "stderr").strip()
    assert "embedded Flame had stopped" in notice and "lost" in notice and "\n" not in notice
    _, outputs = execute(client, FLAME_PID)
    second = int(stream(outputs, "stdout"))
    assert second != first

    # Status and close work too, after a death, without a raw gRPC error.
    os.kill(second, signal.SIGKILL)
    wait_gone(second)
    reply, outputs = execute(client, "%flame status")
    assert reply["status"] == "ok", outputs
    shown = stream(outputs, "stdout") + stream(outputs, "stderr")
    assert "embedded Flame had stopped" in shown and "Connection refused" not in shown
    reply, outputs = execute(client, "%flame close")
    assert reply["status"] == "ok", outputs
    assert "No open sessions." in stream(outputs, "stdout")
    reply, outputs = execute(client, "%%flmrun\n'works'")
    assert reply["status"] == "ok" and result(outputs) == "'works'"

    # A cell that runs while it dies fails with a sentence, not gRPC's words.
    _, outputs = execute(client, FLAME_PID)
    third = int(stream(outputs, "stdout"))
    # stop_on_error=False: the kernel would otherwise abort the next request if it came in
    # while it still aborts the queue after this error (a race on a loaded machine).
    msg_id = client.execute(
        f"%%flmrun\nprint('waiting', flush=True)\n{wait_for_file(tmp_path / 'never')}", stop_on_error=False
    )
    seen: list[dict] = []
    read_until(client, seen, lambda s: "waiting" in printed(s, msg_id))
    os.kill(third, signal.SIGKILL)
    reply = client.get_shell_msg(timeout=120)["content"]
    assert reply["status"] == "error"
    assert "embedded Flame stopped while it ran" in reply["evalue"], reply
    reply, outputs = execute(client, "%%flmrun\n'and again'")
    assert reply["status"] == "ok" and result(outputs) == "'and again'"


def test_the_embedded_flames_sockets_are_private(tmp_path):
    with EmbeddedFlame.start(working_directory=str(tmp_path)) as flame:
        assert flame.cache_endpoint is not None and flame.cache_endpoint.startswith("grpc+unix://")
        sockets = [flame.endpoint[len("unix://") :], flame.cache_endpoint[len("grpc+unix://") :]]
        assert [os.path.basename(p) for p in sockets] == ["flame.sock", "cache.sock"]
        for path in sockets:
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        assert stat.S_IMODE(os.stat(flame.state_dir).st_mode) == 0o700


def test_a_large_last_expression_does_not_cost_the_cells_names(run, shell):
    for name in ("a4", "np", "s"):
        shell.user_ns.pop(name, None)
    ran = run("%%flmrun\nimport numpy as np\na4 = np.zeros(10)\n'z' * 4_500_000")
    assert ran.error is None, ran.error
    assert ran.value == "z" * 4_500_000
    assert shell.user_ns["a4"].shape == (10,) and shell.user_ns["np"].__name__ == "numpy"
    assert "did not fit" not in ran.stderr and "still defined" not in ran.stderr, ran.stderr

    ran = run("%%flmrun\ns = 'x' * 5_000_000\ns")
    assert ran.error is None, ran.error
    assert shell.user_ns["s"] == "x" * 5_000_000 and ran.value == shell.user_ns["s"]
    assert ran.stderr == "", ran.stderr


def test_the_embedded_flame_and_its_runners_end_with_their_kernel_however_it_ends(kernel_in, tmp_path):
    # Two kernels end together: one is killed (SIGKILL: no atexit, nothing cleans up) in the
    # middle of a cell, the other is shut down as Jupyter does it.
    kernels = [kernel_in(tmp_path), kernel_in(tmp_path)]
    processes = []
    for _, client in kernels:
        execute(client, "%load_ext flame_magic")
        reply, outputs = execute(client, "%%flmrun\nimport os\nos.getpid()")
        assert reply["status"] == "ok", outputs
        runner = int(result(outputs))
        _, outputs = execute(client, FLAME_PID)
        processes += [int(stream(outputs, "stdout")), runner]
    (_, busy), (graceful, _) = kernels
    _, outputs = execute(busy, "import os; print(os.getpid())")
    busy_pid = int(stream(outputs, "stdout"))
    busy.execute("%%flmrun\nimport time\nprint('busy', flush=True)\ntime.sleep(600)")
    deadline = time.monotonic() + 60
    while "busy" not in str(busy.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))["content"]):
        pass
    stopper = threading.Thread(target=graceful.shutdown_kernel)
    stopper.start()
    os.kill(busy_pid, signal.SIGKILL)
    stopper.join(120)
    for pid in processes:
        wait_gone(pid, bound=60)


def read_until(client, seen: list[dict], done, bound: float = 90) -> None:
    """Read IOPub messages into ``seen`` until ``done(seen)``; the bound is only against a hang."""
    deadline = time.monotonic() + bound
    while not done(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"not seen within {bound} s: {[m['content'] for m in seen][-10:]}"
        try:
            seen.append(client.get_iopub_msg(timeout=min(left, 5)))
        except queue.Empty:
            pass


def printed(seen: list[dict], msg_id: str) -> str:
    return "".join(
        m["content"]["text"]
        for m in seen
        if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
    )


def wait_for_file(path) -> str:
    """Cell lines that block until the test creates ``path``: the cell is busy until then."""
    return f"import os, time\nwhile not os.path.exists({str(path)!r}):\n    time.sleep(0.05)\n"


def test_a_background_cells_output_is_live_in_the_cell_it_started_from(kernel_in, tmp_path):
    _, client = kernel_in(tmp_path)
    execute(client, "%load_ext flame_magic")
    go = tmp_path / "go"
    background = client.execute(
        f"%%flmrun --background job\nprint('first', flush=True)\n{wait_for_file(go)}print('second')\n'done'"
    )
    seen: list[dict] = []
    # 'first' shows while the cell still waits (it ends only once the file exists).
    read_until(client, seen, lambda s: "first" in printed(s, background))
    go.touch()
    read_until(client, seen, lambda s: "second" in printed(s, background))
    assert printed(seen, background).endswith("first\nsecond\n")
    reply, outputs = execute(client, "print(job.result())")
    assert stream(outputs, "stdout").strip() == "done"


def test_a_maps_output_is_live_per_item_in_input_order(kernel_in, tmp_path):
    _, client = kernel_in(tmp_path)
    execute(client, "%load_ext flame_magic\nxs = [0, 1]")
    go = tmp_path / "go"
    # Each item blocks until the test creates its file, go0 or go1.
    msg_id = client.execute(
        "%%flmrun --map x=xs --into out --instances 2\nimport os, time\nprint('start', x, flush=True)\n"
        f"while not os.path.exists({str(go)!r} + str(x)):\n    time.sleep(0.05)\nprint('end', x)\nx"
    )
    seen: list[dict] = []
    read_until(client, seen, lambda s: "start 0" in printed(s, msg_id))
    assert printed(seen, msg_id) == "start 0\n"  # item 1 (running too) waits for its turn
    (tmp_path / "go0").touch()
    read_until(client, seen, lambda s: "start 1" in printed(s, msg_id))
    (tmp_path / "go1").touch()
    read_until(
        client,
        seen,
        lambda s: any(
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == msg_id
            and m["content"]["execution_state"] == "idle"
            for m in s
        ),
    )
    assert printed(seen, msg_id) == "start 0\nend 0\nstart 1\nend 1\n"
    mine = [m for m in seen if m["parent_header"].get("msg_id") == msg_id]
    assert len([m for m in mine if m["msg_type"] == "display_data"]) == 1  # the progress display
    reply, outputs = execute(client, "print(out)")
    assert stream(outputs, "stdout").strip() == "[0, 1]"
