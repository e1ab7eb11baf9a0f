"""Large values through shared memory when the runner is on the notebook's host.

Real cells in the real IPython shell, on the embedded Flame's real runner processes (on this
host): their buffers travel as segments in ``/dev/shm``, not through the object cache; the
cache is the fallback when shared memory is refused. Segments found by name are refused
when they are not private or not what was sent.
"""

from __future__ import annotations

import os

import pytest

from flame_magic import codec, shm
from flame_magic.errors import DigestMismatch
from flame_magic.protocol import cell
from flame_magic.remote import Connection
from flame_magic.transfer import NOTEBOOK_SIDE, Shipper, digest

np = pytest.importorskip("numpy", reason="numpy (in the test extra) makes the large arrays")

pytestmark = pytest.mark.skipif(shm.directory() is None, reason="no /dev/shm on this machine")

MB = 1024 * 1024


@pytest.fixture
def connection(shell) -> Connection:  # type: ignore[no-untyped-def]
    return shell.magics_manager.registry["FlameMagics"].connection()


def _of(pids: set[int]) -> list[str]:
    """The segments on this host written by ``pids`` (other users of the machine have their own)."""
    return [name for name in shm.segments() if int(name.split("-")[0]) in pids]


def _cache_objects(connection: Connection) -> list[str]:
    """The keys of the session's values in the embedded Flame's cache storage."""
    cache, prefix = connection.cache(), connection.shipper().key_prefix
    assert cache is not None and cache.storage is not None and prefix
    folder = cache.storage / prefix
    return sorted(p.name for p in folder.glob("*-*.arrow")) if folder.is_dir() else []


@pytest.fixture(params=["", "flmrun"], ids=["flame-magic's runner", "Flame's stock flmrun"])
def runner(request, shell):  # type: ignore[no-untyped-def]
    """Cells on flame-magic's runner (automatic), or on the embedded Flame's stock flmrun."""
    magics = shell.magics_manager.registry["FlameMagics"]
    saved = magics.application
    magics.application = request.param
    yield request.param
    magics.application = saved


def test_a_large_value_goes_both_ways_through_shared_memory(runner, run, shell, connection):
    assert run("%%flmrun --no-assign\nimport numpy as np").error is None  # the runner says its host
    pids = {os.getpid(), run("%%flmrun\nimport os\nos.getpid()").value}
    shipper = connection.shipper()
    assert shipper.local, "the embedded Flame's runner is on this host"
    before = (shipper.segments, shipper.uploads, _cache_objects(connection))
    shell.user_ns["through_shm"] = np.arange(2 * MB, dtype=np.float64)  # 16 MiB
    ran = run(
        "%%flmrun\nassert through_shm.flags.writeable\nthrough_shm[0] = -1\nshm_back = through_shm * 2\n"
        "through_shm.sum()"
    )
    assert ran.error is None, ran.error
    assert ran.value == np.arange(2 * MB, dtype=np.float64)[1:].sum() - 1
    back = shell.user_ns["shm_back"]
    assert back.shape == (2 * MB,) and back[0] == -2 and back[-1] == 2 * (2 * MB - 1)
    assert back.flags.writeable
    assert shipper.segments > before[0], "the input went through a segment"
    assert shipper.uploads == before[1], "nothing was uploaded to the object cache"
    assert _cache_objects(connection) == before[2], "no object of the cache holds either value"
    assert _of(pids) == [], "the cell's segments are gone once it ended"


def test_the_object_cache_when_shared_memory_is_switched_off(run, shell, connection, monkeypatch):
    assert run("%%flmrun --no-assign\nimport numpy as np").error is None
    monkeypatch.setenv(shm.SWITCH, "0")
    shipper = connection.shipper()
    segments, uploads = shipper.segments, shipper.uploads
    shell.user_ns["via_cache"] = np.full(MB, 3.0)
    ran = run("%%flmrun\ncache_back = via_cache + 1\nvia_cache.sum()")
    assert ran.error is None, ran.error
    assert ran.value == 3.0 * MB and shell.user_ns["cache_back"][0] == 4.0
    assert shipper.segments == segments and shipper.uploads > uploads
    assert any(name.startswith("out-") for name in _cache_objects(connection)), "the result came by the cache"


