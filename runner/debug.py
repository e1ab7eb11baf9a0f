"""A failed cell's frames as data, for ``%debug`` in the notebook.

Plain Python, no gRPC and no Flame: whatever evaluates cells (flame-magic's runner, or a
cell evaluator inside Flame's stock ``flmrun``) calls :meth:`FailureKeeper.keep` when a
cell raises and :meth:`FailureKeeper.answer` when the notebook asks for the frames.

Cost
    Nothing while cells succeed. When one fails, the keeper holds on to its traceback
    (which keeps the frames and their locals alive, as ``sys.last_traceback`` does in a
    local kernel) until the next cell, and describes the frames only when asked: by the
    notebook's ``%debug`` (a small follow-up task, ``CellRequest.debug_fetch``), or with
    the error when the notebook asked up front (``CellRequest.send_frames``: ``%pdb on``,
    ``--map`` items, background cells, whose runner may be gone by the time ``%debug``
    runs).

What travels
    Each frame's place (file, function, line, first line, argument names), the lines of
    its file as this process has them (the cell's own lines too), and its locals: a local
    whose pickle fits in what is left of the frame's budget travels as its value, any
    other as its repr (bounded) with a note saying why. Innermost frames are served first,
    smallest values first, so the frames where the error happened are the complete ones.
"""

from __future__ import annotations

import linecache
import reprlib
import sys
import uuid
from types import FrameType, TracebackType
from typing import Any

from flame_magic import codec
from flame_magic.protocol import cell

# Bytes of pickled values one frame may carry (its reprs and source count too).
FRAME_BUDGET = 1024 * 1024
# Bytes of a whole answer to %debug: alone in a task's output, under Flame's 4 MiB limit.
FETCH_BUDGET = 3 * 1024 * 1024
# Bytes of the frames that travel with the error, next to the cell's own output.
SNAPSHOT_BUDGET = 1024 * 1024
# A file's lines are sent whole up to this size, else a window around its frames.
SOURCE_LIMIT = 256 * 1024
# Lines after a frame's line kept in a window (pdb's `list` shows 5 after).
CONTEXT_LINES = 10
MAX_LOCALS = 500
# Frames sent of a deep traceback (a RecursionError's): the outermost few and the innermost.
MAX_FRAMES = 200
OUTER_FRAMES = 10
REPR_LIMIT = 1000

# The runner's own modules, also when they travel as source under another package name.
_RUNNER_PACKAGE = __name__.rpartition(".")[0] + "."
_NOT_KEPT = (
    "the runner no longer keeps the frames of that failure: it ran another cell since, or Flame "
    "replaced it (an idle runner is released after a while)"
)


class FailureKeeper:
    """The last failed cell's traceback, kept until the next cell."""

    def __init__(self) -> None:
        self._id = ""
        self._traceback: TracebackType | None = None

    def clear(self) -> None:
        """Forget the kept failure (a new cell starts)."""
        self._id, self._traceback = "", None

    def keep(self, exc: BaseException, error: cell.RemoteException, send: bool) -> None:
        """Keep ``exc``'s frames and say so in ``error``; with ``send``, describe them there too.

        Parameters
        ----------
        exc
            The cell's exception, its traceback starting at the cell's first frame.
        error
            The exception as data, given a ``debug_id`` (and ``frames`` with ``send``).
        send
            Whether the frames travel with the error (capped at SNAPSHOT_BUDGET).
        """
        self.clear()
        if exc.__traceback__ is None:  # the cell never ran (a SyntaxError): no frames
            return
        self._id, self._traceback = uuid.uuid4().hex, exc.__traceback__
        error.debug_id = self._id
        if send:
            error.frames.CopyFrom(_describe_safely(self._traceback, SNAPSHOT_BUDGET))

    def answer(self, debug_id: str) -> cell.DebugFrames:
        """The frames kept under ``debug_id``, or a message saying why there are none."""
        if not debug_id or debug_id != self._id or self._traceback is None:
            return cell.DebugFrames(missing=_NOT_KEPT)
        return _describe_safely(self._traceback, FETCH_BUDGET)


def _describe_safely(tb: TracebackType, budget: int) -> cell.DebugFrames:
    # The cell's error must reach the notebook even if its frames cannot be described.
    try:
        return describe(tb, budget)
    except Exception as exc:
        return cell.DebugFrames(missing=_clean(f"the runner could not describe the frames: {exc!r}"))


