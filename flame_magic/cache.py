"""A client of Flame's object cache (Arrow Flight), exactly as Flame's contract has it.

Objects live under keys ``<app>/<session>/<id>`` and are named by *references*, small BSON
documents ``{endpoint, key, version}`` that travel in task inputs and outputs instead of
the data (both, and the object files, are in :mod:`flame_magic.objects`). The calls:

- put: Flight ``DoPut`` with a one-element PATH descriptor, ``<app>/<session>`` (the cache
  picks the id) or ``<app>/<session>/<id>`` (upsert); rows ``{version: uint64, data:
  binary}``, whose data concatenated in order is the object. The reply's ``app_metadata``
  is the reference. Every put or patch adds one to the object's version.
- patch: the same with a CMD descriptor ``PATCH:<key>``; it appends a delta.
- get: ``DoGet`` with ticket ``<key>:<version the client has>``; rows ``{version, kind,
  data}``: the base, then patches; only the newer patches when the client's base is still
  current (an incremental get); nothing when the client is up to date.
- delete: action ``DELETE`` on a key, ``<app>/<session>`` or ``<app>/*``.

Flame's clients may also be given the cache's *storage* directory (``cache.storage`` in
flame.yaml, ``FLAME_CACHE_STORAGE``), when they share its file system, as the embedded
Flame's runners and notebook do: a put then writes the object's Arrow IPC file
(``<storage>/<app>/<session>/<id>.arrow``) and tells the cache with ``GetFlightInfo``, and
a read maps that file instead of streaming it through gRPC. Files are replaced by rename,
never rewritten in place, so a mapping stays valid after a delete.

pyarrow is imported on first use: a notebook that never moves large data does not pay
for it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame_magic import objects
from flame_magic.errors import CacheError, ObjectNotFound
from flame_magic.objects import KIND_BASE, KIND_PATCH, ObjectRef, check_key

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.flight as flight

__all__ = [
    "CacheClient",
    "CacheError",
    "Fetched",
    "ObjectNotFound",
    "ObjectRef",
    "check_key",
]

# flamepy sends objects as 1 MiB rows; a batch (one gRPC message) holds 16 of them.
ROW_BYTES = 1024 * 1024
BATCH_BYTES = 16 * ROW_BYTES
# Seconds for calls that move no data (delete, GetFlightInfo).
CALL_TIMEOUT = 30.0

#: ``check(size, read)``: sees an object's data (``read(start, end)`` gives bytes of it) before
#: :meth:`CacheClient.read` returns it, and raises to refuse it.
Check = Callable[[int, Callable[[int, int], Any]], None]

_CONFIG_HINT = (
    "Check that Flame's object cache runs and that FLAME_CACHE_ENDPOINT (or `cache.endpoint` of "
    "the current context in ~/.flame/flame.yaml) names it."
)


def _need_pyarrow() -> None:
    """Fail clearly where pyarrow (a dependency of flame-magic) is missing, e.g. on an executor."""
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError as exc:
        raise CacheError(
            f"Flame's object cache needs pyarrow, which cannot be imported here ({exc}): install "
            "pyarrow (flame-magic depends on it) in this environment."
        ) from None


# -- results ---------------------------------------------------------------------------------


@dataclass
class Fetched:
    """What a get returned: the base (absent for an incremental get) and newer patches."""

    version: int
    base: pa.Buffer | None
    patches: list[tuple[int, pa.Buffer]] = field(default_factory=list)


# -- the client ------------------------------------------------------------------------------


def flight_location(endpoint: str) -> str:
    """The Flight location for a cache endpoint (``grpcs://`` is Flight's ``grpc+tls://``)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise CacheError(f"Cannot use cache endpoint {endpoint!r}: expected grpc://HOST:PORT.")
    scheme = scheme.lower()
    if scheme == "grpcs":
        return f"grpc+tls://{rest}"
    if scheme == "unix":
        return f"grpc+unix://{rest}"
    if scheme in ("grpc", "grpc+tcp", "grpc+tls", "grpc+unix"):
        return f"{scheme}://{rest}"
    raise CacheError(
        f"Cannot use cache endpoint {endpoint!r}: expected grpc://HOST:PORT, grpcs://HOST:PORT "
        "or grpc+unix:///PATH."
    )


class CacheClient:
    """Calls to one object cache, with Flight's errors turned into clear messages.

    Parameters
    ----------
    endpoint
        ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` or ``grpc+unix:///PATH``.
    ca_file
        CA certificate for ``grpcs://``.
    storage
        The cache's storage directory, when this process shares its file system.
    """

    def __init__(self, endpoint: str, ca_file: str | None = None, storage: str | None = None) -> None:
        self.endpoint = endpoint
        self.location = flight_location(endpoint)
        self.ca_file = ca_file
        self.storage = Path(storage) if storage else None
        self._client: flight.FlightClient | None = None

    def __repr__(self) -> str:
        return f"<CacheClient {self.endpoint}{' storage=' + str(self.storage) if self.storage else ''}>"

    def _flight(self) -> flight.FlightClient:
        if self._client is None:
            import pyarrow.flight as flight

            kwargs: dict[str, Any] = {}
            if self.ca_file and self.location.startswith("grpc+tls"):
                try:
                    kwargs["tls_root_certs"] = Path(self.ca_file).read_bytes()
                except OSError as exc:
                    raise CacheError(
                        f"Cannot read the CA file {self.ca_file!r} for {self.endpoint}: {exc}"
                    ) from None
            # No size limits: objects travel in messages of up to BATCH_BYTES.
            options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            self._client = flight.FlightClient(self.location, generic_options=options, **kwargs)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import pyarrow as pa
        import pyarrow.flight as flight

        try:
            yield
        except CacheError:
            raise
        except flight.FlightUnavailableError as exc:
            raise CacheError(
                f"Flame's object cache at {self.endpoint} is unavailable while trying to {what}: "
                f"{_short(exc)}. {_CONFIG_HINT}"
            ) from None
        except (pa.ArrowKeyError, KeyError) as exc:
            raise ObjectNotFound(
                f"Flame's object cache at {self.endpoint} has no {what}: {_short(exc)}"
            ) from None
        except (pa.ArrowException, OSError) as exc:
            raise CacheError(
                f"Flame's object cache at {self.endpoint} failed to {what}: {_short(exc)}"
            ) from None

    def _options(self, timeout: float | None = CALL_TIMEOUT) -> flight.FlightCallOptions:
        import pyarrow.flight as flight

        return flight.FlightCallOptions(timeout=timeout)

    # -- put and patch -----------------------------------------------------------------------

    def put(self, key: str, data: Any) -> ObjectRef:
        """Store ``data`` (a contiguous buffer) under a key, or under a new id for a prefix.

        Returns
        -------
        ObjectRef
            The reference the cache gave back (version 1 for a new key).
        """
        _need_pyarrow()
        pieces = check_key(key, (2, 3))
        view = memoryview(data).cast("B")
        _check_size(view.nbytes, key)
        if self.storage is not None:
            if len(pieces) == 2:
                key = f"{key}/{uuid.uuid4()}"
            return self._put_file(key, view)
        import pyarrow.flight as flight

        # One path element: the whole key.
        return self._do_put(flight.FlightDescriptor.for_path(key), view, f"store {key}")

    def patch(self, key: str, data: Any) -> ObjectRef:
        """Append ``data`` as a delta to the object under ``key`` (it must exist)."""
        _need_pyarrow()
        import pyarrow.flight as flight

        check_key(key)
        view = memoryview(data).cast("B")
        _check_size(view.nbytes, key)
        descriptor = flight.FlightDescriptor.for_command(f"PATCH:{key}".encode())
        return self._do_put(descriptor, view, f"patch {key}")

    def _do_put(self, descriptor: flight.FlightDescriptor, view: memoryview, what: str) -> ObjectRef:
        import pyarrow as pa

        buffer = pa.py_buffer(view)
        with self._errors(what):
            writer, reader = self._flight().do_put(descriptor, objects.put_schema(), self._options(None))
            try:
                for start in range(0, max(view.nbytes, 1), BATCH_BYTES):
                    end = min(view.nbytes, start + BATCH_BYTES)
                    writer.write_batch(objects.rows(buffer, start, end, ROW_BYTES))
                writer.done_writing()
                reply = reader.read()
            finally:
                writer.close()
        if reply is None:
            raise CacheError(f"Flame's object cache at {self.endpoint} sent no reference after {what}.")
        return ObjectRef.decode(reply.to_pybytes())

    def _put_file(self, key: str, view: memoryview) -> ObjectRef:
        """Write the object's Arrow IPC file into the shared storage, then tell the cache."""
        return self.commit(self.stage(key.rsplit("/", 1)[0], view), key)

    def stage(self, prefix: str, data: Any) -> Path:
        """Write an object's file into the storage under a temporary name, not yet an object.

        With :meth:`commit` this is :meth:`put` in two steps, so that the key (a content
        hash, say) may be computed while the data is written. Needs a shared storage.

        Returns
        -------
        Path
            The staged file, for :meth:`commit` or :meth:`discard`.
        """
        import pyarrow as pa
        import pyarrow.ipc as ipc

        _need_pyarrow()
        if self.storage is None:
            raise CacheError("Staging an object needs the cache's storage directory (FLAME_CACHE_STORAGE).")
        app, session = check_key(prefix, (2,))
        view = memoryview(data).cast("B")
        _check_size(view.nbytes, prefix)
        directory = self.storage / app / session
        temporary = objects.temporary(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            schema = objects.put_schema()
            with pa.OSFile(str(temporary), "wb") as sink, ipc.new_file(sink, schema) as writer:
                # One row, version 1, the reference's: a cache that reads the file keeps the number.
                one_row = max(view.nbytes, 1)
                writer.write_batch(objects.rows(pa.py_buffer(view), 0, view.nbytes, one_row, version=1))
        except OSError as exc:
            self.discard(temporary)
            raise CacheError(f"Cannot write into the cache's storage {self.storage}: {exc}") from None
        return temporary

    def commit(self, staged: Path, key: str) -> ObjectRef:
        """Make a staged file the object under ``key`` (a put), and tell the cache."""
        import pyarrow.flight as flight

        path = self._file(key)
        if path.parent != staged.parent:
            self.discard(staged)
            raise CacheError(f"{staged} was staged for another session than {key}.")
        try:
            # A replaced object loses its patches, as on a put through Flight.
            _remove_tree(objects.deltas_dir(path))
            os.replace(staged, path)
        except OSError as exc:
            self.discard(staged)
            raise CacheError(f"Cannot write {key} into the cache's storage {self.storage}: {exc}") from None
        with self._errors(f"register {key}"):
            info = self._flight().get_flight_info(flight.FlightDescriptor.for_path(key), self._options())
        # flamepy's convention for an object written into storage; our cache says more.
        metadata = getattr(info, "app_metadata", b"")
        if metadata:
            with contextlib.suppress(CacheError):
                return ObjectRef.decode(bytes(metadata))
        return ObjectRef(self.endpoint, key, 1)

    @staticmethod
    def discard(staged: Path) -> None:
        """Remove a staged file that will not become an object."""
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()

    # -- get ---------------------------------------------------------------------------------

    def get(self, key: str, have: int = 0) -> Fetched | None:
        """Fetch an object, or only what is newer than version ``have`` of it.

        Returns
        -------
        Fetched or None
            None when ``have`` is the current version (nothing changed); otherwise the
            current version with the base (None for an incremental answer) and patches.
        """
        _need_pyarrow()
        import pyarrow.flight as flight

        check_key(key)
        ticket = flight.Ticket(f"{key}:{have}".encode())
        with self._errors(f"object {key}"):
            table = self._flight().do_get(ticket, self._options(None)).read_all()
        if table.num_rows == 0:
            return None
        versions = table.column(0).to_pylist()
        kinds = table.column(1).to_pylist() if table.num_columns >= 3 else [KIND_BASE] * table.num_rows
        data = table.column(table.num_columns - 1)
        base_parts: list[pa.Buffer] = []
        patches: list[tuple[int, pa.Buffer]] = []
        for row, (version, kind) in enumerate(zip(versions, kinds, strict=True)):
            if kind == KIND_BASE:
                if patches:
                    raise CacheError(f"Flame's object cache sent a base row after patches for {key}.")
                base_parts.append(objects.row_buffer(data, row))
            elif kind == KIND_PATCH:
                patches.append((int(version), objects.row_buffer(data, row)))
            else:
                raise CacheError(f"Flame's object cache sent a row of unknown kind {kind!r} for {key}.")
        base = _concat(base_parts) if base_parts else None
        return Fetched(version=max(int(v) for v in versions), base=base, patches=patches)

    def exists(self, ref: ObjectRef) -> bool:
        """Whether the cache still holds the object at the version of ``ref``, without fetching it."""
        if self.storage is not None:
            return self._file(ref.key).is_file()
        try:
            return self.get(ref.key, have=ref.version) is None  # "not modified": nothing is sent
        except ObjectNotFound:
            return False

    def read_view(self, ref: ObjectRef) -> memoryview:
        """An object's data, read-only (mapped from its file, or as Flight received it)."""
        return self._read(ref)

    def read(self, ref: ObjectRef, check: Check | None = None) -> memoryview:
        """An object's data as writable memory (a copy-on-write map of its file, when possible).

        Parameters
        ----------
        check
            Called as ``check(size, read)`` before the data is returned, where ``read(start,
            end)`` gives bytes of it: what it raises is raised, and nothing is returned. A file
            of the storage is read for it through the descriptor that is then mapped, so that
            the check touches no page of the map.
        """
        return self._read(ref, writable=True, check=check)

    def _read(self, ref: ObjectRef, writable: bool = False, check: Check | None = None) -> memoryview:
        _need_pyarrow()
        check_key(ref.key)
        if self.storage is not None:
            view = self._map_file(ref.key, check)
            if view is not None:
                return view
        fetched = self.get(ref.key)
        if fetched is None or fetched.base is None:
            raise CacheError(f"Flame's object cache at {self.endpoint} sent no data for {ref.key}.")
        if fetched.patches:
            raise CacheError(f"Object {ref.key} has patches: it is not a plain value.")
        received = memoryview(fetched.base)
        if check is not None:
            check(received.nbytes, lambda start, end: received[start:end])
        if not writable:
            return received
        # Flight's buffers are read-only; values must be as writable as the sender's.
        copy = allocate(fetched.base.size)
        copy_into(copy, memoryview(fetched.base))
        return copy

    def _file(self, key: str) -> Path:
        assert self.storage is not None
        return objects.object_file(self.storage, key)

    def _map_file(self, key: str, check: Check | None = None) -> memoryview | None:
        """The object's data mapped copy-on-write from its storage file, or None to ask the cache."""
        path = self._file(key)
        if objects.deltas_dir(path).exists():
            return None
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size == 0:
                    return None
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                import pyarrow as pa

                place = objects.data_in(pa.py_buffer(mapped), size)
                if place is None:
                    return None  # not a file we can map (compressed, another layout): stream it instead
                start, length = place
                if check is not None:
                    # The file the map shows (a replacement is another file), read, not mapped.
                    fd = handle.fileno()
                    check(length, lambda begin, end: os.pread(fd, end - begin, start + begin))
        except (FileNotFoundError, ValueError):
            return None
        except OSError as exc:
            raise CacheError(f"Cannot read {path}: {exc}") from None
        return memoryview(mapped)[start : start + length]

    # -- delete ---------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete one object, every object of ``<app>/<session>``, or of ``<app>/*``."""
        _need_pyarrow()
        import pyarrow.flight as flight

        check_key(key, (2, 3), wildcard=True)
        with self._errors(f"delete {key}"):
            results = list(self._flight().do_action(flight.Action("DELETE", key.encode()), self._options()))
        if not results:
            raise CacheError(f"Flame's object cache at {self.endpoint} did not confirm deleting {key}.")


# -- helpers ---------------------------------------------------------------------------------


def _concat(parts: list[pa.Buffer]) -> pa.Buffer:
    if len(parts) == 1:
        return parts[0]
    total = allocate(sum(p.size for p in parts))
    offset = 0
    for part in parts:
        copy_into(total[offset : offset + part.size], memoryview(part))
        offset += part.size
    import pyarrow as pa

    return pa.py_buffer(total)


def allocate(size: int) -> memoryview:
    """Writable memory from Arrow's pool, which reuses freed pages (no fresh page faults)."""
    import pyarrow as pa

    return memoryview(pa.allocate_buffer(size)).cast("B")


def copy_into(destination: memoryview, source: memoryview) -> None:
    """Copy bytes, with several threads when large (one core does not saturate memory)."""
    import pyarrow as pa

    if source.nbytes < 8 * 1024 * 1024:
        destination.cast("B")[:] = source.cast("B")
        return
    writer = pa.FixedSizeBufferWriter(pa.py_buffer(destination))
    writer.set_memcopy_threads(min(4, os.cpu_count() or 1))
    writer.write(pa.py_buffer(source))
    writer.close()


def _check_size(size: int, key: str) -> None:
    if size > objects.MAX_OBJECT_BYTES:
        raise CacheError(
            f"Cannot store {size} bytes under {key}: Flame's object cache holds at most "
            f"{objects.MAX_OBJECT_BYTES} bytes per object; split the data into several objects."
        )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _short(exc: BaseException) -> str:
    """Flight's message without the server's traceback and gRPC's debug context."""
    text = str(exc)
    for marker in (". Detail: Python exception", ". gRPC client debug context", ". Client context"):
        text = text.split(marker, 1)[0]
    return text.strip().strip("'") or type(exc).__name__
