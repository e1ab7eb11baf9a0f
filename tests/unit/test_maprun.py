"""MapRun on a fake Flame (see ``fake_flame``): the window of tasks, input order, stopping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fake_flame import FakeFlame

from flame_magic import codec
from flame_magic.errors import RemoteError
from flame_magic.fanout import AHEAD_PER_INSTANCE, NOT_DONE, MapRun
from flame_magic.items import MapOutcome, item_payloads
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
    shared = codec.encode(request)
    payloads = item_payloads(shared, "x", items, 1 << 20)
    return MapRun(
        flame,  # type: ignore[arg-type]
        session_id,
        shared,
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


# -- batches: several items per task ----------------------------------------------------

# The cell records, on its runner, each item it ran (a runner's namespace persists).
RECORDING = "ran = globals().setdefault('ran', [])\nran.append(x)\n10 // x"


def _ran(flame: FakeFlame) -> list[Any]:
    return list(flame.runners["s-1"].namespace.get("ran", []))


def test_batches_keep_input_order_when_they_finish_in_reverse(flame: FakeFlame) -> None:
    run = _map(flame, "x * 2", list(range(10)), instances=2, batch_size=3)
    thread, outcomes = _start(run)
    flame.wait_created(4)  # 10 items in tasks of 3, 3, 3 and 1
    for index in reversed(range(4)):
        flame.release(index)
    thread.join(60)
    assert outcomes[0].results == [x * 2 for x in range(10)]
    assert len(flame.created) == 4


def test_a_failure_inside_a_batch_ends_the_batch_and_the_map(flame: FakeFlame) -> None:
    run = _map(flame, RECORDING, [1, 2, 0, 5, 10], instances=1, batch_size=5, stop_at_failure=True)
    thread, outcomes = _start(run)
    flame.wait_created(1)
    flame.release_all()
    thread.join(60)
    outcome = outcomes[0]
    assert outcome.failure is not None and outcome.failure[0] == 2
    assert isinstance(outcome.failure[1], ZeroDivisionError)
    assert outcome.results[:2] == [10, 5] and outcome.results[3:] == [NOT_DONE, NOT_DONE]
    assert _ran(flame) == [1, 2, 0]  # the items after the failed one did not run


def test_return_exceptions_runs_the_rest_of_a_batch_after_a_failure(flame: FakeFlame) -> None:
    run = _map(flame, RECORDING, [1, 2, 0, 5, 10], instances=1, batch_size=5, stop_at_failure=False)
    thread, outcomes = _start(run)
    flame.wait_created(1)
    flame.release_all()
    thread.join(60)
    results = outcomes[0].results
    assert results[:2] == [10, 5] and results[3:] == [2, 1]
    assert isinstance(results[2], ZeroDivisionError) and isinstance(results[2], RemoteError)
    assert _ran(flame) == [1, 2, 0, 5, 10]


def test_an_interrupt_leaves_only_the_batches_in_flight(flame: FakeFlame) -> None:
    run = _map(flame, RECORDING, list(range(1, 41)), instances=1, batch_size=2)
    thread, outcomes = _start(run)
    window = (1 + AHEAD_PER_INSTANCE) * 2  # three batches of two for the one runner
    flame.wait_created(window // 2)
    run.stop()
    flame.release_all()
    thread.join(60)
    outcome = outcomes[0]
    assert outcome.interrupted
    assert len(flame.created) == window // 2  # nothing sent after the interrupt
    assert outcome.results[window:] == [NOT_DONE] * (40 - window)
    assert _ran(flame) == list(range(1, window + 1))


def test_quick_items_go_several_to_a_task(flame: FakeFlame) -> None:
    flame.hold = False
    run = _map(flame, "x + 1", list(range(300)), instances=1)
    thread, outcomes = _start(run)
    thread.join(60)
    assert outcomes[0].results == [x + 1 for x in range(300)]
    assert 1 < len(flame.created) < 300  # the first alone, the rest in batches
