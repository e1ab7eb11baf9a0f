"""The engine's Python API on a fake Flame (see ``fake_flame``): sessions, retries, maps, background cells."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_flame import FakeFlame

from flame_magic.config import Target
from flame_magic.engine import Engine
from flame_magic.errors import FlameError, RemoteError
from flame_magic.fanout import NOT_DONE
from flame_magic.protocol import types

TARGET = Target(endpoint="http://fake-flame:8080", ca_file=None, source="a fake Flame")


@pytest.fixture(autouse=True)
def no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The fake Flame has no object cache: none may be found in the environment either.
    monkeypatch.delenv("FLAME_CACHE_ENDPOINT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def engine_on(flame: FakeFlame, notes: list[str] | None = None) -> Engine:
    return Engine(TARGET, client=flame, notify=(notes.append if notes is not None else None))  # type: ignore[arg-type]


@pytest.fixture
def flame() -> Iterator[FakeFlame]:
    fake = FakeFlame()
    yield fake
    fake.close()


def test_run_gives_value_outputs_and_assigned_names_and_leaves_the_namespace_alone(flame: FakeFlame) -> None:
    namespace = {"xs": [1, 2, 3]}
    with engine_on(flame) as engine:
        result = engine.run("total = sum(xs)\nprint('summed')\ntotal * 2", namespace)
    assert result.value == 12 and result.assigned == {"total": 6}
    assert result.stdout == "summed\n"
    assert namespace == {"xs": [1, 2, 3]}


def test_run_with_update_sets_the_names_in_the_namespace(flame: FakeFlame) -> None:
    namespace: dict[str, object] = {"x": 2}
    with engine_on(flame) as engine:
        engine.run("y = x + 1", namespace, update=True)
    assert namespace == {"x": 2, "y": 3}


def test_run_raises_the_remote_error_as_its_builtin_type(flame: FakeFlame) -> None:
    with engine_on(flame) as engine, pytest.raises(ValueError) as caught:
        engine.run("def parse(text):\n    return int(text)\n\nparse('seven')")
    assert isinstance(caught.value, RemoteError)
    assert "invalid literal" in str(caught.value) and "parse" in caught.value.remote_traceback


def test_assign_names_what_the_cell_did_not_bind(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        result = engine.run("a = 1", assign=["a", "b"])
    assert result.assigned == {"a": 1} and result.missing == ["b"]


def test_cells_share_one_session_whose_runner_keeps_its_state(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        engine.run("import math\nradius = 2", assign=())
        assert engine.run("math.pi * radius ** 2").value == pytest.approx(12.566, rel=1e-3)
    assert len(flame.sessions) == 1


def test_close_closes_the_sessions(flame: FakeFlame) -> None:
    engine = engine_on(flame)
    with engine:
        engine.run("1")
    assert [s.status.state for s in flame.sessions.values()] == [types.Closed]
    assert flame.closed


def test_a_cell_sent_to_a_runner_that_died_runs_again_once_in_a_new_session(flame: FakeFlame) -> None:
    notes: list[str] = []
    with engine_on(flame, notes) as engine:
        engine.run("state = 'on the first runner'")
        [first] = flame.sessions
        flame.kill(first)
        assert engine.run("40 + 2").value == 42
        assert len(flame.sessions) == 2
    assert any("died" in note and "new session" in note for note in notes), notes


def test_map_yields_results_in_input_order_as_they_finish() -> None:
    flame = FakeFlame(hold=True)
    with engine_on(flame) as engine:
        results = engine.map("x * 10", "x", [0, 1, 2], instances=3)
        flame.wait_created(3)  # the window sends every item
        flame.release(2)
        flame.release(0)
        assert next(results) == 0  # item 0 is done; item 1 is not, so item 2 waits behind it
        assert flame.get_task(*flame.created[1]).status.state == types.Running
        flame.release(1)
        assert list(results) == [10, 20]
    flame.close()


def test_map_stops_at_the_first_failure_and_names_its_item(flame: FakeFlame) -> None:
    with engine_on(flame) as engine, pytest.raises(ZeroDivisionError) as caught:
        list(engine.map("10 // x", "x", [5, 0, 2], instances=1))
    assert isinstance(caught.value, RemoteError)


def test_map_with_return_exceptions_puts_failures_in_place(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        results = list(engine.map("10 // x", "x", [5, 0, 2], instances=2, return_exceptions=True))
    assert results[0] == 2 and results[2] == 5
    assert isinstance(results[1], ZeroDivisionError)


def test_map_reads_a_generator_as_it_goes(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        assert list(engine.map("x + 1", "x", (i for i in range(5)))) == [1, 2, 3, 4, 5]


def test_run_map_keeps_the_partial_results_of_a_stopped_map(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        prepared = engine.prepare("100 // x", {}, key=_map_key(1), item="x", assign=())
        outcome = engine.run_map(prepared, [1, 0, 4])
    assert outcome.results[0] == 100 and isinstance(outcome.results[1], ZeroDivisionError)
    assert outcome.results[2] in (NOT_DONE, 25)
    assert outcome.failure is not None and outcome.failure[0] == 1


def test_submit_returns_a_future_that_completes_when_the_cell_ends() -> None:
    flame = FakeFlame(hold=True)
    with engine_on(flame) as engine:
        future = engine.submit("answer = 6 * 7\nanswer")
        assert isinstance(future, concurrent.futures.Future) and not future.done()
        flame.release(0)
        result = future.result(timeout=60)
        assert result.value == 42 and result.assigned == {"answer": 42}
        # its own session, closed once the cell ended
        [session] = flame.sessions.values()
        assert "background" in engine.connection.labels[session.metadata.id]
    flame.close()


def test_a_submitted_cell_can_be_awaited_and_raises_its_error(flame: FakeFlame) -> None:
    with engine_on(flame) as engine:
        assert asyncio.run(_await(engine.submit("1 + 1"))).value == 2
        with pytest.raises(KeyError):
            engine.submit("{}['missing']").result(timeout=60)


def test_cancel_before_the_cell_ends_gives_nothing() -> None:
    flame = FakeFlame(hold=True)
    with engine_on(flame) as engine:
        future = engine.submit("1")
        assert future.cancel() and future.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result()
        flame.release_all()
    flame.close()


def test_an_application_flame_does_not_have_is_named_with_what_to_do(flame: FakeFlame) -> None:
    with Engine(TARGET, "no-such-app", client=flame) as engine:  # type: ignore[arg-type]
        with pytest.raises(FlameError, match="has no application 'no-such-app'.*%flame deploy"):
            engine.run("1")
    assert not flame.sessions


def test_a_session_closed_outside_the_notebook_is_replaced_with_a_note(flame: FakeFlame) -> None:
    notes: list[str] = []
    with engine_on(flame, notes) as engine:
        session_id = engine.connection.session()
        flame.close_session(session_id)  # e.g. flmctl close
        assert engine.run("1").value == 1
        assert engine.connection.session() != session_id
    assert any("closed or deleted outside this notebook" in note for note in notes), notes


def test_the_engine_imports_and_runs_without_ipython(tmp_path: Path) -> None:
    # A Python where importing IPython fails: the engine must not need it.
    blocker = tmp_path / "IPython"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('IPython is not installed here')\n")
    script = textwrap.dedent(
        """
        import sys
        from fake_flame import FakeFlame
        from flame_magic.config import Target
        from flame_magic.engine import Engine
        assert "IPython" not in sys.modules
        target = Target(endpoint="http://fake-flame:8080", ca_file=None, source="a fake Flame")
        with Engine(target, client=FakeFlame()) as engine:
            print(engine.run("sum(xs)", {"xs": [1, 2, 3]}).value, list(engine.map("x * x", "x", range(4))))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent)])}
    env.pop("FLAME_CACHE_ENDPOINT", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "[0,", "1,", "4,", "9]"]


def _map_key(instances: int):  # type: ignore[no-untyped-def]
    from flame_magic.sessions import SessionKey

    return SessionKey(instances=instances, warm=0)


async def _await(future: concurrent.futures.Future) -> object:  # type: ignore[type-arg]
    return await future  # type: ignore[misc]
