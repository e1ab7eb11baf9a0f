"""The embedded Flame's object cache: Flame's cache contract on Arrow Flight, objects in files.

It answers every call of Flame's contract (see :mod:`flame_magic.cache`; keys, references
and object files are :mod:`flame_magic.objects`): put, patch,
incremental get, delete of a key, a session or an application, ``GetFlightInfo`` and
``ListFlights``, with Flame's versions (1 for a new key, one more for each put or patch).
It keeps each object as Flame's disk storage does, an Arrow IPC file
``<storage>/<app>/<session>/<id>.arrow`` whose binary rows hold the data, and patches as
``<id>.deltas/<n>.arrow``; it keeps no data in memory, only versions. Files are written
under a temporary name and renamed, so a reader never sees half an object and a mapping of
a replaced or deleted object stays valid.

It stores flamepy's native Arrow tables too (schema metadata ``flame.cache.format =
arrow-table-v1``, the table's own columns, e.g. a pandas DataFrame): as Flame's cache, it
keeps such a table as it came, in the same kind of file, and answers a get with the table
itself, its schema stamped with the object's version (``flame.cache.version``).

The storage directory is shared with the processes it serves (the runners and the
notebook, same user, same machine): a client may write an object's file itself and tell
the cache with ``GetFlightInfo``, which adopts the file as the next version of the key,
and may map a file instead of streaming it. Large values then move at the speed of a
file write and a page-cache map, not of gRPC.

It listens on a Unix socket in the embedded Flame's private (0700) state directory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc

from flame_magic import objects
from flame_magic.objects import (
    MAX_OBJECT_BYTES,
    CacheError,
    ObjectRef,
    check_key,
    delta_files,
    deltas_dir,
    file_data,
    is_native,
    rows_data,
    stamped,
    uint64s,
    utf8s,
    write_file,
)

log = logging.getLogger(__name__)

CACHE_SOCKET = "cache.sock"
STORAGE_DIR = "cache"

_RESPONSE_SCHEMA = objects.response_schema()


def _with_version(table: pa.Table, version: int) -> pa.Table:
    return table.replace_schema_metadata(stamped(table.schema, version).metadata)


@dataclass
class _Object:
    """What the cache knows of one object besides its files."""

    version: int  # current: the newest of the base and its patches
    base_version: int
    patches: list[int] = field(default_factory=list)  # versions, in order
    identity: tuple[int, int] = (0, 0)  # inode and mtime of the base file we know
    size: int = 0  # bytes of data, base and patches
    native: bool = False  # the base is a native Arrow table, not opaque bytes


class CacheServer(flight.FlightServerBase):  # type: ignore[misc]
    """Flame's object cache over Arrow Flight, serving from ``storage``.

    Parameters
    ----------
    location
        Where to listen: ``grpc+unix:///path`` or ``grpc://HOST:PORT`` (port 0 picks one).
    storage
        The directory for object files; created private (0700).

    Attributes
    ----------
    endpoint : str
        The endpoint its references name (``grpc+unix:///path`` or ``grpc://HOST:PORT``).
    """

    def __init__(self, location: str, storage: Path) -> None:
        super().__init__(location)
        self.storage = storage
        storage.mkdir(mode=0o700, parents=True, exist_ok=True)
        if location.startswith("grpc+unix:"):
            self.endpoint = location
        else:
            host = location.split("://", 1)[1].rsplit(":", 1)[0]
            self.endpoint = f"grpc://{host}:{self.port}"
        self._lock = threading.Lock()  # guards _objects and _key_locks
        self._objects: dict[str, _Object] = {}
        self._key_locks: dict[str, threading.Lock] = {}

    # -- files ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return objects.object_file(self.storage, key)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _lookup(self, key: str) -> _Object | None:
        """The object under ``key``, adopting a file a client wrote into the storage."""
        path = self._path(key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            with self._lock:
                self._objects.pop(key, None)
            return None
        identity = (stat.st_ino, stat.st_mtime_ns)
        with self._lock:
            known = self._objects.get(key)
        if known is not None and known.identity == identity:
            return known
        # A file we did not write (or replaced behind our back): the next version of the key.
        written, size, native = _file_version_and_size(path)
        version = known.version + 1 if known is not None else max(written, 1)
        patches = []
        for delta in delta_files(path):
            patches.append(_file_version_and_size(delta)[0])
        adopted = _Object(
            version=max([version, *patches]), base_version=version, patches=patches, native=native
        )
        adopted.identity = identity
        adopted.size = size
        with self._lock:
            self._objects[key] = adopted
        log.debug("adopted %s (version %d)", key, adopted.version)
        return adopted

    def _reference(self, key: str, version: int) -> bytes:
        return ObjectRef(self.endpoint, key, version).encode()

    # -- put and patch -------------------------------------------------------------------

    def do_put(self, context: Any, descriptor: flight.FlightDescriptor, reader: Any, writer: Any) -> None:
        if descriptor.descriptor_type == flight.DescriptorType.CMD:
            command = descriptor.command.decode("utf-8", "replace")
            if not command.startswith("PATCH:"):
                raise ValueError(f"Unknown put command {command!r}: only PATCH:<key> is supported.")
            key = command[len("PATCH:") :]
            _valid(key, (3,))
            version = self._patch(key, _read_data(reader))
        else:
            if not descriptor.path:
                raise ValueError("key must be provided in descriptor path or command")
            key = descriptor.path[0].decode("utf-8", "replace")
            if len(_valid(key, (2, 3))) == 2:
                key = f"{key}/{uuid.uuid4()}"
            if is_native(reader.schema):
                version = self._put(key, reader.read_all())
            else:
                version = self._put(key, _read_data(reader))
        writer.write(pa.py_buffer(self._reference(key, version)))

    def _put(self, key: str, data: pa.Buffer | pa.Table) -> int:
        """Store ``data`` (opaque bytes, or a native Arrow table) as the next version of ``key``."""
        path = self._path(key)
        native = isinstance(data, pa.Table)
        size = data.nbytes if native else data.size
        with self._key_lock(key):
            known = self._lookup(key)
            version = known.version + 1 if known is not None else 1
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_file(path, data, version)
            shutil.rmtree(deltas_dir(path), ignore_errors=True)  # a put drops patches
            stat = path.stat()
            with self._lock:
                self._objects[key] = _Object(
                    version=version,
                    base_version=version,
                    identity=(stat.st_ino, stat.st_mtime_ns),
                    size=size,
                    native=native,
                )
        log.debug("put %s (version %d, %d bytes%s)", key, version, size, ", Arrow table" if native else "")
        return version

    def _patch(self, key: str, data: pa.Buffer) -> int:
        path = self._path(key)
        with self._key_lock(key):
            known = self._lookup(key)
            if known is None:
                raise KeyError(f"object <{key}> not found, must put first")
            version = known.version + 1
            deltas = deltas_dir(path)
            deltas.mkdir(mode=0o700, exist_ok=True)
            write_file(deltas / f"{len(known.patches)}.arrow", data, version)
            with self._lock:
                known.patches.append(version)
                known.version = version
                known.size += data.size
        log.debug("patch %s (version %d, %d bytes)", key, version, data.size)
        return version

    # -- get -----------------------------------------------------------------------------

    def do_get(self, context: Any, ticket: flight.Ticket) -> flight.RecordBatchStream:
        text = ticket.ticket.decode("utf-8", "replace")
        key, _, have_text = text.partition(":")
        try:
            have = int(have_text) if have_text else 0
        except ValueError:
            raise ValueError(f"Invalid version in ticket {text!r}") from None
        _valid(key, (3,))
        path = self._path(key)
        with self._key_lock(key):  # a consistent snapshot: versions and files together
            known = self._lookup(key)
            if known is None:
                raise KeyError(f"object <{key}> not found")
            rows: list[tuple[int, str, pa.Buffer]] = []
            if have != 0 and have == known.version:
                pass  # not modified: the schema and no rows
            elif known.native:
                # The table itself, as Flame's cache answers (patches of a table are not sent).
                table = _file_table(path)
                return flight.RecordBatchStream(_with_version(table, known.version))
            elif have != 0 and known.base_version <= have < known.version and self._bridges(known, have):
                rows = [
                    (version, "patch", file_data(delta))
                    for version, delta in zip(known.patches, delta_files(path), strict=False)
                    if version > have
                ]
            else:
                rows = [(known.base_version, "base", file_data(path))]
                rows += [
                    (version, "patch", file_data(delta))
                    for version, delta in zip(known.patches, delta_files(path), strict=False)
                ]
        batches = [_response_row(version, kind, data) for version, kind, data in rows]
        return flight.RecordBatchStream(pa.Table.from_batches(batches, schema=_RESPONSE_SCHEMA))

    @staticmethod
    def _bridges(known: _Object, have: int) -> bool:
        newer = [v for v in known.patches if v > have]
        return newer == list(range(have + 1, known.version + 1))

    # -- information, listing, actions ---------------------------------------------------

    def _info(self, key: str, known: _Object) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(key.encode(), [flight.Location(self.endpoint)])
        schema = _RESPONSE_SCHEMA
        if known.native:
            with contextlib.suppress(pa.ArrowException, OSError):
                schema = stamped(_file_table(self._path(key)).schema, known.version)
        return flight.FlightInfo(
            schema,
            flight.FlightDescriptor.for_path(key),
            [endpoint],
            total_records=-1,
            total_bytes=known.size,
            app_metadata=self._reference(key, known.version),
        )

    def get_flight_info(self, context: Any, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        if not descriptor.path:
            raise ValueError("Empty descriptor path")
        key = "/".join(part.decode("utf-8", "replace") for part in descriptor.path)
        _valid(key, (3,))
        with self._key_lock(key):
            known = self._lookup(key)
        if known is None:
            raise KeyError(f"object <{key}> not found")
        return self._info(key, known)

    def list_flights(self, context: Any, criteria: bytes) -> Iterator[flight.FlightInfo]:
        for key in self._keys_in_storage():
            with contextlib.suppress(KeyError, CacheError, OSError, pa.ArrowException):
                known = self._lookup(key)
                if known is not None:
                    yield self._info(key, known)

    def _keys_in_storage(self) -> list[str]:
        return objects.keys_in(self.storage)

    def list_actions(self, context: Any) -> list[tuple[str, str]]:
        return [("DELETE", "Delete objects by key prefix")]

    def do_action(self, context: Any, action: flight.Action) -> Iterator[flight.Result]:
        if action.type != "DELETE":
            raise ValueError(f"Unknown action type: {action.type}. Only DELETE is supported.")
        target = action.body.to_pybytes().decode("utf-8", "replace")
        self._delete(target)
        yield flight.Result(b"OK")

    def _delete(self, target: str) -> None:
        pieces = _valid(target, (2, 3), wildcard=True)
        if len(pieces) == 3:
            path = self._path(target)
            with self._key_lock(target):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                shutil.rmtree(deltas_dir(path), ignore_errors=True)
                with self._lock:
                    self._objects.pop(target, None)
        else:
            app, session = pieces
            directory = self.storage / app if session == "*" else self.storage / app / session
            prefix = f"{app}/" if session == "*" else f"{app}/{session}/"
            shutil.rmtree(directory, ignore_errors=True)
            with self._lock:
                for key in [k for k in self._objects if k.startswith(prefix)]:
                    del self._objects[key]
        log.debug("deleted %s", target)


def _valid(key: str, parts: tuple[int, ...], wildcard: bool = False) -> list[str]:
    """Check a key from a request (it becomes a path: nothing may lead out of the storage)."""
    try:
        return check_key(key, parts, wildcard=wildcard)
    except CacheError as exc:
        raise ValueError(str(exc)) from None


def _read_data(reader: Any) -> pa.Buffer:
    """The object a put sent: the data of every row of every batch, in order."""
    pieces: list[pa.Buffer] = []
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        batch = chunk.data
        if batch is None or batch.num_rows == 0:
            continue
        if batch.num_columns < 2:
            raise ValueError("put rows need two columns: version (uint64) and data (binary)")
        pieces.append(rows_data(batch.column(1)))
    if not pieces:
        raise ValueError("No data received")
    total = sum(p.size for p in pieces)
    if total > MAX_OBJECT_BYTES:
        raise ValueError(f"object of {total} bytes is over the {MAX_OBJECT_BYTES} bytes an object may hold")
    if len(pieces) == 1:
        return pieces[0]
    joined = pa.allocate_buffer(total)
    stream = pa.FixedSizeBufferWriter(joined)
    for piece in pieces:
        stream.write(piece)
    stream.close()
    return joined


def _file_version_and_size(path: Path) -> tuple[int, int, bool]:
    """The version an object file records, its data size, and whether it is a native table."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = ipc.open_file(source)
            if is_native(reader.schema):
                table = reader.read_all()
                written = (reader.schema.metadata or {}).get(objects.VERSION_KEY, b"0")
                return (int(written) if written.isdigit() else 0), table.nbytes, True
            batch = reader.get_batch(0)
            version = int(batch.column(0)[0].as_py() or 0) if batch.num_rows else 0
            size = rows_data(batch.column(batch.num_columns - 1)).size
    except (pa.ArrowException, IndexError, ValueError) as exc:
        raise ValueError(f"{path.name} is not an object file: {exc}") from None
    return version, size, False


def _file_table(path: Path) -> pa.Table:
    """A native table object's file, mapped (no copy)."""
    return ipc.open_file(pa.memory_map(str(path))).read_all()


def _one_row(size: int) -> pa.Buffer:
    """Offsets of a binary column with one row of ``size`` bytes."""
    return pa.py_buffer(struct.pack("<2i", 0, size))


def _response_row(version: int, kind: str, data: pa.Buffer) -> pa.RecordBatch:
    column = pa.Array.from_buffers(pa.binary(), 1, [None, _one_row(data.size), data])
    return pa.RecordBatch.from_arrays([uint64s(version), utf8s(kind), column], schema=_RESPONSE_SCHEMA)


def start(state_dir: Path) -> CacheServer:
    """Start the cache on a Unix socket in ``state_dir``, with its storage beside it."""
    socket_path = state_dir / CACHE_SOCKET
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server = CacheServer(f"grpc+unix://{socket_path}", state_dir / STORAGE_DIR)
    log.info("serving Flame's object cache on %s (storage %s)", server.endpoint, server.storage)
    return server


def stop(server: CacheServer, timeout: float = 2.0) -> None:
    """Stop serving; calls still streaming get ``timeout`` seconds."""
    # shutdown() waits for calls in flight: a thread of its own, so a stuck client cannot
    # hold the embedded Flame's exit.
    stopper = threading.Thread(target=server.shutdown, name="cache-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout)
