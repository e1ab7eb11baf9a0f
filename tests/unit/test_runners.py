"""PendingWatch and the failed-task tests of flame_magic.runners, against a fake Flame client.

The fake stands for Flame's Frontend as far as ListExecutor and GetApplication go; the clock
is a fake too (the module's ``time.monotonic``), so nothing here waits.
"""

from __future__ import annotations

import pytest

from flame_magic import runners
from flame_magic.client import FlameError
from flame_magic.protocol import types


class FakeClient:
    """Flame's executors as a list the test changes, and one application."""

    def __init__(self) -> None:
        self.executors: list[types.Executor] = []

    def list_executors(self) -> list[types.Executor]:
        return list(self.executors)

    def get_application(self, name: str) -> types.Application:
        spec = types.ApplicationSpec(command="/opt/py/bin/python", arguments=["-m", "flame_magic_runner"])
        return types.Application(metadata=types.Metadata(name=name), spec=spec)


def executor(session_id: str, state: int) -> types.Executor:
    return types.Executor(status=types.ExecutorStatus(state=state, session_id=session_id))


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(runners.time, "monotonic", lambda: now[0])
    return now


def watch(client, notes, describe=lambda sid: None, make_room=None, start_timeout=60.0):
    return runners.PendingWatch(client, "mine", "fm", start_timeout, describe, notes.append, make_room)


def test_a_runner_that_stays_binding_fails_after_the_start_timeout(clock):
    client, notes = FakeClient(), []
    client.executors = [executor("mine", types.ExecutorBinding)]
    pending = watch(client, notes)
    for _ in range(60):
        pending()
        clock[0] += runners.CHECK_SECONDS
    with pytest.raises(runners.RunnerStartTimeout, match="'fm' started within 60 s") as failed:
        pending()
    assert "/opt/py/bin/python -m flame_magic_runner" in str(failed.value)
    assert not notes


def test_a_bound_runner_stops_the_start_clock_and_zero_waits_for_ever(clock):
    client, notes = FakeClient(), []
    client.executors = [executor("mine", types.ExecutorBinding)]
    pending = watch(client, notes, start_timeout=0)
    for _ in range(1000):
        pending()
        clock[0] += runners.CHECK_SECONDS
    client.executors = [executor("mine", types.ExecutorBound)]
    pending = watch(client, notes, start_timeout=5)
    for _ in range(100):
        pending()
        clock[0] += runners.CHECK_SECONDS


def test_waiting_for_room_frees_idle_maps_first_then_says_what_holds_it_once(clock):
    client, notes = FakeClient(), []
    client.executors = [
        executor("default", types.ExecutorBound),
        executor("other", types.ExecutorBound),
        executor("", types.ExecutorUnbinding),
    ]
    tried = []

    def make_room():
        tried.append(1)
        return []

    named = {"default": "the default session default (`%flame close`)"}
    pending = watch(client, notes, describe=named.get, make_room=make_room)
    for _ in range(10):
        pending()
        clock[0] += runners.CHECK_SECONDS
    assert tried == [1] and len(notes) == 1
    assert "the default session default (`%flame close`) holds 1 executor" in notes[0]
    assert "other notebooks or clients hold 1 executor" in notes[0]
    assert "1 executor being released" in notes[0]

    notes.clear()
    pending = watch(client, notes, describe=named.get, make_room=lambda: ["map-1"])
    for _ in range(runners.ROOM_CHECKS):
        pending()
        clock[0] += runners.CHECK_SECONDS
    assert notes == [
        "closed this notebook's idle --map session map-1 to give its executors to this cell "
        "(the next map starts its runners anew)."
    ]


def test_a_flame_that_lists_no_executors_is_left_alone(clock):
    class Silent(FakeClient):
        def list_executors(self):
            raise FlameError("refused to list executors (UNIMPLEMENTED)")

    notes: list[str] = []
    pending = watch(Silent(), notes, start_timeout=1)
    for _ in range(10):
        pending()
        clock[0] += runners.CHECK_SECONDS
    assert not notes


def failed(message: str, output: bytes | None = None) -> types.Task:
    event = types.Event(code=3, message=message)
    return types.Task(
        spec=types.TaskSpec(output=output), status=types.TaskStatus(state=types.Failed, events=[event])
    )


def test_only_failed_calls_to_the_runner_are_lost_runners():
    assert runners.runner_lost(failed("transport error"))
    assert runners.runner_lost(failed("Connection refused (os error 111)"))
    assert runners.runner_lost(failed("The application process of executor <e> (pid 3) died while running"))
    assert not runners.runner_lost(failed("ZeroDivisionError: division by zero", output=b"result"))
    assert not runners.runner_lost(failed("flame-magic's runner failed while running the cell: Error()"))
    assert runners.never_reached("Connection refused (os error 111)")
    assert not runners.never_reached("transport error")
