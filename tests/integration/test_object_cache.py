"""The embedded Flame's object cache, through Flame's contract: our client, and flamepy's.

Everything talks to a real embedded Flame process over its Unix socket; the storage
shortcut (files in the cache's storage directory) is checked against the Flight path.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flame_magic.cache import CacheClient, CacheError, ObjectNotFound, ObjectRef, flight_location
from flame_magic.embedded import EmbeddedFlame


@pytest.fixture(scope="module")
def flame(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFlame]:
    with EmbeddedFlame.start(working_directory=str(tmp_path_factory.mktemp("work"))) as started:
        yield started


@pytest.fixture
def remote(flame: EmbeddedFlame) -> Iterator[CacheClient]:
    """A client that streams everything through Flight, as one on another machine would."""
    assert flame.cache_endpoint and flame.cache_endpoint.startswith("grpc+unix://")
    client = CacheClient(flame.cache_endpoint)
    yield client
    client.close()


def listed(cache: CacheClient) -> dict[str, int]:
    """Every object the cache lists (Flight's ListFlights), key -> size, as Flame's tools see them."""
    import pyarrow.flight as flight

    client = flight.FlightClient(flight_location(cache.endpoint))
    try:
        return {
            endpoint.ticket.ticket.decode().rsplit(":", 1)[0]: info.total_bytes
            for info in client.list_flights()
            for endpoint in info.endpoints
        }
    finally:
        client.close()


@pytest.fixture
def local(flame: EmbeddedFlame) -> Iterator[CacheClient]:
    """A client sharing the cache's storage directory, as the runners and the notebook do."""
    client = CacheClient(flame.cache_endpoint or "", storage=flame.cache_storage)
    yield client
    client.close()


def test_the_cache_lives_in_the_private_state_directory(flame):
    socket = flame.cache_endpoint.removeprefix("grpc+unix://")  # type: ignore[union-attr]
    assert Path(socket).parent == Path(flame.state_dir)
    assert Path(flame.cache_storage).parent == Path(flame.state_dir)  # type: ignore[arg-type]
    assert (os.stat(flame.state_dir).st_mode & 0o777) == 0o700


def test_put_versions_and_get(remote):
    first = remote.put("app/ssn-put/obj", b"one")
    assert first == ObjectRef(remote.endpoint, "app/ssn-put/obj", 1)
    assert remote.put("app/ssn-put/obj", b"two").version == 2
    fetched = remote.get("app/ssn-put/obj")
    assert fetched is not None and fetched.version == 2 and fetched.base.to_pybytes() == b"two"
    assert fetched.patches == []


def test_put_under_a_prefix_gets_an_id_from_the_cache(remote):
    ref = remote.put("app/ssn-prefix", b"anonymous")
    app, session, object_id = ref.key.split("/")
    assert (app, session, ref.version) == ("app", "ssn-prefix", 1) and len(object_id) == 36
    assert remote.get(ref.key).base.to_pybytes() == b"anonymous"  # type: ignore[union-attr]


def test_patches_and_the_incremental_get(remote):
    key = "app/ssn-patch/log"
    remote.put(key, b"base")
    assert [remote.patch(key, part).version for part in (b"+1", b"+2", b"+3")] == [2, 3, 4]
    full = remote.get(key)
    assert full.version == 4 and full.base.to_pybytes() == b"base"  # type: ignore[union-attr]
    assert [(v, p.to_pybytes()) for v, p in full.patches] == [(2, b"+1"), (3, b"+2"), (4, b"+3")]  # type: ignore[union-attr]
    newer = remote.get(key, have=2)  # a reader that has the base and the first patch
    assert newer.base is None and [(v, p.to_pybytes()) for v, p in newer.patches] == [(3, b"+2"), (4, b"+3")]  # type: ignore[union-attr]
    assert remote.get(key, have=4) is None  # up to date: nothing is sent
    remote.put(key, b"new base")  # a put replaces the base and drops the patches
    again = remote.get(key, have=4)
    assert again.version == 5 and again.base.to_pybytes() == b"new base" and again.patches == []  # type: ignore[union-attr]


def test_patching_what_does_not_exist_is_not_found(remote):
    with pytest.raises(ObjectNotFound, match="app/ssn-none/missing"):
        remote.patch("app/ssn-none/missing", b"x")
    with pytest.raises(ObjectNotFound):
        remote.get("app/ssn-none/missing")


def test_delete_an_object_a_session_and_an_application(remote):
    for key in ("del-app/s1/a", "del-app/s1/b", "del-app/s2/c", "keep-app/s1/d"):
        remote.put(key, key.encode())
    remote.delete("del-app/s1/a")
    assert sorted(k for k in listed(remote) if k.startswith("del-app/")) == ["del-app/s1/b", "del-app/s2/c"]
    remote.delete("del-app/s1")
    assert [k for k in listed(remote) if k.startswith("del-app/")] == ["del-app/s2/c"]
    remote.delete("del-app/*")
    keys = listed(remote)
    assert not [k for k in keys if k.startswith("del-app/")] and keys["keep-app/s1/d"] == len(
        b"keep-app/s1/d"
    )


@pytest.mark.parametrize("key", ["app/../x", "app/./x", "app/*/x", "app/ssn/x/y", "app/ssn/*"])
def test_keys_that_could_leave_the_storage_are_refused(remote, key):
    with pytest.raises(CacheError, match="Invalid object key"):
        remote.put(key, b"x")


@pytest.mark.parametrize("key", ["dot-app/.ssn/.obj", "dot-app/ssn/.obj", ".dot-app/ssn/obj"])
def test_keys_with_a_leading_dot_are_objects_as_on_flame(remote, local, key):
    # Flame refuses only empty parts, '\\' and '..': a leading '.' is an ordinary key, on both paths.
    ref = remote.put(key, b"through Flight")
    assert ref.key == key and bytes(local.read(ref)) == b"through Flight"
    assert key in listed(remote)
    ref = local.put(key, b"through the storage")
    assert ref.version == 2 and bytes(remote.read(ref)) == b"through the storage"
    remote.delete(key.rsplit("/", 1)[0])
    assert key not in listed(remote) and not remote.exists(ref)


def test_storage_and_flight_paths_see_the_same_objects(remote, local, flame):
    numpy = pytest.importorskip("numpy")
    data = numpy.arange(1_000_000, dtype=numpy.float64)
    ref = local.put("app/ssn-files/array", memoryview(data))  # written as a file, then registered
    assert ref.version == 1
    assert (Path(flame.cache_storage) / "app" / "ssn-files" / "array.arrow").is_file()
    streamed = remote.read(ref)
    assert numpy.array_equal(numpy.frombuffer(streamed, dtype=numpy.float64), data)
    mapped = local.read(ref)  # mapped from the file, copy-on-write
    assert not mapped.readonly
    view = numpy.frombuffer(mapped, dtype=numpy.float64)
    view[0] = -1
    assert numpy.frombuffer(local.read(ref), dtype=numpy.float64)[0] == 0  # the object is unchanged
    ref2 = remote.put("app/ssn-files/array", b"replaced through Flight")
    assert ref2.version == 2 and bytes(local.read(ref2)) == b"replaced through Flight"
    assert view[1] == 1  # a reader's mapping of the old version stays valid
    assert local.exists(ref2) and remote.exists(ref2)
    remote.delete("app/ssn-files")
    assert not local.exists(ref2) and not remote.exists(ref2)


def test_a_cache_that_is_down_is_a_clear_error(tmp_path):
    down = CacheClient(f"grpc+unix://{tmp_path}/nobody.sock")
    with pytest.raises(CacheError) as info:
        down.put("app/ssn/x", b"x")
    message = str(info.value)
    assert "unavailable" in message and str(tmp_path) in message and "FLAME_CACHE_ENDPOINT" in message


FLAMEPY = textwrap.dedent(
    """
    import sys
    from flamepy.core import cache

    ref = cache.put_object("flamepy-app/ssn", {"answer": 42})
    print("put", ref.key, ref.version)
    assert cache.get_object(ref) == {"answer": 42}
    ref = cache.patch_object(ref, [1, 2])
    print("patched", ref.version)
    both = cache.get_object(ref, deserializer=lambda base, deltas: (base, deltas))
    assert both == ({"answer": 42}, [[1, 2]])
    cache.delete_objects("flamepy-app/ssn")
    try:
        cache.get_object(cache.ObjectRef(ref.endpoint, ref.key, 0))
    except Exception as exc:
        print("gone", type(exc).__name__)
    """
)


@pytest.mark.parametrize("storage", [False, True], ids=["flight", "storage"])
def test_flamepy_speaks_to_the_embedded_cache(flame, tmp_path, storage):
    if importlib.util.find_spec("flamepy") is None:  # not imported here: its protos clash with ours
        pytest.skip("flamepy (in the test extra) is Flame's own client")
    env = {**os.environ, "HOME": str(tmp_path), "FLAME_CACHE_ENDPOINT": flame.cache_endpoint or ""}
    env.pop("FLAME_CACHE_STORAGE", None)
    if storage:  # flamepy writes the object's file itself, then registers it
        env["FLAME_CACHE_STORAGE"] = flame.cache_storage or ""
    done = subprocess.run(
        [sys.executable, "-c", FLAMEPY], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("put flamepy-app/ssn/") and lines[0].endswith(" 1")
    assert lines[1] == "patched 2"
    assert lines[2].startswith("gone")
