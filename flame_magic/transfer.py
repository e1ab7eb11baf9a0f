"""Values between the notebook and the runner: in the task's message, or through the object cache.

Flame carries a task's input and output in messages of at most 4 MiB. A value whose pickle
and buffers together pass :data:`INLINE_LIMIT` is therefore pickled with protocol 5's
out-of-band buffers (:func:`flame_magic.codec.dumps_oob`) and its buffers, and the pickle
itself when large, are stored in Flame's object cache; the message carries
:class:`~flame_magic.protocol.cell.Blob` s, references to them. Nothing is copied on the
way out but into the cache: a numpy array's memory goes straight to the cache's file or
socket.

On one host (:attr:`Shipper.local`), buffers and large pickles go through shared-memory
segments instead (:mod:`flame_magic.shm`), and the cache is the fallback when those are short.

Each blob is named by a hash of its content, and a :class:`Shipper` (one per session and
side) remembers what it has stored, and what it has received: a value unchanged since it
last travelled is not uploaded again. The notebook names its objects
``<app>/<session>/in-<digest>``, the runner ``.../out-<digest>`` (:func:`flame_magic.wire.value_key`),
so that neither replaces the other's objects; the notebook deletes ``<app>/<session>`` when
it closes the session.

Flame's object cache has no authentication: whoever reaches it can replace an object
between its upload and its fetch. So the message carries each blob's SHA-256 digest, and
the reader loads nothing whose fetched bytes hash otherwise (:class:`DigestMismatch`
names the value). The message itself is the task's input or output, which Flame carries.
A pickle is copied out of the cache before it is checked, so that it cannot change between
the check and the unpickling; out-of-band buffers (an array's memory, never code) are
checked where they are mapped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flame_magic import codec, shm
from flame_magic.digests import digest, verify, verify_read
from flame_magic.errors import CacheError, DigestMismatch
from flame_magic.objects import ObjectRef
from flame_magic.protocol import cell
from flame_magic.wire import INLINE_LIMIT, NOTEBOOK_SIDE, RUNNER_SIDE, value_key

if TYPE_CHECKING:
    from pathlib import Path

    from flame_magic.cache import CacheClient

__all__ = ["INLINE_LIMIT", "NOTEBOOK_SIDE", "RUNNER_SIDE", "DigestMismatch", "Shipper", "digest", "verify"]
# Out-of-band buffers smaller than this stay inside the pickle: one cache object each
# would cost more than the copy.
MIN_BUFFER = 64 * 1024
# One cache object holds at most 2 GiB; larger buffers are split into parts of this size.
PART_BYTES = 1024**3
# Objects a side keeps in the cache for values that may be sent again unchanged, beyond
# those of the last two requests (a larger, older rest is deleted, least recently used first).
KEEP_BYTES = 256 * 1024 * 1024

# What to do about a value too large for a task, with no cache configured.
CACHE_HINT = (
    "configure Flame's object cache so that large values travel through it: set FLAME_CACHE_ENDPOINT="
    "grpc://HOST:9090, or `cache: {endpoint: grpc://HOST:9090}` in the context in ~/.flame/flame.yaml"
)

# Below this, writing a file while hashing saves less than starting the write costs.
STAGE_MIN = 4 * 1024 * 1024

_write_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _writer() -> ThreadPoolExecutor:
    global _write_pool
    with _pool_lock:
        if _write_pool is None:
            _write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flame-write")
        return _write_pool


def _address(data: memoryview) -> int:
    """Where a buffer's memory starts (with its size, a hint that it was shipped before)."""
    import pyarrow as pa

    return int(pa.py_buffer(data).address)


@dataclass
class Outgoing:
    """A value pickled for sending, before it is known whether it travels inline."""

    name: str
    pickled: codec.Pickled


