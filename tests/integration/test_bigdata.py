"""Values over Flame's 4 MiB limit, both ways, through the embedded Flame's object cache.

Real cells in the real IPython shell, on real runner processes: the values travel by
reference through the cache the embedded Flame serves.
"""

from __future__ import annotations

import pytest

from flame_magic import shm
from flame_magic.cache import CacheClient, flight_location
from flame_magic.errors import CellFailed
from flame_magic.remote import Connection

np = pytest.importorskip("numpy", reason="numpy (in the test extra) makes the large arrays")

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _through_the_cache(monkeypatch):  # type: ignore[no-untyped-def]
    """These tests are of the object cache: shared memory (tests/integration/test_shared_memory.py) off."""
    monkeypatch.setenv(shm.SWITCH, "0")


@pytest.fixture
def connection(shell) -> Connection:  # type: ignore[no-untyped-def]
    return shell.magics_manager.registry["FlameMagics"].connection()


def _listed(cache: CacheClient, prefix: str) -> list[str]:
    """The keys under ``prefix`` that the cache lists (Flight's ListFlights), as Flame's tools see them."""
    import pyarrow.flight as flight

    client = flight.FlightClient(flight_location(cache.endpoint))
    try:
        keys = (
            e.ticket.ticket.decode().rsplit(":", 1)[0] for i in client.list_flights() for e in i.endpoints
        )
        return [key for key in keys if key.startswith(prefix)]
    finally:
        client.close()


def session_keys(connection: Connection) -> list[str]:
    prefix = connection.shipper().key_prefix
    cache = connection.cache()
    assert cache is not None and prefix
    return _listed(cache, f"{prefix}/")


def test_an_array_over_the_limit_goes_in_and_comes_back(run, shell, connection):
    shell.user_ns["array_in"] = np.arange(2 * MB, dtype=np.float64)  # 16 MiB
    ran = run(
        "%%flmrun\nassert array_in.flags.writeable\n"
        "array_in[0] = -1\narray_out = array_in * 2\narray_in.sum()"
    )
    assert ran.error is None, ran.error
    assert ran.value == np.arange(2 * MB, dtype=np.float64)[1:].sum() - 1
    out = shell.user_ns["array_out"]
    assert out.dtype == np.float64 and out.shape == (2 * MB,) and out[0] == -2 and out[-1] == 2 * (2 * MB - 1)
    assert out.flags.writeable
    assert shell.user_ns["array_in"][0] == 0  # the runner changed its copy only
    assert ran.stderr == ""  # nothing was left on the runner


def test_a_large_result_is_the_cells_value(run, shell):
    shell.user_ns.pop("made_there", None)
    assert (
        run("%%flmrun --no-assign\nimport numpy as np\nmade_there = np.ones((1024, 1024, 3))").error is None
    )
    ran = run("%%flmrun\nmade_there")
    assert ran.error is None, ran.error
    assert (
        isinstance(ran.value, np.ndarray) and ran.value.shape == (1024, 1024, 3) and ran.value.sum() == 3 * MB
    )


def test_a_dataframe_round_trip(run, shell):
    pd = pytest.importorskip("pandas", reason="pandas (in the test extra) makes the DataFrame")
    rows = 300_000
    frame = pd.DataFrame(
        {
            "x": np.arange(rows, dtype=np.int64),
            "y": np.linspace(0, 1, rows),
            "name": [f"row-{i}" for i in range(rows)],
            "when": pd.date_range("2024-01-01", periods=rows, freq="s"),
        }
    )
    shell.user_ns["frame"] = frame
    ran = run("%%flmrun\nframe2 = frame.assign(z=frame.x * 2)\nlen(frame2)")
    assert ran.error is None, ran.error
    assert ran.value == rows
    back = shell.user_ns["frame2"]
    pd.testing.assert_frame_equal(back.drop(columns="z"), frame)
    assert (back.z == frame.x * 2).all()


def test_nested_structures_and_large_plain_pickles(run, shell):
    shell.user_ns["nested"] = {
        "arrays": [np.full(MB, i, dtype=np.int32) for i in range(3)],  # 4 MiB each
        "blob": b"\x01" * (5 * MB),  # bytes pickle in band: a large pickle, by reference
        "numbers": list(range(500_000)),  # no buffers at all: a large pickle too
        "small": {"k": (1, 2.5, "three")},
    }
    ran = run(
        "%%flmrun\n"
        "checks = [int(a[0]) for a in nested['arrays']], len(nested['blob']), sum(nested['numbers'])\n"
        "nested = dict(nested, arrays=nested['arrays'] + [nested['arrays'][0] + 10])\n"
        "checks"
    )
    assert ran.error is None, ran.error
    assert ran.value == ([0, 1, 2], 5 * MB, sum(range(500_000)))
    back = shell.user_ns["nested"]
    assert [int(a[0]) for a in back["arrays"]] == [0, 1, 2, 10]
    assert back["small"] == {"k": (1, 2.5, "three")} and back["blob"] == b"\x01" * (5 * MB)


