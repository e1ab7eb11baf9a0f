"""%%flmrun --background through a real shell, embedded Flame and runners."""

from __future__ import annotations

import concurrent.futures

import pytest
from test_embedded_flame import wait_for

from flame_magic.errors import RemoteError


@pytest.fixture(scope="module", autouse=True)
def close_sessions_after(shell):
    yield
    shell.run_line_magic("flame", "close")


def wait_for_file(path: str) -> str:
    """Cell source: wait until ``path`` exists (a guard of 60 s against a hang, not a speed limit)."""
    return (
        "import os, time\ndeadline = time.monotonic() + 60\n"
        f"while not os.path.exists({path!r}) and time.monotonic() < deadline:\n    time.sleep(0.02)\n"
        f"assert os.path.exists({path!r}), 'the test never let the cell go on'\n"
    )


def sessions_closed(shell, label: str) -> list:  # type: ignore[no-untyped-def]
    """This notebook's sessions labelled ``label``, once all are closed (else an empty list)."""
    connection = shell.magics_manager.registry["FlameMagics"].connection()
    infos = [i for i in connection.sessions() if i.label == label]
    return infos if infos and all(i.state == "Closed" for i in infos) else []


def test_cell_returns_at_once_and_its_value_and_names_arrive(run, shell, tmp_path):
    shell.user_ns.pop("made_in_background", None)
    gate = tmp_path / "go-on"
    # The cell cannot end before the test lets it: the magic returned while it still ran.
    ran = run(
        "%%flmrun --background job\n"
        + wait_for_file(str(gate))
        + "made_in_background = 21\nmade_in_background * 2"
    )
    assert ran.error is None, ran.error
    job = shell.user_ns["job"]
    assert not job.done() and "running" in repr(job)
    assert "made_in_background" not in shell.user_ns
    assert "`job.result()`" in ran.stdout
    gate.touch()
    assert job.result(timeout=60) == 42
    assert shell.user_ns["made_in_background"] == 21  # assigned when the cell finished
    assert job.done() and repr(job).endswith("done>")
    assert not job.cancel()  # too late: it is done
    assert run("await job").value == 42


def test_several_background_cells_run_at_once(run, shell, tmp_path):
    # Each cell says it started, then waits until the other one has: they can both end
    # only if both ran at the same time.
    cell = "%%flmrun --background {me}\nopen({mine!r}, 'w').close()\n{wait}'{me} saw {other}'"
    started = {name: str(tmp_path / f"{name}-started") for name in ("first", "second")}
    for me, other in (("first", "second"), ("second", "first")):
        source = cell.format(me=me, other=other, mine=started[me], wait=wait_for_file(started[other]))
        assert run(source).error is None
    assert shell.user_ns["first"].result(timeout=90) == "first saw second"
    assert shell.user_ns["second"].result(timeout=90) == "second saw first"
    # Meanwhile the notebook's own session still runs cells.
    assert run("%%flmrun\n'foreground'").value == "foreground"


def test_a_failing_background_cell_raises_from_its_handle(run, shell):
    assert run("%%flmrun --background broken\n{}['missing']").error is None
    broken = shell.user_ns["broken"]
    with pytest.raises(KeyError) as caught:
        broken.result(timeout=60)
    assert isinstance(caught.value, RemoteError)
    assert "failed: KeyError" in repr(broken)


def test_cancel_stops_waiting_and_assigns_nothing(run, shell, tmp_path):
    shell.user_ns.pop("never_assigned", None)
    running, gate = tmp_path / "running", tmp_path / "go-on"
    source = f"%%flmrun --background slow\nopen({str(running)!r}, 'w').close()\n" + wait_for_file(str(gate))
    assert run(source + "never_assigned = 1\nprint('shown?')").error is None
    slow = shell.user_ns["slow"]
    wait_for(running.exists)  # cancelled while it runs: it finishes on its runner
    assert slow.cancel() and slow.cancelled() and slow.done()
    with pytest.raises(concurrent.futures.CancelledError):
        slow.result()
    gate.touch()
    # The cell's own session closes once its task has ended: after that nothing can arrive.
    [session] = wait_for(lambda: sessions_closed(shell, "background `slow`"))
    assert session.succeed == 1  # it did run to its end on the runner
    assert "never_assigned" not in shell.user_ns


def test_background_cell_in_a_named_session_shares_its_runner(run, shell):
    pid = run("%%flmrun --session bg\nimport os\nos.getpid()").value
    assert run("%%flmrun --background same --session bg\nimport os\nos.getpid()").error is None
    assert shell.user_ns["same"].result(timeout=60) == pid