class Shipper:
    """Packs and unpacks values for one session, through the object cache when they are large.

    Parameters
    ----------
    cache
        The object cache, or None: values then always travel inline (and large ones are
        refused by the size check with a note on configuring a cache).
    key_prefix
        ``<app>/<session>``, under which this side stores its objects.
    side
        ``"in"`` for the notebook, ``"out"`` for the runner: part of every key.

    Attributes
    ----------
    uploads : int
        Objects stored so far (a value sent again unchanged stores none).
    uploaded_bytes : int
        Their bytes.
    local : bool
        Whether the other side shares this host (:func:`flame_magic.shm.host_id`): buffers
        then go through shared-memory segments, and the cache only when those are short.
    segments : int
        Segments written so far (their bytes in ``segment_bytes``).
    keep_bytes : int
        See :data:`KEEP_BYTES`.
    """

    def __init__(self, cache: CacheClient | None, key_prefix: str | None, side: str = NOTEBOOK_SIDE) -> None:
        self.cache = cache
        self.key_prefix = key_prefix
        self.side = side
        self.uploads = 0
        self.uploaded_bytes = 0
        self.keep_bytes = KEEP_BYTES
        self.local = False
        self.segments = 0
        self.segment_bytes = 0
        self._segments: dict[str, int] = {}  # segment written -> the request it was for
        self._known: dict[str, cell.Blob] = {}  # digest -> blob stored or received in this session
        self._stored: dict[str, int] = {}  # digest -> request that last used it, for what we stored
        self._places: dict[tuple[int, int], str] = {}  # (address, size) -> digest last shipped from there
        self._request = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether large values go through the cache (a cache, and a session to file them under)."""
        return self.cache is not None and bool(self.key_prefix)

    def access(self) -> cell.CacheAccess | None:
        """What the runner needs to send large results back this way."""
        if self.cache is None or not self.key_prefix:
            return None
        return cell.CacheAccess(
            endpoint=self.cache.endpoint,
            key_prefix=self.key_prefix,
            host=shm.host_id() if shm.enabled() else "",
        )

    # -- sending -------------------------------------------------------------------------

    def new_request(self) -> None:
        """Start a new request: what it stores or loads counts as used by it (see :meth:`evict`).

        Segments written for requests before the last one are removed: their reader has had
        them (the notebook removes its own when the cell ends, see :func:`release`).
        """
        with self._lock:
            self._request += 1
            old = [name for name, used in self._segments.items() if used < self._request - 1]
            for name in old:
                del self._segments[name]
        for name in old:
            shm.remove(name)

    def evict(self) -> None:
        """Delete what this side stored beyond :attr:`keep_bytes`, least recently used first.

        Objects used by the current request or the one before are kept: the other side may
        still be reading them. Call it once a request's values are stored and its inputs
        loaded. Deleting old objects early also lets the cache reuse their memory, which is
        faster than fresh memory.
        """
        with self._lock:
            recent = self._request - 1
            by_age = sorted(self._stored.items(), key=lambda item: item[1], reverse=True)
            kept = 0
            doomed = []
            for content, used in by_age:
                size = self._known[content].size
                if used >= recent:
                    continue
                if kept + size <= self.keep_bytes:
                    kept += size
                    continue
                doomed.append(content)
            blobs = [self._known.pop(content) for content in doomed]
            for content in doomed:
                del self._stored[content]
        if self.cache is None:
            return
        for blob in blobs:
            for ref in blob.refs:
                try:
                    self.cache.delete(ObjectRef.decode(ref).key)
                except CacheError:
                    pass  # gone already, or the cache is down: the session's end deletes it

    def pickle(self, value: Any) -> codec.Pickled:
        """Pickle a value for :meth:`ship`; large buffers stay out of band when a cache exists.

        Raises
        ------
        codec.UnpicklableError
            If it does not pickle.
        """
        if not self.enabled:
            return codec.Pickled(codec.dumps(value))
        pickled = codec.dumps_oob(value, MIN_BUFFER)
        if pickled.buffers and pickled.size <= INLINE_LIMIT:
            # Small after all: one pickle with its buffers inside is cheaper than the cache.
            return codec.Pickled(codec.dumps(value))
        return pickled

    def ship(self, name: str, pickled: codec.Pickled, force: bool = False) -> cell.Value:
        """The message form of a pickled value: inline when small, else by reference.

        Parameters
        ----------
        force
            Go through the cache even when small (to fit many values in one message).
        """
        if not self.enabled or (pickled.size <= INLINE_LIMIT and not force):
            if pickled.buffers:
                raise ValueError(f"{name}: out-of-band buffers need the object cache")
            return cell.Value(name=name, pickle=pickled.pickle)
        value = cell.Value(name=name)
        for buffer in pickled.buffers:
            value.buffers.append(self._store(buffer))
        if len(pickled.pickle) > INLINE_LIMIT or (force and not pickled.buffers):
            value.cached_pickle.CopyFrom(self._store(memoryview(pickled.pickle)))
        else:
            value.pickle = pickled.pickle
        return value

    def ship_all(self, outgoing: Sequence[Outgoing], budget: int) -> list[cell.Value]:
        """Ship several values so that together they take at most ``budget`` bytes inline."""
        values = [self.ship(item.name, item.pickled) for item in outgoing]
        if not self.enabled:
            return values
        sizes = sorted(((v.ByteSize(), i) for i, v in enumerate(values)), reverse=True)
        total = sum(size for size, _ in sizes)
        for size, index in sizes:
            if total <= budget or size < 1024:
                break
            values[index] = self.ship(outgoing[index].name, outgoing[index].pickled, force=True)
            total += values[index].ByteSize() - size
        return values

    def _store(self, data: memoryview) -> cell.Blob:
        """Store bytes in the cache (or find them stored already) and describe them."""
        assert self.cache is not None and self.key_prefix is not None
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        size = data.nbytes
        staging = None
        place = (_address(data), size)
        with self._lock:
            # An input shipped from this memory before is likely unchanged (the same frame
            # sent to cell after cell): hash first, and maybe write nothing. Anything else,
            # and results (mostly new), likely is new: write its file while its hash (its
            # key) is computed, both at memory speed, on different cores.
            likely_unchanged = self.side == NOTEBOOK_SIDE and self._places.get(place) in self._known
        content = None
        if self.local and (self.side == RUNNER_SIDE or shm.enabled()) and shm.room_for(size):
            # Same host: the segment is written while the hash is computed, on another core.
            writing = _writer().submit(shm.write, data)
            try:
                content = digest(data)
            finally:
                segment = writing.result()
            if segment is not None:
                with self._lock:
                    self._segments[segment] = self._request
                    self.segments += 1
                    self.segment_bytes += size
                return cell.Blob(size=size, digest=content, segment=segment)
            # The segment did not fit after all: the cache takes it.
        elif self.cache.storage is not None and STAGE_MIN <= size <= PART_BYTES and not likely_unchanged:
            staging = _writer().submit(self.cache.stage, self.key_prefix, data)
        if content is None:
            try:
                content = digest(data)
            except BaseException:
                self._drop(staging)
                raise
        with self._lock:
            known = self._known.get(content)
            if len(self._places) > 1000:  # a hint, not a record: start over rather than grow
                self._places.clear()
            self._places[place] = content
            if content in self._stored:
                self._stored[content] = self._request
        if known is not None and self._still_there(known):
            self._drop(staging)
            return known
        if staging is not None:
            staged = self.cache.commit(staging.result(), value_key(self.key_prefix, self.side, content))
            blob = cell.Blob(size=size, digest=content, refs=[staged.encode()])
            with self._lock:
                self._known[content] = blob
                self._stored[content] = self._request
                self.uploads += 1
                self.uploaded_bytes += size
            return blob
        parts = [(start, min(size, start + PART_BYTES)) for start in range(0, max(size, 1), PART_BYTES)]
        blob = cell.Blob(size=size, digest=content)
        for index, (start, end) in enumerate(parts):
            key = value_key(self.key_prefix, self.side, content, index if len(parts) > 1 else None)
            ref: ObjectRef = self.cache.put(key, data[start:end])
            blob.refs.append(ref.encode())
        with self._lock:
            self._known[content] = blob
            self._stored[content] = self._request
            self.uploads += len(parts)
            self.uploaded_bytes += size
        return blob

    def _drop(self, staging: Future[Path] | None) -> None:
        """Remove a file written for nothing (the data was stored already)."""
        if staging is None or self.cache is None:
            return
        try:
            self.cache.discard(staging.result())
        except Exception:
            pass  # it failed to write: nothing to remove

    def _still_there(self, blob: cell.Blob) -> bool:
        assert self.cache is not None
        return all(self.cache.exists(ObjectRef.decode(ref)) for ref in blob.refs)

    # -- receiving -----------------------------------------------------------------------

    def load(self, value: cell.Value) -> Any:
        """Rebuild a value from its message form (its header was checked with the message).

        Raises
        ------
        flame_magic.cache.CacheError
            If its data cannot be fetched from the cache.
        DigestMismatch
            If the cache gave other bytes than were sent (nothing is unpickled).
        """
        if not value.buffers and not value.HasField("cached_pickle"):
            return codec.loads(value.pickle)
        what = f"the value {value.name!r}" if value.name else "the cell's last value"
        buffers = [self._fetch(blob, what) for blob in value.buffers]
        data: bytes | memoryview = value.pickle
        if value.HasField("cached_pickle"):
            # A private copy: a file of the cache's storage could change after the check.
            data = bytes(self._fetch(value.cached_pickle, what, check=False))
            self.verify(memoryview(data), value.cached_pickle, what)
        loaded = codec.loads_oob(data, buffers)
        with self._lock:  # what came in need not be stored again to go back out
            for blob in [*value.buffers, *([value.cached_pickle] if value.HasField("cached_pickle") else [])]:
                if blob.segment:
                    continue  # removed when the cell ends: not there to send again
                self._known.setdefault(blob.digest, blob)
                if blob.digest in self._stored:  # ours, sent back: in use again
                    self._stored[blob.digest] = self._request
        return loaded

    def _fetch(self, blob: cell.Blob, what: str, check: bool = True) -> memoryview:
        """A blob's bytes from the cache, checked against its digest unless ``check`` is false.

        An object mapped from the cache's storage is checked through reads of its file, not
        through the map: pages of a value the cell never touches stay unmapped. So is a
        segment; the notebook, a result's only reader, removes it once mapped.
        """
        if blob.segment:

            def read_checked(size: int, read: Callable[[int, int], Any]) -> None:
                verify_read(size, read, blob, what)

            view = shm.open_segment(blob.segment, blob.size, check=read_checked if check else None)
            if self.side == NOTEBOOK_SIDE:
                shm.remove(blob.segment)
            return view
        if self.cache is None:
            raise CacheError(
                "A value came by reference through Flame's object cache, but no cache is configured "
                "here: set FLAME_CACHE_ENDPOINT (or `cache.endpoint` in ~/.flame/flame.yaml)."
            )
        refs = [ObjectRef.decode(ref) for ref in blob.refs]
        if len(refs) == 1:

            def checked(size: int, read: Callable[[int, int], Any]) -> None:
                self._verified(lambda: verify_read(size, read, blob, what), blob)

            return self.cache.read(refs[0], check=checked if check else None)
        whole = self._fetch_parts(blob, refs)
        if check:
            self.verify(whole, blob, what)
        return whole

    def verify(self, data: memoryview, blob: cell.Blob, what: str) -> None:
        """:func:`verify`, and on a mismatch delete the replaced object, so that it is sent anew."""
        self._verified(lambda: verify(data, blob, what), blob)

    def _verified(self, check: Callable[[], None], blob: cell.Blob) -> None:
        try:
            check()
        except DigestMismatch:
            with self._lock:
                self._known.pop(blob.digest, None)
                self._stored.pop(blob.digest, None)
            for ref in blob.refs:
                try:
                    if self.cache is not None:
                        self.cache.delete(ObjectRef.decode(ref).key)
                except CacheError:
                    pass  # the next cell uploads it again anyway: the sender checks that it is there
            raise

    def _fetch_parts(self, blob: cell.Blob, refs: list[ObjectRef]) -> memoryview:
        """A blob too large for one object, its parts joined in fresh memory."""
        from flame_magic.cache import allocate, copy_into  # pyarrow, on first use

        assert self.cache is not None

        whole = allocate(blob.size)
        offset = 0
        for ref in refs:  # parts as the sender cut them: their sizes come from the cache
            part = self.cache.read_view(ref)
            if offset + part.nbytes > blob.size:
                raise CacheError(f"The parts of a {blob.size}-byte value hold more than that ({ref.key}).")
            copy_into(whole[offset : offset + part.nbytes], part)
            offset += part.nbytes
        if offset != blob.size:
            raise CacheError(f"The parts of a {blob.size}-byte value hold {offset} bytes.")
        return whole

    # -- the end of a session ------------------------------------------------------------

    def delete_all(self) -> None:
        """Delete every object of the session (both sides'), and forget them."""
        with self._lock:
            self._known.clear()
            self._stored.clear()
            self._places.clear()
            segments, self._segments = list(self._segments), {}
        for name in segments:
            shm.remove(name)
        if self.cache is not None and self.key_prefix:
            self.cache.delete(self.key_prefix)


def release(values: Iterable[cell.Value]) -> None:
    """Remove the shared-memory segments the values refer to (their cell has ended)."""
    for blob in blobs(values):
        if blob.segment:
            shm.remove(blob.segment)


def blobs(values: Iterable[cell.Value]) -> list[cell.Blob]:
    """Every blob the values refer to."""
    found: list[cell.Blob] = []
    for value in values:
        found.extend(value.buffers)
        if value.HasField("cached_pickle"):
            found.append(value.cached_pickle)
    return found
