"""MapRun on a fake Flame (see ``fake_flame``): the window of tasks, input order, stopping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fake_flame import FakeFlame

from flame_magic import codec
from flame_magic.errors import RemoteError
from flame_magic.fanout import AHEAD_PER_INSTANCE, NOT_DONE, MapOutcome, MapRun, item_payloads
from flame_magic.protocol import cell, types
from flame_magic.results import load_value
from flame_magic.sessions import SessionKey


@pytest.fixture
def flame() -> Iterator[FakeFlame]:
    fake = FakeFlame(hold=True)
    yield fake
    fake.release_all()
    fake.close()


def _result(task: types.Task) -> cell.CellResult:
    return codec.decode(cell.CellResult, task.spec.output, "the runner")


def _map(flame: FakeFlame, source: str, items: list[Any], instances: int, **options: Any) -> MapRun:
    session_id = "s-1"
    flame.open_session(session_id, SessionKey(instances=instances).spec("flame-magic", b""))
    request = cell.CellRequest(header=codec.local_header(), source=source, filename="<map>", values_only=True)
    payloads = item_payloads(codec.encode(request), "x", items, 1 << 20)
    return MapRun(
        flame,  # type: ignore[arg-type]
        session_id,
        payloads,
        instances,
        result_of=_result,
        value_of=lambda raw: load_value(raw, lambda value: codec.loads(value.pickle)),
        **options,
    )


def _start(run: MapRun) -> tuple[threading.Thread, list[MapOutcome]]:
    outcomes: list[MapOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run.run()), daemon=True)
    thread.start()
    return thread, outcomes


def test_results_are_in_input_order_when_items_finish_in_reverse(flame: FakeFlame) -> None:
    run = _map(flame, "x * 2", list(range(4)), instances=4)
    thread, outcomes = _start(run)
    flame.wait_created(4)
    for index in reversed(range(4)):
        flame.release(index)
    thread.join(60)
    assert outcomes[0].results == [0, 2, 4, 6]


def test_the_window_sends_no_more_items_than_the_runners_can_take_ahead(flame: FakeFlame) -> None:
    run = _map(flame, "x", list(range(20)), instances=1)
    thread, outcomes = _start(run)
    window = 1 + AHEAD_PER_INSTANCE  # nothing finished yet: no rate to send more for
    flame.wait_created(window)
    assert len(flame.created) == window
    flame.release(0)
    flame.wait_created(window + 1)  # one finished: one more goes
    run.stop()
    flame.release_all()
    thread.join(60)
    assert outcomes[0].interrupted and outcomes[0].results[0] == 0
    assert NOT_DONE in outcomes[0].results  # the items never sent did not run


def test_ordered_yields_each_result_once_those_before_it_are_done(flame: FakeFlame) -> None:
    run = _map(flame, "x + 100", [0, 1, 2], instances=3)
    thread, _ = _start(run)
    flame.wait_created(3)
    flame.release(1)
    results = run.ordered()
    flame.release(0)
    assert next(results) == (0, 100)
    assert next(results) == (1, 101)
    flame.release(2)
    assert list(results) == [(2, 102)]
    thread.join(60)


def test_the_first_failure_stops_the_map_and_keeps_what_finished(flame: FakeFlame) -> None:
    run = _map(flame, "10 // x", [1, 0, 5, 2, 4, 8], instances=1, stop_at_failure=True)
    thread, outcomes = _start(run)
    flame.wait_created(3)
    flame.release(0)
    flame.release(1)
    thread.join(60)
    outcome = outcomes[0]
    assert outcome.failure is not None and outcome.failure[0] == 1
    assert isinstance(outcome.failure[1], RemoteError) and isinstance(outcome.failure[1], ZeroDivisionError)
    assert outcome.results[0] == 10 and outcome.results[-1] is NOT_DONE
    assert outcome.left_running >= 1  # sent, not finished: they may still run on Flame