def test_the_same_value_is_not_uploaded_twice(run, shell, connection):
    shell.user_ns["steady"] = np.random.default_rng(0).random(MB)  # 8 MiB
    assert run("%%flmrun\nfloat(steady.sum())").error is None
    shipper = connection.shipper()
    uploads = shipper.uploads
    again = run("%%flmrun\nfloat(steady.sum())")
    assert again.error is None and shipper.uploads == uploads  # the second run uploads nothing
    shell.user_ns["steady"][0] = 5  # changed: uploaded again
    assert run("%%flmrun\nfloat(steady.sum())").error is None
    assert shipper.uploads == uploads + 1
    # A value that came back from the runner goes back without an upload either.
    assert run("%%flmrun\nfrom_runner = steady + 1").error is None
    uploads = shipper.uploads
    ran = run("%%flmrun\nfloat(from_runner[0])")
    assert ran.error is None and ran.value == 6.0 and shipper.uploads == uploads


def test_the_sessions_objects_are_deleted_when_it_closes(run, shell, connection):
    shell.user_ns["to_delete"] = np.ones(MB)
    assert run("%%flmrun\nfrom_runner_too = to_delete * 3").error is None
    keys = session_keys(connection)
    assert any("/in-" in k for k in keys) and any("/out-" in k for k in keys)
    prefix = connection.shipper().key_prefix
    closed = run("%flame close")
    assert closed.error is None
    cache = connection.cache()
    assert cache is not None
    assert not _listed(cache, f"{prefix}/")
    ran = run("%%flmrun\nfloat(to_delete.sum())")  # a new session: uploaded again, and it works
    assert ran.error is None and ran.value == MB


def test_through_flight_without_the_shared_storage(run, shell, monkeypatch, connection):
    # As a notebook on another machine: everything streams through the cache's socket.
    cache = connection.cache()
    assert cache is not None
    streaming = CacheClient(cache.endpoint)
    monkeypatch.setattr(Connection, "cache", lambda self: streaming)
    monkeypatch.setattr(connection, "_shippers", {})
    shell.user_ns["streamed"] = np.arange(MB, dtype=np.float64)
    ran = run("%%flmrun\nstreamed_back = streamed[::-1].copy()\nstreamed_back.flags.writeable")
    assert ran.error is None and ran.value is True
    assert shell.user_ns["streamed_back"][0] == MB - 1 and shell.user_ns["streamed_back"].flags.writeable


def test_a_cache_that_is_down_is_a_clear_error(run, shell, monkeypatch, tmp_path, connection):
    down = CacheClient(f"grpc+unix://{tmp_path}/down.sock")
    monkeypatch.setattr(Connection, "cache", lambda self: down)
    monkeypatch.setattr(connection, "_shippers", {})
    shell.user_ns["unsendable"] = np.ones(MB)
    ran = run("%%flmrun\nunsendable.sum()")
    assert isinstance(ran.error, CellFailed)
    message = str(ran.error)
    assert "object cache" in message and "unavailable" in message and "FLAME_CACHE_ENDPOINT" in message


def test_without_a_cache_a_large_result_stays_on_the_runner_with_advice(run, shell, monkeypatch, connection):
    monkeypatch.setattr(Connection, "cache", lambda self: None)
    monkeypatch.setattr(connection, "_shippers", {})
    shell.user_ns.pop("kept_there", None)
    ran = run("%%flmrun\nkept_there = b'x' * (5 * 1024 * 1024)\nsize = len(kept_there)")
    assert ran.error is None and shell.user_ns["size"] == 5 * MB and "kept_there" not in shell.user_ns
    assert "`kept_there` stays on the runner" in ran.stderr and "FLAME_CACHE_ENDPOINT" in ran.stderr


def test_runners_are_told_where_the_cache_is(run, connection):
    ran = run("%%flmrun\nimport os\nos.environ['FLAME_CACHE_ENDPOINT'], os.environ['FLAME_CACHE_STORAGE']")
    cache = connection.cache()
    assert cache is not None and ran.value == (cache.endpoint, str(cache.storage))


def test_a_value_cut_into_several_objects(run, shell, monkeypatch, connection):
    # Objects hold at most 2 GiB: larger buffers go as parts (here small ones, to be quick).
    from flame_magic import transfer

    monkeypatch.setattr(transfer, "PART_BYTES", 3 * MB + 5)
    shell.user_ns["in_parts"] = np.arange(2 * MB, dtype=np.float64)  # 16 MiB: 6 parts
    uploads = connection.shipper().uploads
    ran = run("%%flmrun\nfloat(in_parts[-1]), in_parts.flags.writeable")
    assert ran.error is None, ran.error
    assert ran.value == (2 * MB - 1, True) and connection.shipper().uploads == uploads + 6
