"""Content digests: what names a blob, and what is checked before anything fetched is loaded.

A digest is the SHA-256 over a blob's size and the SHA-256s of its 8 MiB chunks, which hash
in parallel (hashlib releases the GIL on large inputs). Both sides name blobs by it
(:mod:`flame_magic.transfer`) and refuse fetched bytes that hash otherwise
(:class:`~flame_magic.errors.DigestMismatch` names the value).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flame_magic.errors import DigestMismatch
from flame_magic.objects import ObjectRef
from flame_magic.protocol import cell

# Content hashes are computed over chunks of this size, in parallel.
HASH_CHUNK = 8 * 1024 * 1024

_HASH_THREADS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_HASH_THREADS, thread_name_prefix="flame-hash")
        return _pool


def digest(data: memoryview) -> str:
    """A content hash of ``data``: SHA-256 over the size and the SHA-256s of its chunks.

    The chunks hash in parallel: hashlib releases the GIL on large inputs, so several
    cores share the work. 64 hexadecimal digits.
    """
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    return digest_of(data.nbytes, lambda start, end: data[start:end])


def digest_of(size: int, read: Callable[[int, int], Any]) -> str:
    """:func:`digest` of ``size`` bytes that ``read(start, end)`` gives a chunk at a time."""

    def chunk_digest(start: int) -> bytes:
        return hashlib.sha256(read(start, min(size, start + HASH_CHUNK))).digest()

    starts = list(range(0, max(size, 1), HASH_CHUNK))
    chunk_digests = [chunk_digest(0)] if size <= HASH_CHUNK else _shared(chunk_digest, starts)
    top = hashlib.sha256(size.to_bytes(8, "little"))
    for each in chunk_digests:
        top.update(each)
    return top.hexdigest()


def verify(data: memoryview, blob: cell.Blob, what: str) -> None:
    """Refuse fetched bytes whose digest is not the one the message carries.

    Raises
    ------
    DigestMismatch
        Naming ``what`` (the value, the module) and the object.
    """
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    verify_read(data.nbytes, lambda start, end: data[start:end], blob, what)


def verify_read(size: int, read: Callable[[int, int], Any], blob: cell.Blob, what: str) -> None:
    """:func:`verify` of bytes that ``read(start, end)`` gives a chunk at a time."""
    if size != blob.size or digest_of(size, read) != blob.digest:
        if blob.segment:
            raise DigestMismatch(
                f"Not loaded: the shared-memory segment {blob.segment} holds other bytes for {what} "
                "than were sent (SHA-256 mismatch), so nothing of it was unpickled. A process of "
                "your user changed it; run the cell again."
            )
        keys = ", ".join(ObjectRef.decode(ref).key for ref in blob.refs)
        raise DigestMismatch(
            f"Not loaded: Flame's object cache holds other bytes for {what} than were sent "
            f"(SHA-256 mismatch at {keys}), so nothing of it was unpickled. Someone who can reach "
            "the cache may have replaced it (it has no authentication: use it only on a network you "
            "trust); run the cell again."
        )


def _shared(work: Callable[[int], bytes], starts: list[int]) -> list[bytes]:
    """``work(start)`` for each start, on this thread and the pool's, each taking the next free one.

    This thread works too, rather than wait for the pool: on a busy machine a pool thread may
    wait long to be scheduled, and then the others, this one included, take its share.
    """
    digests = [b""] * len(starts)
    order = iter(range(len(starts)))
    lock = threading.Lock()

    def take() -> None:
        while True:
            with lock:
                index = next(order, None)
            if index is None:
                return
            digests[index] = work(starts[index])

    helpers = [_threads().submit(take) for _ in range(min(_HASH_THREADS, len(starts)) - 1)]
    take()
    for helper in helpers:
        helper.result()
    return digests
