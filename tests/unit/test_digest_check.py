"""Nothing fetched from the object cache is loaded unless its SHA-256 digest is the one sent."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from flame_magic import codec, transfer
from flame_magic.errors import ObjectNotFound
from flame_magic.objects import ObjectRef
from flame_magic.protocol import cell


class MemoryCache:
    """Stands for Flame's object cache (a CacheClient) in memory: put, read, exists, delete.

    ``replace`` overwrites an object as anyone who reaches a real cache could.
    """

    endpoint = "grpc://memory:9090"
    storage = None

    def __init__(self) -> None:
        self.objects: dict[str, tuple[int, bytes]] = {}

    def put(self, key: str, data: object) -> ObjectRef:
        version = self.objects.get(key, (0, b""))[0] + 1
        self.objects[key] = (version, bytes(memoryview(data).cast("B")))  # type: ignore[arg-type]
        return ObjectRef(self.endpoint, key, version)

    def replace(self, key: str, data: bytes) -> None:
        self.put(key, data)

    def read(self, ref: ObjectRef, check: Any = None) -> memoryview:
        if ref.key not in self.objects:
            raise ObjectNotFound(ref.key)
        data = memoryview(bytearray(self.objects[ref.key][1]))
        if check is not None:  # as CacheClient.read: the check sees the data before it is returned
            check(data.nbytes, lambda start, end: data[start:end])
        return data

    read_view = read

    def exists(self, ref: ObjectRef) -> bool:
        return ref.key in self.objects

    def delete(self, key: str) -> None:
        for name in [k for k in self.objects if k == key or k.startswith(key + "/")]:
            del self.objects[name]


def test_the_digest_is_a_sha256_of_every_byte_and_the_size():
    data = memoryview(b"x" * 100)
    expected = hashlib.sha256(len(data).to_bytes(8, "little") + hashlib.sha256(data).digest()).hexdigest()
    assert transfer.digest(data) == expected and len(expected) == 64
    assert transfer.digest(memoryview(b"x" * 99 + b"y")) != expected


@pytest.mark.parametrize("field", ["cached_pickle", "buffers"])
def test_a_replaced_object_is_refused_by_name_and_nothing_is_unpickled(field):
    np = pytest.importorskip("numpy")
    cache = MemoryCache()
    notebook = transfer.Shipper(cache, "app/ssn", transfer.NOTEBOOK_SIDE)  # type: ignore[arg-type]
    runner = transfer.Shipper(cache, "app/ssn", transfer.RUNNER_SIDE)  # type: ignore[arg-type]
    big = list(range(100_000)) if field == "cached_pickle" else np.arange(200_000, dtype=np.float64)
    value = notebook.ship("big", notebook.pickle(big))
    blob = value.cached_pickle if field == "cached_pickle" else value.buffers[0]
    key = ObjectRef.decode(blob.refs[0]).key
    evil = codec.dumps(RuntimeError("this pickle must never load"))
    cache.replace(key, evil.ljust(blob.size, b"\0"))

    with pytest.raises(transfer.DigestMismatch, match=r"'big'.*SHA-256 mismatch at app/ssn/in-"):
        runner.load(value)
    assert key not in cache.objects  # the replaced object is gone: the next cell sends it anew

    again = notebook.ship("big", notebook.pickle(big))
    assert again == value and key in cache.objects
    loaded = runner.load(again)
    assert (loaded == big) if field == "cached_pickle" else np.array_equal(loaded, big)


def test_the_last_value_is_named_as_such():
    cache = MemoryCache()
    runner = transfer.Shipper(cache, "app/ssn", transfer.RUNNER_SIDE)  # type: ignore[arg-type]
    value = runner.ship("", runner.pickle(b"v" * (2 * transfer.INLINE_LIMIT)))
    cache.replace(ObjectRef.decode(value.cached_pickle.refs[0]).key, b"w" * value.cached_pickle.size)
    notebook = transfer.Shipper(cache, "app/ssn", transfer.NOTEBOOK_SIDE)  # type: ignore[arg-type]
    with pytest.raises(transfer.DigestMismatch, match="the cell's last value"):
        notebook.load(cell.Value(cached_pickle=value.cached_pickle))
