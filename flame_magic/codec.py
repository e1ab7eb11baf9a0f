"""Pickles and the envelope around them: the only code that calls cloudpickle.

Pickles are code. Unpickling runs whatever the writer chose, so payloads are
only loaded from peers the user trusts (their own runner, through their own
Flame), and only after :func:`check_header` has accepted the writer's versions.
cloudpickle's output loads only under the same Python minor version and the
same cloudpickle version, which is what the header records.

Large values are pickled with protocol 5's out-of-band buffers (:func:`dumps_oob`): the
data of numpy arrays, pandas frames and Arrow arrays is not copied into the pickle but
handed over as buffers, which travel through Flame's object cache as raw bytes and are
given back to :func:`loads_oob`. The pickle that refers to them travels in a message
whose header was checked, as any other.

Under :func:`record_modules`, pickling also notes the modules the pickles name (unpickling
imports them), so that the notebook's own modules can travel with them and installed
packages be checked on the runner first (:mod:`flame_magic.modules`).
"""

from __future__ import annotations

import contextvars
import io
import pickle
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cloudpickle
from google.protobuf.message import DecodeError, Message

from flame_magic.errors import PayloadError, TooLargeError, UnpicklableError
from flame_magic.protocol import cell

# 2: large values by reference through Flame's object cache (Value.buffers, CellRequest.cache).
# 3: the notebook's own modules, required packages and --pip (CellRequest.modules, requires, pip);
#    a failed cell's frames for %debug (RemoteException.debug_id/frames, CellRequest.debug_fetch);
#    builtin bases of remote exceptions (RemoteException.builtin_bases).
# 4: the wire contract written once (flame_magic.wire, flame_magic.objects): the last value in
#    one field (CellResult.value), the interrupt a message (Interrupt), every blob's SHA-256
#    digest checked before its bytes are loaded (Blob.digest, Module.digest).
# 5: --map items in batches, several per task (CellRequest.items, stop_at_error; CellResult.items);
#    values through shared memory on one host (Blob.segment, CacheAccess.host, CellResult.host).
PROTOCOL_VERSION = 5
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
CLOUDPICKLE_VERSION: str = cloudpickle.__version__

M = TypeVar("M", bound=Message)


def local_header() -> cell.Header:
    """The header describing this process as a writer of pickles."""
    return cell.Header(
        protocol=PROTOCOL_VERSION,
        python=PYTHON_VERSION,
        cloudpickle=CLOUDPICKLE_VERSION,
    )


def check_header(header: cell.Header, peer: str, same_cloudpickle: bool = True) -> None:
    """Refuse a payload whose writer's versions differ from ours.

    Parameters
    ----------
    header
        The header the peer wrote.
    peer
        Who wrote it, for the message ("the runner", "the notebook").
    same_cloudpickle
        Whether cloudpickle's version must match too. Flame's stock ``flmrun`` has the
        cloudpickle its cluster installed, which the notebook cannot choose: there a
        difference is allowed (the notebook says so once per session); Python's must match.
    """
    if header.protocol != PROTOCOL_VERSION:
        raise PayloadError(
            f"{peer} speaks flame-magic protocol {header.protocol or 'unknown'}, "
            f"this side speaks {PROTOCOL_VERSION}: install the same flame-magic "
            "version on both sides."
        )
    mismatches = []
    if header.python != PYTHON_VERSION:
        mismatches.append(f"Python {header.python} there, {PYTHON_VERSION} here")
    if header.cloudpickle != CLOUDPICKLE_VERSION and same_cloudpickle:
        mismatches.append(f"cloudpickle {header.cloudpickle} there, {CLOUDPICKLE_VERSION} here")
    if mismatches:
        raise PayloadError(
            f"Version mismatch with {peer}: {'; '.join(mismatches)}. Pickled values only "
            "travel between the same Python minor version and the same cloudpickle "
            f"version: use Python {PYTHON_VERSION} with cloudpickle=={CLOUDPICKLE_VERSION} "
            "on both sides."
        )


def encode(message: Message) -> bytes:
    """Serialise one of our envelope messages."""
    return message.SerializeToString()


