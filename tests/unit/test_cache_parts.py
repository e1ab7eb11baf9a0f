"""The parts of large-value transfer that need no server: references, keys, pickles, hashes."""

from __future__ import annotations

import pytest

from flame_magic import codec, digests, transfer
from flame_magic.cache import CacheError, ObjectRef, check_key, flight_location


def test_reference_is_the_bson_document_flame_uses():
    bson = pytest.importorskip("bson", reason="pymongo's bson (installed with flamepy) checks the encoding")
    ref = ObjectRef("grpc://cache:9090", "app/ssn/obj", 3)
    assert bson.decode(ref.encode()) == {"endpoint": "grpc://cache:9090", "key": "app/ssn/obj", "version": 3}
    # flamepy writes small versions as int32, Flame's cache as int64: both read back.
    assert ObjectRef.decode(bson.encode({"endpoint": "e", "key": "a/b/c", "version": 7})) == ObjectRef(
        "e", "a/b/c", 7
    )
    assert ObjectRef.decode(ref.encode()) == ref


def test_a_broken_reference_is_a_clear_error():
    with pytest.raises(CacheError, match="Not an object reference"):
        ObjectRef.decode(b"\x05\x00\x00\x00\x00")
    with pytest.raises(CacheError, match="Not an object reference"):
        ObjectRef.decode(b"garbage")


@pytest.mark.parametrize("key", ["app/ssn", "a/b/c/d", "a//c", "a/../c", "a/b\\x/c", ""])
def test_keys_flame_refuses_are_refused(key):
    with pytest.raises(CacheError, match="Invalid object key"):
        check_key(key)


def test_keys_and_prefixes():
    assert check_key("app/ssn/obj") == ["app", "ssn", "obj"]
    assert check_key("app/ssn", (2, 3)) == ["app", "ssn"]


@pytest.mark.parametrize(
    "endpoint, location",
    [
        ("grpc://cache:9090", "grpc://cache:9090"),
        ("grpcs://cache:9090", "grpc+tls://cache:9090"),
        ("grpc+unix:///tmp/c.sock", "grpc+unix:///tmp/c.sock"),
        ("unix:///tmp/c.sock", "grpc+unix:///tmp/c.sock"),
    ],
)
def test_cache_endpoints_become_flight_locations(endpoint, location):
    assert flight_location(endpoint) == location


def test_an_endpoint_that_is_not_a_cache_is_refused():
    with pytest.raises(CacheError, match="expected grpc://HOST:PORT"):
        flight_location("http://cache:9090")


def test_large_buffers_stay_out_of_band_and_come_back_writable():
    np = pytest.importorskip("numpy")
    array = np.arange(100_000, dtype=np.float64)
    pickled = codec.dumps_oob({"array": array, "small": np.arange(3)}, min_buffer=64 * 1024)
    assert [b.nbytes for b in pickled.buffers] == [array.nbytes]  # the small one stays inside
    assert len(pickled.pickle) < 4096
    assert pickled.buffers[0].obj is not None  # a view of the array's memory, not a copy
    copies = [bytearray(b) for b in pickled.buffers]
    value = codec.loads_oob(pickled.pickle, copies)
    assert (value["array"] == array).all() and value["small"].tolist() == [0, 1, 2]
    value["array"][0] = -1  # writable, as it was in the notebook, and no copy of the buffer
    assert np.frombuffer(copies[0], dtype=np.float64)[0] == -1


def test_values_without_large_buffers_pickle_as_usual():
    pickled = codec.dumps_oob({"a": [1, 2, 3]}, min_buffer=1024)
    assert pickled.buffers == [] and codec.loads(pickled.pickle) == {"a": [1, 2, 3]}


def test_unpicklable_values_raise_the_same_error_out_of_band():
    import threading

    with pytest.raises(codec.UnpicklableError, match="lock"):
        codec.dumps_oob(threading.Lock(), min_buffer=1024)


def test_content_digest_depends_on_every_byte_and_the_size():
    data = bytearray(3 * digests.HASH_CHUNK + 5)  # several chunks, hashed in parallel
    first = digests.digest(memoryview(data))
    assert digests.digest(memoryview(data)) == first
    data[-1] = 1
    assert digests.digest(memoryview(data)) != first
    assert digests.digest(memoryview(b"")) != digests.digest(memoryview(b"\x00"))


def test_without_a_cache_values_are_pickled_into_the_message():
    shipper = transfer.Shipper(None, None)
    assert not shipper.enabled and shipper.access() is None
    big = b"x" * (transfer.INLINE_LIMIT * 2)
    [value] = shipper.ship_all([transfer.Outgoing("big", shipper.pickle(big))], budget=1024)
    assert not value.buffers and not value.HasField("cached_pickle")
    assert shipper.load(value) == big


def test_the_cache_is_configured_as_for_flames_own_tools(tmp_path, monkeypatch):
    from flame_magic.config import resolve_cache

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("FLAME_CACHE_ENDPOINT", "FLAME_CACHE_STORAGE", "FLAME_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_cache() is None  # nothing configured: no cache assumed
    (tmp_path / ".flame").mkdir()
    (tmp_path / ".flame" / "flame.yaml").write_text(
        "current-context: a\n"
        "contexts:\n"
        "  - name: a\n"
        "    cluster: {endpoint: 'http://a:8080'}\n"
        "    cache: {endpoint: 'grpcs://a:9090', tls: {ca_file: /a/ca.pem}, storage: /shared/cache}\n"
        "  - name: b\n"
        "    cluster: {endpoint: 'http://b:8080'}\n"
    )
    current = resolve_cache()
    assert current is not None and (current.endpoint, current.ca_file, current.storage) == (
        "grpcs://a:9090",
        "/a/ca.pem",
        "/shared/cache",
    )
    assert resolve_cache("b") is None
    monkeypatch.setenv("FLAME_CACHE_ENDPOINT", "grpc://override:9090")
    override = resolve_cache("b")
    assert override is not None and override.endpoint == "grpc://override:9090"
    assert override.source == "FLAME_CACHE_ENDPOINT"
