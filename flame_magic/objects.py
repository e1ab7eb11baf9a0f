"""Flame's object-cache contract, written once: keys, references and the object files.

Both ends of the cache use it: the client (:mod:`flame_magic.cache`) and the embedded
Flame's cache (:mod:`flame_magic.embedded.cache_server`).

Keys
    ``<app>/<session>/<id>`` (a put or delete may name ``<app>/<session>``, a delete
    ``<app>/*``). As Flame's ``ObjectKey`` has it, each part is non-empty and holds no
    ``\\`` and no ``..``; ``*`` stands only for every session of an application. A part may
    start with ``.`` (Flame accepts it). The one rule stricter than Flame's: a part may not
    be ``.`` alone, which a storage directory would read as its parent (deleting
    ``<app>/.`` would delete the whole application's objects).
References
    A BSON document ``{endpoint: string, key: string, version: int64}``.
Object files
    A cache with storage keeps an object as ``<storage>/<app>/<session>/<id>.arrow``, an
    Arrow IPC file of rows ``{version: uint64, data: binary}`` whose data concatenated is
    the object, and each patch as ``<id>.deltas/<n>.arrow`` (n from 0, in order). flamepy's
    native Arrow tables keep their own columns, marked in the schema's metadata
    (:data:`FORMAT_KEY` = :data:`ARROW_TABLE_FORMAT`, the version in :data:`VERSION_KEY`).
    Files are written under a temporary name that ends in ``.tmp`` (never ``.arrow``, so
    never an object) and renamed: a reader never sees half an object, and a mapping of a
    replaced or deleted object stays valid.
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame_magic.errors import CacheError

if TYPE_CHECKING:
    import pyarrow as pa

# The cache keeps an object's data in one binary row (32-bit offsets).
MAX_OBJECT_BYTES = 2**31 - 1

KIND_BASE = "base"
KIND_PATCH = "patch"

# flamepy's schema metadata for an object that is a native Arrow table.
FORMAT_KEY = b"flame.cache.format"
VERSION_KEY = b"flame.cache.version"
ARROW_TABLE_FORMAT = b"arrow-table-v1"

WILDCARD_SESSION = "*"
OBJECT_SUFFIX = ".arrow"
DELTAS_SUFFIX = ".deltas"


# -- keys ------------------------------------------------------------------------------------


def check_key(key: str, parts: tuple[int, ...] = (3,), wildcard: bool = False) -> list[str]:
    """Split an object key or prefix, refusing what Flame refuses (see the module's docstring).

    Parameters
    ----------
    key
        ``<app>/<session>/<id>`` (or ``<app>/<session>`` when 2 is in ``parts``).
    parts
        The numbers of ``/``-separated parts accepted.
    wildcard
        Accept ``<app>/*`` (every session: a delete).
    """
    pieces = key.split("/")
    if len(pieces) not in parts:
        shapes = " or ".join("/".join(["<app>", "<session>", "<id>"][:n]) for n in parts)
        raise CacheError(f"Invalid object key {key!r}: expected {shapes}.")
    for piece in pieces:
        if not piece or "\\" in piece or ".." in piece or piece == ".":
            raise CacheError(
                f"Invalid object key {key!r}: parts must be non-empty, without '\\' or '..', and not '.'."
            )
    stars = [i for i, piece in enumerate(pieces) if piece == WILDCARD_SESSION]
    if stars and not (wildcard and len(pieces) == 2 and stars == [1]):
        raise CacheError(f"Invalid object key {key!r}: '*' only stands for every session, as <app>/*.")
    return pieces


# -- references ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectRef:
    """A reference to a cached object, as Flame passes them around (a BSON document)."""

    endpoint: str
    key: str
    version: int

    def encode(self) -> bytes:
        """The BSON document ``{endpoint, key, version}`` (version as int64, as Flame writes it)."""
        body = (
            _bson_string("endpoint", self.endpoint)
            + _bson_string("key", self.key)
            + b"\x12version\x00"
            + struct.pack("<q", self.version)
        )
        return struct.pack("<i", len(body) + 5) + body + b"\x00"

    @classmethod
    def decode(cls, data: bytes) -> ObjectRef:
        """Read a reference from BSON (as Flame's cache and flamepy write it)."""
        try:
            fields = _bson_decode(bytes(data))
            endpoint, key, version = fields["endpoint"], fields["key"], fields["version"]
        except (KeyError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise CacheError(f"Not an object reference (BSON {{endpoint, key, version}}): {exc}") from None
        if not isinstance(endpoint, str) or not isinstance(key, str) or not isinstance(version, int):
            raise CacheError(f"Not an object reference: {fields!r}")
        return cls(endpoint, key, version)


def _bson_string(name: str, value: str) -> bytes:
    data = value.encode("utf-8")
    return b"\x02" + name.encode("utf-8") + b"\x00" + struct.pack("<i", len(data) + 1) + data + b"\x00"


def _bson_decode(data: bytes) -> dict[str, Any]:
    """Decode a flat BSON document of strings and numbers (all an object reference holds)."""
    (length,) = struct.unpack_from("<i", data, 0)
    if length != len(data) or data[-1:] != b"\x00":
        raise ValueError("bad document length")
    fields: dict[str, Any] = {}
    pos = 4
    while pos < length - 1:
        kind = data[pos]
        end = data.index(b"\x00", pos + 1)
        name = data[pos + 1 : end].decode("utf-8")
        pos = end + 1
        if kind == 0x02:  # string
            (size,) = struct.unpack_from("<i", data, pos)
            fields[name] = data[pos + 4 : pos + 3 + size].decode("utf-8")
            pos += 4 + size
        elif kind == 0x10:  # int32
            (fields[name],) = struct.unpack_from("<i", data, pos)
            pos += 4
        elif kind in (0x12, 0x11):  # int64, timestamp
            (fields[name],) = struct.unpack_from("<q" if kind == 0x12 else "<Q", data, pos)
            pos += 8
        elif kind == 0x01:  # double
            (value,) = struct.unpack_from("<d", data, pos)
            fields[name] = int(value) if value.is_integer() else value
            pos += 8
        else:
            raise ValueError(f"unexpected BSON element type {kind:#x} for {name!r}")
    return fields


# -- schemas ---------------------------------------------------------------------------------


def put_schema() -> pa.Schema:
    """The rows of a put, and of an object file: ``{version: uint64, data: binary}``."""
    import pyarrow as pa

    return pa.schema([("version", pa.uint64()), ("data", pa.binary())])


def response_schema() -> pa.Schema:
    """The rows of a get: ``{version: uint64, kind: utf8 ("base" | "patch"), data: binary}``."""
    import pyarrow as pa

    return pa.schema([("version", pa.uint64()), ("kind", pa.utf8()), ("data", pa.binary())])


def is_native(schema: pa.Schema) -> bool:
    """Whether ``schema`` is that of a native Arrow table object (not version/data rows)."""
    return (schema.metadata or {}).get(FORMAT_KEY) == ARROW_TABLE_FORMAT


def stamped(schema: pa.Schema, version: int) -> pa.Schema:
    """A native table's schema with the object's version in its metadata."""
    return schema.with_metadata({**(schema.metadata or {}), VERSION_KEY: str(version).encode()})


# -- object files ----------------------------------------------------------------------------


def object_file(storage: Path, key: str) -> Path:
    """Where a cache with storage keeps the object under ``key``."""
    app, session, object_id = check_key(key)
    return storage / app / session / f"{object_id}{OBJECT_SUFFIX}"


def deltas_dir(path: Path) -> Path:
    """The directory of an object file's patches."""
    return path.with_suffix(DELTAS_SUFFIX)


def delta_files(path: Path) -> list[Path]:
    """An object file's patches, in order."""
    deltas = deltas_dir(path)
    if not deltas.is_dir():
        return []
    files = [p for p in deltas.glob(f"*{OBJECT_SUFFIX}") if p.stem.isdigit()]
    return sorted(files, key=lambda p: int(p.stem))


def keys_in(storage: Path) -> list[str]:
    """The keys of the objects a storage directory holds."""
    return [
        f"{path.parent.parent.name}/{path.parent.name}/{path.stem}"
        for path in sorted(storage.glob(f"*/*/*{OBJECT_SUFFIX}"))
        if path.is_file()
    ]


def temporary(directory: Path) -> Path:
    """A fresh name in ``directory`` for a file being written (never an object's name)."""
    return directory / f".{uuid.uuid4().hex}.tmp"


def rows(buffer: pa.Buffer, start: int, end: int, row_bytes: int, version: int = 0) -> pa.RecordBatch:
    """Rows of ``buffer[start:end]``, ``row_bytes`` each at most, without copying the data.

    A put's rows carry version 0 (the cache numbers versions); a file's, the version it is.
    """
    import pyarrow as pa

    size = end - start
    bounds = list(range(0, size, max(row_bytes, 1))) + [size]
    if size == 0:
        bounds = [0, 0]
    count = len(bounds) - 1
    offsets = pa.py_buffer(struct.pack(f"<{count + 1}i", *bounds))
    data = pa.Array.from_buffers(pa.binary(), count, [None, offsets, buffer.slice(start, size)])
    return pa.RecordBatch.from_arrays([uint64s(version, count), data], schema=put_schema())


def uint64s(value: int, count: int = 1) -> pa.Array:
    """An Arrow uint64 array of ``count`` times ``value``, built from its buffer.

    Not ``pa.array([...])``: pyarrow's conversion of a Python list imports pandas (a second,
    more on a busy machine) the first time, if pandas is installed.
    """
    import pyarrow as pa

    return pa.Array.from_buffers(
        pa.uint64(), count, [None, pa.py_buffer(struct.pack(f"<{count}Q", *[value] * count))]
    )


def utf8s(text: str) -> pa.Array:
    """An Arrow utf8 array of one ``text``, built from its buffers (see :func:`uint64s`)."""
    import pyarrow as pa

    data = text.encode()
    return pa.Array.from_buffers(
        pa.utf8(), 1, [None, pa.py_buffer(struct.pack("<2i", 0, len(data))), pa.py_buffer(data)]
    )


def rows_data(column: pa.Array) -> pa.Buffer:
    """The data of all rows of a binary column: one slice, as rows are stored end to end."""
    import pyarrow as pa

    if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
        raise ValueError(f"the data column must be binary, not {column.type}")
    if len(column) == 0:
        return pa.py_buffer(b"")
    _, offsets, data = column.buffers()
    width = "q" if pa.types.is_large_binary(column.type) else "i"
    (first,) = struct.unpack_from(f"<{width}", offsets, column.offset * struct.calcsize(width))
    (last,) = struct.unpack_from(f"<{width}", offsets, (column.offset + len(column)) * struct.calcsize(width))
    return data.slice(first, last - first) if data is not None else pa.py_buffer(b"")


def write_file(path: Path, data: pa.Buffer | pa.Table, version: int) -> None:
    """Write one object file (or patch file) under a temporary name, then rename it.

    Opaque data is one row holding ``data``; a native Arrow table is written as it is,
    with the version in its schema.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    staging = temporary(path.parent)
    try:
        if isinstance(data, pa.Table):
            table = data.replace_schema_metadata(stamped(data.schema, version).metadata)
            with pa.OSFile(str(staging), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        else:
            schema = put_schema()
            with pa.OSFile(str(staging), "wb") as sink, ipc.new_file(sink, schema) as writer:
                writer.write_batch(rows(data, 0, data.size, max(data.size, 1), version=version))
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def file_data(path: Path) -> pa.Buffer:
    """An object file's data, mapped read-only (no copy): the map lives as long as the buffer."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    batch = ipc.open_file(pa.memory_map(str(path))).get_batch(0)
    return rows_data(batch.column(batch.num_columns - 1))


def row_buffer(column: pa.ChunkedArray, row: int) -> pa.Buffer:
    """The bytes of one binary row, without copying."""
    for chunk in column.chunks:
        if row < len(chunk):
            offsets = chunk.buffers()[1]
            first, last = struct.unpack_from("<2i", offsets, (chunk.offset + row) * 4)
            return chunk.buffers()[2].slice(first, last - first)
        row -= len(chunk)
    raise IndexError(row)


def data_in(whole: pa.Buffer, size: int) -> tuple[int, int] | None:
    """Where an object file's data lies in the file's bytes (start, length), or None if not one row."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        batch = ipc.open_file(whole).get_batch(0)
        data = rows_data(batch.column(batch.num_columns - 1))
        start, length = data.address - whole.address, data.size
        del batch, data  # release their hold on the file's bytes
    except (pa.ArrowException, IndexError, ValueError, struct.error):
        return None
    return (start, length) if 0 <= start and start + length <= size else None