def decode(kind: type[M], data: bytes, peer: str, same_cloudpickle: bool = True) -> M:
    """Parse an envelope message and check its header (see :func:`check_header`), before any unpickling."""
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadError(f"{peer} sent data that is not a flame-magic {kind.__name__}: {exc}") from None
    if not message.HasField("header"):  # type: ignore[arg-type]
        raise PayloadError(f"{peer} sent a {kind.__name__} without a version header: is it flame-magic?")
    check_header(message.header, peer, same_cloudpickle)  # type: ignore[attr-defined]
    return message


@dataclass
class ModulesUsed:
    """What the values pickled under :func:`record_modules` refer to.

    Attributes
    ----------
    modules
        Modules the pickles name (classes, functions and modules by reference, the
        modules of the objects' types): unpickling imports them.
    names
        Global and attribute names in the code of functions pickled by value: a module
        among them may be imported when the function runs.
    """

    modules: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)


_recording: contextvars.ContextVar[ModulesUsed | None] = contextvars.ContextVar("recording", default=None)


@contextmanager
def record_modules() -> Iterator[ModulesUsed]:
    """Note what the values pickled in this block refer to (see :class:`ModulesUsed`)."""
    used = ModulesUsed()
    token = _recording.set(used)
    try:
        yield used
    finally:
        _recording.reset(token)


class _RecordingPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, noting the modules of what it pickles on the way."""

    def __init__(self, file: Any, used: ModulesUsed, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._used = used

    def reducer_override(self, obj: Any) -> Any:
        used = self._used
        if isinstance(obj, types.ModuleType):
            used.modules.add(obj.__name__)
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                used.modules.add(module)
            # Only functions pickled by value bring their code (those of the notebook).
            if isinstance(obj, types.FunctionType) and _by_value(obj):
                _code_names(obj.__code__, used.names)
        else:
            used.modules.add(type(obj).__module__)
        return super().reducer_override(obj)


def _by_value(function: types.FunctionType) -> bool:
    """Whether cloudpickle sends a function's code (it cannot import it by name)."""
    module = function.__module__
    return module == "__main__" or module not in sys.modules or "<locals>" in function.__qualname__


def _code_names(code: types.CodeType, names: set[str]) -> None:
    names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, names)


def _dumps(value: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None) -> bytes:
    used = _recording.get()
    if used is None:
        return cloudpickle.dumps(value, protocol=5, buffer_callback=buffer_callback)
    with io.BytesIO() as file:
        _RecordingPickler(file, used, protocol=5, buffer_callback=buffer_callback).dump(value)
        return file.getvalue()


def dumps(value: Any) -> bytes:
    """Pickle a value by value where cloudpickle must (``__main__``), by reference otherwise."""
    try:
        return _dumps(value)
    except Exception as exc:
        raise UnpicklableError(str(exc) or type(exc).__name__) from exc


class _CappedWriter:
    """A pickle's destination that refuses to grow past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.size += size
        if self.size > self.limit:
            raise TooLargeError(f"over {self.limit} bytes")
        self.parts.append(bytes(data))
        return size


def dumps_within(value: Any, limit: int) -> bytes:
    """Pickle a value as :func:`dumps` does, giving up as soon as it passes ``limit`` bytes.

    The pickle is written as it is made, so a large value costs only what was written
    before the limit, not a whole pickle (buffers are written in band, uncopied, and
    refused whole when they alone are over the limit).

    Raises
    ------
    TooLargeError
        If the pickle would be over ``limit`` bytes.
    UnpicklableError
        If cloudpickle cannot serialise the value.
    """
    writer = _CappedWriter(limit)
    try:
        cloudpickle.CloudPickler(writer, protocol=5).dump(value)
    except TooLargeError:
        raise
    except Exception as exc:
        raise UnpicklableError(str(exc) or type(exc).__name__) from exc
    return b"".join(writer.parts)


def loads(data: bytes) -> Any:
    """Unpickle a value from a payload whose header was checked."""
    return cloudpickle.loads(data)


@dataclass
class Pickled:
    """A value pickled with out-of-band buffers: the pickle, and the buffers it refers to.

    Attributes
    ----------
    pickle
        The pickle stream, without the buffers' data.
    buffers
        Contiguous byte views of the buffers, in the order the pickle expects them; they
        share memory with the value (nothing was copied).
    """

    pickle: bytes
    buffers: list[memoryview] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of the pickle and its buffers together."""
        return len(self.pickle) + sum(b.nbytes for b in self.buffers)