def test_the_object_cache_when_shared_memory_is_short(run, shell, connection, monkeypatch):
    assert run("%%flmrun --no-assign\nimport numpy as np").error is None
    monkeypatch.setattr(shm, "RESERVE", 1 << 62)  # more than any /dev/shm has free
    shipper = connection.shipper()
    segments, uploads = shipper.segments, shipper.uploads
    shell.user_ns["short_of_room"] = np.full(MB, 5.0)
    ran = run("%%flmrun\nshort_of_room.sum()")
    assert ran.error is None, ran.error
    assert ran.value == 5.0 * MB
    assert shipper.segments == segments and shipper.uploads > uploads


def test_a_killed_runners_segment_is_gone_once_the_next_runner_starts(run, shell, tmp_path):
    said = tmp_path / "segment"
    ran = run(
        "%%flmrun --session shm-killed\nimport os, signal, pathlib\nfrom flame_magic import shm\n"
        f"pathlib.Path({str(said)!r}).write_text(shm.write(memoryview(b'x' * 1000)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert ran.error is not None  # the runner died
    left = said.read_text()
    assert left in shm.segments(), "the killed runner left its segment"
    ran = run("%%flmrun --session shm-killed\n1 + 1")
    assert ran.error is None, ran.error
    assert left not in shm.segments()
    run("%flame close shm-killed")


def _value_in_segment(array: np.ndarray) -> tuple[cell.Value, str]:
    """A value as the runner sends it through shared memory: its buffer in a segment."""
    pickled = codec.dumps_oob(array, 1024)
    (buffer,) = pickled.buffers
    data = memoryview(buffer).cast("B")
    name = shm.write(data)
    assert name is not None
    blob = cell.Blob(size=data.nbytes, digest=digest(data), segment=name)
    return cell.Value(name="x", pickle=pickled.pickle, buffers=[blob]), name


def test_a_segment_that_is_not_private_is_refused_by_name():
    value, name = _value_in_segment(np.arange(100_000, dtype=np.float64))
    assert shm.directory() is not None
    os.chmod(shm.directory() / name, 0o644)
    with pytest.raises(shm.SegmentRefused, match=f"segment {name} is not private"):
        Shipper(None, None, NOTEBOOK_SIDE).load(value)
    shm.remove(name)


def test_a_segment_whose_content_was_replaced_is_refused_by_name():
    value, name = _value_in_segment(np.arange(100_000, dtype=np.float64))
    place = shm.directory()
    assert place is not None
    with open(place / name, "r+b") as segment:  # same size, other bytes
        segment.write(b"\x01" * 8)
    with pytest.raises(DigestMismatch, match=f"segment {name} holds other bytes for the value 'x'"):
        Shipper(None, None, NOTEBOOK_SIDE).load(value)
    shm.remove(name)


def test_stale_segments_of_a_process_that_is_gone_are_swept(tmp_path):
    place = shm.directory()
    assert place is not None
    stale = "999999999-" + "0" * 32  # beyond any pid this kernel hands out
    (place / stale).write_bytes(b"old")
    os.chmod(place / stale, 0o600)
    mine = shm.write(memoryview(b"new"))
    assert stale in shm.sweep()
    assert mine in shm.segments() and stale not in shm.segments()
    shm.remove(mine)


@pytest.mark.parametrize("host", ["another-boot:1:2", ""])
def test_a_runner_on_another_host_sends_through_the_cache(host, monkeypatch):
    from flame_magic_runner.values import Traffic

    monkeypatch.delenv("FLAME_CACHE_ENDPOINT", raising=False)
    access = cell.CacheAccess(endpoint="grpc://127.0.0.1:9", key_prefix="app/session", host=host)
    traffic = Traffic()
    assert not traffic.begin(cell.CellRequest(cache=access)).local  # the notebook's host is not this one
    access.host = shm.host_id()
    assert traffic.begin(cell.CellRequest(cache=access)).local
    assert not traffic.begin(cell.CellRequest(cache=access, values_only=True)).local  # a --map's item
