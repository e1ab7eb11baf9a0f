"""The engine's Python API on a real embedded Flame (its object cache, live output, real runners)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flame_magic.config import EMBEDDED
from flame_magic.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.delenv("FLAME_ENDPOINT", raising=False)
        with Engine(EMBEDDED) as opened:
            yield opened


def test_output_streamed_while_the_cell_ran_is_in_the_result(engine: Engine, tmp_path: Path) -> None:
    gate = tmp_path / "go-on"
    # The cell ends only once the first line was streamed through the cache (the runner
    # flushes from a quarter second): the test lets it go on when the line has arrived.
    seen: list[str] = []

    def show(output):  # type: ignore[no-untyped-def]
        seen.append(output.stream.text)
        gate.touch()

    cell = (
        "import os, time\nprint('before', flush=True)\ndeadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n    time.sleep(0.02)\n"
        "print('after')\n'done'"
    )
    result = engine.run(cell, show=show)
    assert result.value == "done" and "before\n" in "".join(seen)
    # Without a show function, what streamed (the runner flushes every quarter second) is kept
    # for the result, in order, with what came with the result.
    streams = engine.run("print('one', flush=True)\nimport time\ntime.sleep(1.5)\nprint('two')")
    assert streams.stdout == "one\ntwo\n"


def test_large_values_travel_both_ways(engine: Engine) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: through the object cache
    result = engine.run("copy = data[::-1]\nlen(copy)", {"data": data})
    assert result.value == len(data) and result.assigned["copy"] == data[::-1]


def test_map_and_submit(engine: Engine) -> None:
    assert list(engine.map("x * x", "x", range(6), instances=2)) == [0, 1, 4, 9, 16, 25]
    assert engine.submit("21 * 2").result(timeout=120).value == 42
