"""The connection's sessions on a fake Flame (see ``fake_flame``): reuse, replacement, closing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_flame import FakeFlame

from flame_magic.config import Target
from flame_magic.protocol import types
from flame_magic.remote import Connection
from flame_magic.sessions import DEFAULT, SessionKey

TARGET = Target(endpoint="http://fake-flame:8080", ca_file=None, source="a fake Flame")


@pytest.fixture
def flame(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeFlame]:
    monkeypatch.delenv("FLAME_CACHE_ENDPOINT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    fake = FakeFlame(hold=True)
    yield fake
    fake.close()


@pytest.fixture
def notes() -> list[str]:
    return []


@pytest.fixture
def connection(flame: FakeFlame, notes: list[str]) -> Iterator[Connection]:
    opened = Connection(TARGET, "", 1.0, flame)  # type: ignore[arg-type]
    opened.notify = notes.append
    yield opened
    flame.release_all()
    opened.shutdown()


def test_the_automatic_application_is_flame_magics_runner(connection: Connection) -> None:
    assert connection.application == "flame-magic"


def test_a_key_gets_one_session_reused_until_it_is_closed(connection: Connection, flame: FakeFlame) -> None:
    first = connection.session()
    assert connection.session(DEFAULT) == first
    named = SessionKey(name="train", instances=2, warm=2)
    other = connection.session(named)
    assert other != first and connection.session(named) == other
    assert connection.named("train") == named and connection.named("other") is None
    assert connection.labels[other] == "named 'train', up to 2 instances"
    assert flame.sessions[other].spec.max_instances == 2
    assert connection.close_session(first)
    assert connection.session() not in (first, other)


def test_a_session_given_up_is_replaced_and_the_next_cell_is_told_once(
    connection: Connection, notes: list[str]
) -> None:
    first = connection.session()
    connection.give_up(first, "Flame: Connection refused (os error 111)")
    second = connection.session()
    assert second != first
    assert len(notes) == 1 and "died" in notes[0] and second in notes[0]
    assert connection.session() == second and len(notes) == 1


def test_close_all_keeps_a_session_where_a_task_runs(connection: Connection, flame: FakeFlame) -> None:
    idle = connection.session()
    busy = connection.session(SessionKey(name="busy"))
    flame.create_task(busy, b"")  # held: it runs until released
    outcome = connection.close_all()
    assert outcome.closed == [idle] and list(outcome.refused) == [busy]
    assert "running tasks" in outcome.refused[busy]
    assert connection.session(SessionKey(name="busy")) == busy  # still in use
    assert flame.sessions[idle].status.state == types.Closed


def test_describe_says_how_to_close_each_session(connection: Connection) -> None:
    default = connection.session()
    named = connection.session(SessionKey(name="gpu"))
    assert connection.describe(default) == f"the default session {default} (`%flame close`)"
    assert connection.describe(named) == f"session 'gpu' {named} (`%flame close gpu`)"
    assert connection.describe("not-ours") is None


def test_an_application_switch_opens_new_sessions(connection: Connection) -> None:
    first = connection.session()
    connection.use_application("flame-magic")
    assert connection.session() != first
