"""The magics on a fake Flame (see ``fake_flame``): what a user sees, without a Flame to run on.

A real IPython shell runs the cells; only Flame is fake (its runner is the real evaluator).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fake_flame import FakeFlame
from IPython.core.error import UsageError

from flame_magic.config import Target
from flame_magic.engine import Engine
from flame_magic.errors import CellFailed, FlameError, RemoteError, ShipError
from flame_magic.fanout import NOT_DONE
from flame_magic.magics import user_errors

TARGET = Target(endpoint="http://fake-flame:8080", ca_file=None, source="a fake Flame")


@pytest.fixture
def fake(shell: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFlame]:
    """The shell's magics on an engine whose Flame is fake (the shell's own engine is put back)."""
    monkeypatch.delenv("FLAME_CACHE_ENDPOINT", raising=False)
    flame = FakeFlame()
    magics = shell.magics_manager.registry["FlameMagics"]
    engine = Engine(TARGET, client=flame)  # type: ignore[arg-type]
    monkeypatch.setattr(magics, "_engine", engine)
    yield flame
    engine.close()


def test_user_errors_is_where_errors_become_what_a_user_sees() -> None:
    with pytest.raises(UsageError, match="cannot travel"), user_errors():
        raise ShipError("cannot travel")
    with pytest.raises(CellFailed, match="Flame refused"), user_errors():
        raise FlameError("Flame refused")
    with pytest.raises(KeyError), user_errors():
        raise KeyError("not ours: as it is")


def test_a_cell_shows_its_output_assigns_its_names_and_returns_its_value(
    run: Any, shell: Any, fake: FakeFlame
) -> None:
    shell.user_ns["xs"] = [1, 2, 3]
    ran = run("%%flmrun\nprint('on the runner')\ntotal = sum(xs)\ntotal * 10")
    assert ran.error is None and ran.value == 60
    assert "on the runner" in ran.stdout and shell.user_ns["total"] == 6


def test_assign_names_what_did_not_come_back(run: Any, shell: Any, fake: FakeFlame) -> None:
    ran = run("%%flmrun --assign a,b\na = 1")
    assert ran.error is None and shell.user_ns["a"] == 1
    assert "did not bind `b`" in ran.stderr


def test_a_remote_error_is_raised_as_its_type(run: Any, fake: FakeFlame) -> None:
    ran = run("%%flmrun\nint('seven')")
    assert isinstance(ran.error, ValueError) and isinstance(ran.error, RemoteError)


def test_options_that_do_not_go_together_are_one_line(run: Any, fake: FakeFlame) -> None:
    ran = run("%%flmrun --into out\n1")
    assert isinstance(ran.error, UsageError) and "--into goes with --map" in str(ran.error)
    assert not fake.created


def test_a_failed_map_item_is_raised_naming_it_and_the_results_are_kept(
    run: Any, shell: Any, fake: FakeFlame
) -> None:
    ran = run("%%flmrun --map x=[5, 0, 2] --into out --instances 1\n10 // x")
    assert isinstance(ran.error, ZeroDivisionError)
    assert any("Item 1 of 3 failed (x=0)" in note for note in ran.error.__notes__)
    out = shell.user_ns["out"]
    assert out[0] == 2 and isinstance(out[1], ZeroDivisionError) and out[2] in (NOT_DONE, 5)


def test_a_map_with_return_exceptions_gives_every_result(run: Any, fake: FakeFlame) -> None:
    ran = run("%%flmrun --map x=range(4) --return-exceptions\nx * x")
    assert ran.error is None and ran.value == [0, 1, 4, 9]


def test_a_background_cell_gives_a_handle_whose_result_is_its_value(
    run: Any, shell: Any, fake: FakeFlame
) -> None:
    ran = run("%%flmrun --background job\nmade = 'here'\n41 + 1")
    assert ran.error is None and "running in the background" in ran.stdout
    assert shell.user_ns["job"].result(timeout=60) == 42
    assert shell.user_ns["made"] == "here"


def test_flame_status_lists_the_notebooks_sessions(run: Any, fake: FakeFlame) -> None:
    run("%%flmrun\n1")
    ran = run("%flame status")
    assert "Flame: fake-flame:8080" in ran.stdout and "Path: flame-magic's runner" in ran.stdout
    assert "Session flame-magic-" in ran.stdout and "1 succeeded" in ran.stdout
