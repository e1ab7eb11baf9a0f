"""An object replaced in Flame's object cache between its upload and its fetch is refused by name.

Flame's object cache has no authentication. Real cells in the real IPython shell, on real
runner processes of the embedded Flame, with its real object cache: the test replaces the
notebook's upload through Flight, as anyone who reaches the cache could, and the runner
loads nothing of it; then the runner's result, and the notebook loads nothing of that.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flame_magic import shm
from flame_magic.cache import CacheClient, ObjectRef, flight_location
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


@pytest.fixture
def attacker(connection: Connection) -> Iterator[CacheClient]:
    """A client of the same cache through Flight only, as one on another machine would be."""
    cache = connection.cache()
    assert cache is not None
    client = CacheClient(cache.endpoint)
    yield client
    client.close()


def keys(cache: CacheClient, prefix: str) -> list[str]:
    import pyarrow.flight as flight

    client = flight.FlightClient(flight_location(cache.endpoint))
    try:
        found = (
            e.ticket.ticket.decode().rsplit(":", 1)[0] for i in client.list_flights() for e in i.endpoints
        )
        return sorted(key for key in found if key.startswith(prefix))
    finally:
        client.close()


def replace_all(attacker: CacheClient, prefix: str) -> list[str]:
    """Overwrite every object under ``prefix`` with a pickle that must never load."""
    import pickle

    replaced = keys(attacker, prefix)
    for key in replaced:
        size = attacker.read_view(ObjectRef(attacker.endpoint, key, 0)).nbytes
        evil = pickle.dumps(SystemExit("a replaced object was unpickled"))
        attacker.put(key, evil.ljust(size, b"\0"))  # the same size: only the digest tells
    return replaced


def test_a_replaced_input_is_refused_by_name_and_the_next_cell_works(run, shell, connection, attacker):
    shell.user_ns["steady"] = np.arange(2 * MB, dtype=np.float64)  # 16 MiB: through the cache
    first = run("%%flmrun\nfloat(steady[-1])")
    assert first.error is None and first.value == 2 * MB - 1
    prefix = f"{connection.shipper().key_prefix}/in-"
    assert replace_all(attacker, prefix)  # the notebook's upload, replaced in the cache

    # The notebook sends `steady` unchanged by reference; the runner fetches the replaced bytes.
    refused = run("%%flmrun\nfloat(steady[-1])")
    assert refused.error is not None
    message = str(refused.error)
    assert "'steady'" in message and "SHA-256 mismatch" in message
    assert "nothing of it was unpickled" in message
    assert "a replaced object was unpickled" not in message + refused.stdout + refused.stderr

    # The kernel and the session survive; the replaced object is gone, so the next cell sends it anew.
    again = run("%%flmrun\nfloat(steady[-1])")
    assert again.error is None and again.value == 2 * MB - 1


def test_a_replaced_result_is_refused_by_name_and_loads_nothing(
    run, shell, connection, attacker, monkeypatch
):
    assert run("%%flmrun\nwarm = 1").error is None
    prefix = f"{connection.shipper().key_prefix}/out-"
    cache = connection.cache()
    assert cache is not None
    original = cache.read

    def read_after_replacing(ref, check=None):  # type: ignore[no-untyped-def]
        # Between the runner's upload and the notebook's fetch: the task has ended, the
        # notebook is about to read what the result references.
        if ref.key.startswith(prefix):
            attacker.put(ref.key, b"\x80\x04K\x00.".ljust(8 * MB, b"\0"))
        return original(ref, check=check)

    monkeypatch.setattr(cache, "read", read_after_replacing)
    ran = run("%%flmrun --no-assign\nimport numpy as np\nnp.ones(MB_)".replace("MB_", str(MB)))
    assert ran.error is not None
    assert "the cell's last value" in str(ran.error) and "SHA-256 mismatch" in str(ran.error)
    monkeypatch.undo()
    assert run("%%flmrun\nint(np.ones(3).sum())").value == 3