def describe(tb: TracebackType, budget: int) -> cell.DebugFrames:
    """The frames of ``tb`` (outermost first) as data, in about ``budget`` bytes."""
    entries: list[tuple[FrameType, int]] = []
    while tb is not None:
        entries.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next  # type: ignore[assignment]
    # A timeout's or an interrupt's handler is the runner's code, not the cell's.
    while len(entries) > 1 and str(entries[-1][0].f_globals.get("__name__")).startswith(_RUNNER_PACKAGE):
        entries.pop()
    message = cell.DebugFrames()
    if len(entries) > MAX_FRAMES:
        message.left_out = len(entries) - MAX_FRAMES
        entries = entries[:OUTER_FRAMES] + entries[OUTER_FRAMES - MAX_FRAMES :]
    message.sources.extend(_sources(entries, budget // 4))
    left = budget - message.ByteSize()
    module_globals = next((f.f_globals for f, _ in entries if _is_module(f)), None)
    for frame, lineno in entries:
        code = frame.f_code
        message.frames.add(
            filename=code.co_filename,
            function=code.co_name,
            lineno=lineno,
            first_lineno=code.co_firstlineno,
            args=_arg_names(code),
            module=_is_module(frame),
            cell_globals=module_globals is not None and frame.f_globals is module_globals,
        )
    for index in reversed(range(len(entries))):
        frame = entries[index][0]
        values = frame.f_globals if _is_module(frame) else frame.f_locals
        used = _add_locals(message.frames[index], values, min(FRAME_BUDGET, max(left, 0)))
        left -= used
    return message


def _is_module(frame: FrameType) -> bool:
    return frame.f_code.co_name == "<module>" and frame.f_locals is frame.f_globals


def _arg_names(code: Any) -> list[str]:
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
    return list(code.co_varnames[:count])


def _add_locals(frame: cell.Frame, values: dict[str, Any], budget: int) -> int:
    """Add ``values`` to ``frame`` as values or reprs within ``budget`` bytes; return the bytes used."""
    names = [name for name in values if name != "__builtins__"][:MAX_LOCALS]
    locals_ = {name: cell.FrameLocal(name=name) for name in names}
    used = 0
    # Smallest first (by a cheap estimate), so one large value does not crowd out the rest.
    for name in sorted(names, key=lambda n: _estimate(values[n])):
        value, local = values[name], locals_[name]
        room = budget - used
        try:
            local.pickle = codec.dumps_within(value, room)
        except codec.TooLargeError:
            local.too_large = f"not sent: its pickle is over the {_size(room)} left for this frame's values"
        except codec.UnpicklableError as exc:
            local.unpicklable = _clean(str(exc))
        except BaseException as exc:  # noqa: B036 - a reducer may raise anything
            local.unpicklable = _clean(f"{type(exc).__name__}: {exc}")
        if not local.pickle:
            local.repr = _repr(value)
        used += local.ByteSize()
    frame.locals.extend(locals_[name] for name in names)
    return used


def _estimate(value: Any) -> int:
    try:
        return int(getattr(value, "nbytes", 0) or 0) + sys.getsizeof(value)
    except BaseException:  # noqa: B036 - a broken __sizeof__ must not break the report
        return 0


def _sources(entries: list[tuple[FrameType, int]], limit: int) -> list[cell.SourceFile]:
    """The lines of the frames' files, in about ``limit`` characters, so locals keep most of the budget.

    Files come in the order of their outermost frame: the cell's own first.
    """
    spans: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for frame, lineno in entries:
        code = frame.f_code
        low, high, _ = spans.get(code.co_filename, (code.co_firstlineno, lineno, frame.f_globals))
        spans[code.co_filename] = (
            min(low, code.co_firstlineno),
            max(high, lineno + CONTEXT_LINES),
            frame.f_globals,
        )
    files = []
    for filename, (low, high, module_globals) in spans.items():
        lines = linecache.getlines(filename, module_globals)
        if not lines:
            continue  # e.g. a notebook function that travelled by value: the notebook has its lines
        room = min(SOURCE_LIMIT, limit)
        # Whole; else from the first function's first line; else around the last frame's line.
        for first, last in ((1, len(lines)), (max(low, 1), high), (max(high - 2 * CONTEXT_LINES, 1), high)):
            window = lines[first - 1 : last]
            if sum(len(line) for line in window) <= room:
                break
        else:
            continue  # not even a few lines fit: `list` shows nothing for this file
        lines = window
        limit -= sum(len(line) for line in lines)
        files.append(cell.SourceFile(filename=filename, first_line=first, lines=[_clean(x) for x in lines]))
    return files


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = REPR_LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 50


def _repr(value: Any) -> str:
    try:
        return _clean(_REPR.repr(value))
    except BaseException:  # noqa: B036 - a broken __repr__ must not break the report
        return f"<{type(value).__name__} object: repr() failed>"


def _size(size: int) -> str:
    return f"{size / 1024:.0f} KiB" if size < 1000 * 1024 else f"{size / (1024 * 1024):.1f} MiB"


def _clean(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")
