from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("protocol", "python", "cloudpickle")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    python: str
    cloudpickle: str
    def __init__(self, protocol: _Optional[int] = ..., python: _Optional[str] = ..., cloudpickle: _Optional[str] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: Header
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("size", "digest", "refs", "segment")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    size: int
    digest: str
    refs: _containers.RepeatedScalarFieldContainer[bytes]
    segment: str
    def __init__(self, size: _Optional[int] = ..., digest: _Optional[str] = ..., refs: _Optional[_Iterable[bytes]] = ..., segment: _Optional[str] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("name", "pickle", "buffers", "cached_pickle")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PICKLE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PICKLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pickle: bytes
    buffers: _containers.RepeatedCompositeFieldContainer[Blob]
    cached_pickle: Blob
    def __init__(self, name: _Optional[str] = ..., pickle: _Optional[bytes] = ..., buffers: _Optional[_Iterable[_Union[Blob, _Mapping]]] = ..., cached_pickle: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class CacheAccess(_message.Message):
    __slots__ = ("endpoint", "key_prefix", "host")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    key_prefix: str
    host: str
    def __init__(self, endpoint: _Optional[str] = ..., key_prefix: _Optional[str] = ..., host: _Optional[str] = ...) -> None: ...

class Module(_message.Message):
    __slots__ = ("name", "digest", "package", "filename", "source", "blob")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    package: bool
    filename: str
    source: bytes
    blob: Blob
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., package: _Optional[bool] = ..., filename: _Optional[str] = ..., source: _Optional[bytes] = ..., blob: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class Requirement(_message.Message):
    __slots__ = ("module", "distribution", "version")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    module: str
    distribution: str
    version: str
    def __init__(self, module: _Optional[str] = ..., distribution: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Package(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class CellRequest(_message.Message):
    __slots__ = ("header", "source", "filename", "first_line", "inputs", "assign", "timeout", "cache", "values_only", "channel", "modules", "requires", "pip", "items", "stop_at_error", "send_frames", "debug_fetch")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    VALUES_ONLY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    PIP_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_ERROR_FIELD_NUMBER: _ClassVar[int]
    SEND_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FETCH_FIELD_NUMBER: _ClassVar[int]
    header: Header
    source: str
    filename: str
    first_line: int
    inputs: _containers.RepeatedCompositeFieldContainer[Value]
    assign: _containers.RepeatedScalarFieldContainer[str]
    timeout: float
    cache: CacheAccess
    values_only: bool
    channel: str
    modules: _containers.RepeatedCompositeFieldContainer[Module]
    requires: _containers.RepeatedCompositeFieldContainer[Requirement]
    pip: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[MapItem]
    stop_at_error: bool
    send_frames: bool
    debug_fetch: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., source: _Optional[str] = ..., filename: _Optional[str] = ..., first_line: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., assign: _Optional[_Iterable[str]] = ..., timeout: _Optional[float] = ..., cache: _Optional[_Union[CacheAccess, _Mapping]] = ..., values_only: _Optional[bool] = ..., channel: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[Module, _Mapping]]] = ..., requires: _Optional[_Iterable[_Union[Requirement, _Mapping]]] = ..., pip: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[MapItem, _Mapping]]] = ..., stop_at_error: _Optional[bool] = ..., send_frames: _Optional[bool] = ..., debug_fetch: _Optional[str] = ...) -> None: ...

class MapItem(_message.Message):
    __slots__ = ("value", "channel")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    value: Value
    channel: str
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ..., channel: _Optional[str] = ...) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ("header", "grace")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    header: Header
    grace: float
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., grace: _Optional[float] = ...) -> None: ...