def dumps_oob(value: Any, min_buffer: int) -> Pickled:
    """Pickle a value, keeping contiguous buffers of ``min_buffer`` bytes or more out of band.

    Smaller or non-contiguous buffers stay in the pickle, so a value without large
    buffers gives exactly what :func:`dumps` gives.
    """
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickled in band, as a copy
            return True
        if raw.nbytes < min_buffer:
            return True
        buffers.append(raw)
        return False  # false: the pickle only records that a buffer goes here

    try:
        data = _dumps(value, buffer_callback=out_of_band)
    except Exception as exc:
        raise UnpicklableError(str(exc) or type(exc).__name__) from exc
    return Pickled(data, buffers)


def loads_oob(data: bytes | memoryview, buffers: Sequence[Any]) -> Any:
    """Unpickle a value from a checked payload, giving it its out-of-band buffers in order.

    Writable buffers give writable numpy arrays, as in the process that pickled them.
    """
    return cloudpickle.loads(data, buffers=buffers)


# -- Flame's stock flmrun (flamepy's runner) -----------------------------------------------
#
# flamepy's runner unpickles the session's RunnerContext and each task's RunnerRequest with
# cloudpickle, and pickles what the evaluator returns. flame-magic writes those two pickles
# itself, from opcodes, so that they name only flamepy's two classes and builtins (no code
# object, which loads only under the writer's Python minor version), and without needing
# flamepy in the notebook. Our envelopes travel inside them as plain bytes, framed by
# STOCK_FRAME, and are checked (header first) before anything in them is unpickled.

STOCK_FRAME = b"\xffFM\x01"  # never a BSON document's length, which flamepy's runner tries first
FLAMEPY_TYPES = "flamepy.runner.types"


def flamepy_object(name: str, state: dict[str, Any]) -> bytes:
    """A pickle that flamepy unpickles as ``flamepy.runner.types.<name>`` with ``state`` as its fields.

    Protocol 3 (Python 3.0+): ``GLOBAL`` names the class, ``NEWOBJ`` makes an instance as
    ``copyreg`` would for a dataclass, and ``BUILD`` sets its ``__dict__`` from the state,
    pickled by the standard pickler (plain values, and objects that reduce to builtins).
    """
    body = pickle.dumps(state, protocol=3)
    assert body[:2] == b"\x80\x03" and body[-1:] == pickle.STOP
    klass = f"c{FLAMEPY_TYPES}\n{name}\n".encode()
    return b"\x80\x03" + klass + pickle.EMPTY_TUPLE + pickle.NEWOBJ + body[2:-1] + pickle.BUILD + pickle.STOP


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only plain bytes are expected")


def plain_bytes(data: bytes | memoryview) -> bytes:
    """The bytes in a pickle of one ``bytes`` object, refusing any pickle that names a global.

    flamepy's runner stores what our evaluator returns (bytes) as a cloudpickle; a pickle
    that loads no global cannot run code, so this one is safe to load before its header
    is checked.
    """
    try:
        value = _NoGlobals(io.BytesIO(data)).load()
    except Exception as exc:
        raise PayloadError(f"the runner's result is not plain bytes: {exc}") from None
    if not isinstance(value, bytes):
        raise PayloadError(f"the runner's result is a {type(value).__name__}, not bytes")
    return value


def frame(data: bytes) -> bytes:
    """An envelope framed for the stock runner."""
    return STOCK_FRAME + data


def unframe(data: bytes, peer: str) -> bytes:
    """The envelope inside a frame, or PayloadError for anything else."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(STOCK_FRAME):
        raise PayloadError(f"{peer} sent data that is not a framed flame-magic envelope")
    return bytes(data[len(STOCK_FRAME) :])
