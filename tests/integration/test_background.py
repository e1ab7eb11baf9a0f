"""%%flmrun --background through a real shell, embedded Flame and runners."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from flame_magic.errors import RemoteError


@pytest.fixture(scope="module", autouse=True)
def close_sessions_after(shell):
    yield
    shell.run_line_magic("flame", "close")


def test_cell_returns_at_once_and_its_value_and_names_arrive(run, shell):
    shell.user_ns.pop("made_in_background", None)
    started = time.monotonic()
    ran = run(
        "%%flmrun --background job\n"
        "import time\ntime.sleep(1)\nmade_in_background = 21\nmade_in_background * 2"
    )
    assert ran.error is None, ran.error
    assert time.monotonic() - started < 1
    job = shell.user_ns["job"]
    assert not job.done() and "running" in repr(job)
    assert "`job.result()`" in ran.stdout
    assert job.result(timeout=30) == 42
    assert shell.user_ns["made_in_background"] == 21  # assigned when the cell finished
    assert job.done() and repr(job).endswith("done>")
    assert not job.cancel()  # too late: it is done
    assert run("await job").value == 42


def test_several_background_cells_run_at_once(run, shell):
    cell = "%%flmrun --background {}\nimport time\nt0 = time.time()\ntime.sleep(1.5)\n(t0, time.time())"
    for name in ("first", "second"):
        assert run(cell.format(name)).error is None
    (a_start, a_end) = shell.user_ns["first"].result(timeout=30)
    (b_start, b_end) = shell.user_ns["second"].result(timeout=30)
    assert max(a_start, b_start) < min(a_end, b_end), "the two cells did not overlap"
    # Meanwhile the notebook's own session still runs cells.
    assert run("%%flmrun\n'foreground'").value == "foreground"


def test_a_failing_background_cell_raises_from_its_handle(run, shell):
    assert run("%%flmrun --background broken\n{}['missing']").error is None
    broken = shell.user_ns["broken"]
    with pytest.raises(KeyError) as caught:
        broken.result(timeout=30)
    assert isinstance(caught.value, RemoteError)
    assert "failed: KeyError" in repr(broken)


def test_cancel_stops_waiting_and_assigns_nothing(run, shell):
    shell.user_ns.pop("never_assigned", None)
    assert run("%%flmrun --background slow\nimport time\ntime.sleep(2)\nnever_assigned = 1").error is None
    slow = shell.user_ns["slow"]
    assert slow.cancel() and slow.cancelled() and slow.done()
    with pytest.raises(concurrent.futures.CancelledError):
        slow.result()
    time.sleep(2.5)
    assert "never_assigned" not in shell.user_ns


def test_background_cell_in_a_named_session_shares_its_runner(run, shell):
    pid = run("%%flmrun --session bg\nimport os\nos.getpid()").value
    assert run("%%flmrun --background same --session bg\nimport os\nos.getpid()").error is None
    assert shell.user_ns["same"].result(timeout=30) == pid