class MimeBundle(_message.Message):
    __slots__ = ("data_json", "metadata_json")
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    data_json: str
    metadata_json: str
    def __init__(self, data_json: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class Stream(_message.Message):
    __slots__ = ("name", "text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("stream", "display")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_FIELD_NUMBER: _ClassVar[int]
    stream: Stream
    display: MimeBundle
    def __init__(self, stream: _Optional[_Union[Stream, _Mapping]] = ..., display: _Optional[_Union[MimeBundle, _Mapping]] = ...) -> None: ...

class RemoteException(_message.Message):
    __slots__ = ("ename", "evalue", "traceback", "builtin_bases", "debug_id", "frames")
    ENAME_FIELD_NUMBER: _ClassVar[int]
    EVALUE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_BASES_FIELD_NUMBER: _ClassVar[int]
    DEBUG_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    ename: str
    evalue: str
    traceback: str
    builtin_bases: _containers.RepeatedScalarFieldContainer[str]
    debug_id: str
    frames: DebugFrames
    def __init__(self, ename: _Optional[str] = ..., evalue: _Optional[str] = ..., traceback: _Optional[str] = ..., builtin_bases: _Optional[_Iterable[str]] = ..., debug_id: _Optional[str] = ..., frames: _Optional[_Union[DebugFrames, _Mapping]] = ...) -> None: ...

class FrameLocal(_message.Message):
    __slots__ = ("name", "pickle", "repr", "too_large", "unpicklable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PICKLE_FIELD_NUMBER: _ClassVar[int]
    REPR_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    UNPICKLABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pickle: bytes
    repr: str
    too_large: str
    unpicklable: str
    def __init__(self, name: _Optional[str] = ..., pickle: _Optional[bytes] = ..., repr: _Optional[str] = ..., too_large: _Optional[str] = ..., unpicklable: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("filename", "function", "lineno", "first_lineno", "args", "module", "cell_globals", "locals")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    LINENO_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINENO_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    CELL_GLOBALS_FIELD_NUMBER: _ClassVar[int]
    LOCALS_FIELD_NUMBER: _ClassVar[int]
    filename: str
    function: str
    lineno: int
    first_lineno: int
    args: _containers.RepeatedScalarFieldContainer[str]
    module: bool
    cell_globals: bool
    locals: _containers.RepeatedCompositeFieldContainer[FrameLocal]
    def __init__(self, filename: _Optional[str] = ..., function: _Optional[str] = ..., lineno: _Optional[int] = ..., first_lineno: _Optional[int] = ..., args: _Optional[_Iterable[str]] = ..., module: _Optional[bool] = ..., cell_globals: _Optional[bool] = ..., locals: _Optional[_Iterable[_Union[FrameLocal, _Mapping]]] = ...) -> None: ...

class SourceFile(_message.Message):
    __slots__ = ("filename", "first_line", "lines")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FIRST_LINE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    first_line: int
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, filename: _Optional[str] = ..., first_line: _Optional[int] = ..., lines: _Optional[_Iterable[str]] = ...) -> None: ...

class DebugFrames(_message.Message):
    __slots__ = ("frames", "sources", "missing", "left_out")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[Frame]
    sources: _containers.RepeatedCompositeFieldContainer[SourceFile]
    missing: str
    left_out: int
    def __init__(self, frames: _Optional[_Iterable[_Union[Frame, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[SourceFile, _Mapping]]] = ..., missing: _Optional[str] = ..., left_out: _Optional[int] = ...) -> None: ...

class NotReturned(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CellResult(_message.Message):
    __slots__ = ("header", "outputs", "result", "value", "assigned", "not_returned", "error", "refused", "packages", "streamed", "items", "debug", "host")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    NOT_RETURNED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    header: Header
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    result: MimeBundle
    value: Value
    assigned: _containers.RepeatedCompositeFieldContainer[Value]
    not_returned: _containers.RepeatedCompositeFieldContainer[NotReturned]
    error: RemoteException
    refused: str
    packages: _containers.RepeatedCompositeFieldContainer[Package]
    streamed: bool
    items: _containers.RepeatedCompositeFieldContainer[CellResult]
    debug: DebugFrames
    host: str
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., result: _Optional[_Union[MimeBundle, _Mapping]] = ..., value: _Optional[_Union[Value, _Mapping]] = ..., assigned: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., not_returned: _Optional[_Iterable[_Union[NotReturned, _Mapping]]] = ..., error: _Optional[_Union[RemoteException, _Mapping]] = ..., refused: _Optional[str] = ..., packages: _Optional[_Iterable[_Union[Package, _Mapping]]] = ..., streamed: _Optional[bool] = ..., items: _Optional[_Iterable[_Union[CellResult, _Mapping]]] = ..., debug: _Optional[_Union[DebugFrames, _Mapping]] = ..., host: _Optional[str] = ...) -> None: ...
