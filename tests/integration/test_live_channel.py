"""The notebook's end of live output on a real object cache (the embedded Flame's, in process)."""

from __future__ import annotations

import threading

import pytest

from flame_magic.cache import CacheClient, ObjectNotFound
from flame_magic.embedded import cache_server
from flame_magic.live import LiveChannel
from flame_magic.protocol import cell
from flame_magic.wire import LIVE_FLUSH

PREFIX = "app/session"


@pytest.fixture
def cache(tmp_path):
    tmp_path.chmod(0o700)
    server = cache_server.start(tmp_path)
    threading.Thread(target=server.serve, daemon=True).start()
    client = CacheClient(server.endpoint, storage=str(server.storage))
    yield client
    client.close()
    cache_server.stop(server)


def streamed(cache: CacheClient, channel: str, text: str) -> None:
    """What the runner's first flush writes to a cell's channel."""
    output = cell.Output(stream=cell.Stream(name="stdout", text=text))
    cache.put(f"{PREFIX}/{channel}-out", cell.CellResult(outputs=[output]).SerializeToString())


def test_a_cell_that_ended_before_the_first_read_still_shows_what_it_streamed(cache):
    shown: list[str] = []
    live = LiveChannel(cache, PREFIX, "c1", lambda output: shown.append(output.stream.text))
    streamed(cache, "c1", "printed before the first read\n")
    live._since -= LIVE_FLUSH  # the cell ran past the runner's first flush
    live.finish()
    assert shown == ["printed before the first read\n"]
    with pytest.raises(ObjectNotFound):
        cache.get(f"{PREFIX}/c1-out")  # the channel's object is removed


def test_a_channel_younger_than_the_first_flush_is_not_read(cache):
    shown: list[str] = []
    live = LiveChannel(cache, PREFIX, "c2", lambda output: shown.append(output.stream.text))
    streamed(cache, "c2", "a runner cannot have written this yet\n")
    live._since += 60  # younger than the runner's first flush, however busy the machine
    live.finish()
    assert shown == []  # a quick cell makes no cache call
