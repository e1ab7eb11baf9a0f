"""``%debug`` and ``%pdb`` on the frames of a failed remote cell.

The runner describes a failed cell's frames as data (:mod:`flame_magic_runner.debug`): file,
function, line, the lines of the file, and the locals, as values or reprs. This module
turns that data back into a genuine Python traceback and lets IPython's own debugger open
on it.

Why genuine frames, and not a debugger that walks data
    pdb and IPython's debugger read frames everywhere: ``f_locals`` and ``f_globals`` for
    ``p``, ``pp``, ``!stmt``, ``interact`` and completion, ``f_code`` and ``f_lineno`` for
    ``where``, ``list`` and ``ll``, ``f_back`` and the traceback for ``up`` and ``down``,
    IPython's frame hiding, chained exceptions. A debugger that walks data would have to
    re-implement each of them, and follow every Python and IPython release. Frames cannot
    be built from data, but code can be: for each remote frame this module compiles a
    stand-in with the same file name, function name, first line and line, whose locals
    are the remote locals (constants of its code object), and which calls the next
    stand-in on that line; the innermost one raises. Running the outermost gives a real
    traceback with the remote shape, and every debugger command works on it unchanged.

How it is hooked in
    Both ``%debug`` and ``%pdb on`` end in the shell's ``debugger()`` method, which opens
    IPython's debugger on ``sys.last_value``. :func:`install` wraps that method: when the
    last exception is a remote cell's, its frames are rebuilt (fetched from the runner
    first if they did not come with the error) and set as its traceback, under IPython's
    own bottom frame, as for a local cell. When they cannot be had (the runner is gone), a
    line says why and the remote traceback is shown as text instead.
"""

from __future__ import annotations

import ast
import builtins
import functools
import keyword
import linecache
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FunctionType, TracebackType
from typing import TYPE_CHECKING, Any

from flame_magic import codec
from flame_magic.errors import RemoteError, remote_error
from flame_magic.protocol import cell

if TYPE_CHECKING:
    from flame_magic.sessions import Plan

Fetch = Callable[[str], cell.DebugFrames]

# The file name cloudpickle gives the code of a function it sent by value.
DYNAMIC = "<dynamic-code>"


class NotSent:
    """A remote local that did not travel: it shows as the runner's repr of it."""

    __slots__ = ("_repr", "_why")

    def __init__(self, text: str, why: str, shown: bool) -> None:
        self._repr = f"{text}  [{why}]" if shown else text
        self._why = why

    def __repr__(self) -> str:
        return self._repr

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"only the repr of this value came from the runner ({self._why})")


@dataclass
class _Failure:
    """How to get a remote failure's frames, and the traceback once built."""

    frames: cell.DebugFrames | None
    fetch: Callable[[], cell.DebugFrames] | None
    where: str = ""
    traceback: TracebackType | None = None
    left_out: int = 0


# By exception: a failure is debuggable for as long as its exception lives, as locally.
_failures: weakref.WeakKeyDictionary[BaseException, _Failure] = weakref.WeakKeyDictionary()


def remote_failure(error: cell.RemoteException, fetch: Fetch | None = None) -> RemoteError:
    """The exception for a failed remote cell, which ``%debug`` can open.

    Parameters
    ----------
    error
        The runner's description of the exception, with its frames or their ``debug_id``.
    fetch
        Asks the runner that ran the cell for the frames kept under a ``debug_id``
        (see :func:`fetcher`); None when that runner cannot be asked later.
    """
    exc = remote_error(error.ename, error.evalue, error.traceback, tuple(error.builtin_bases))
    frames = error.frames if error.HasField("frames") else None
    ask = functools.partial(fetch, error.debug_id) if fetch is not None and error.debug_id else None
    if frames is not None or ask is not None:
        _failures[exc] = _Failure(frames, ask)
    return exc


def frames_with_error(plan: Plan, call_pdb: bool) -> bool:
    """Whether a cell's frames should come with its error, rather than stay on its runner until asked.

    They come with it when the debugger opens at once (``%pdb on``), and when the runner
    that kept them may not be the one asked later: a map's session has several runners and
    is closed when an item fails, a named session may have several runners, a background
    cell's own session closes when it ends. Items of a ``--return-exceptions`` map do not
    send them: every item might fail.
    """
    if plan.item is not None:
        return not plan.return_exceptions
    return call_pdb or plan.background is not None or plan.key.instances > 1


def remember(exc: BaseException) -> None:
    """Make a failure shown outside a cell (a background cell's) the one ``%debug`` opens.

    IPython does the same for every error it shows; the notebook's frames that waited for
    the background cell are not kept (``%debug`` opens the remote frames alone).
    """
    if _failure_of(exc) is not None:
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, None
        if sys.version_info >= (3, 12):
            sys.last_exc = exc


def name_failure(exc: BaseException, where: str) -> None:
    """Say which remote cell ``exc`` came from when the debugger opens (e.g. a map's item)."""
    failure = _failure_of(exc)
    if failure is not None:
        failure.where = where


def _failure_of(exc: object) -> _Failure | None:
    # Only our own exception classes can be weakly referenced (builtin ones cannot).
    return _failures.get(exc) if isinstance(exc, RemoteError) else None


def fetcher(ask: Callable[[str, cell.CellRequest], cell.CellResult], session_id: str) -> Fetch:
    """Ask session ``session_id``'s runner for kept frames: a small task, no cell runs.

    ``ask`` sends a request to a session's runner (``Runs.ask``).
    """

    def fetch(debug_id: str) -> cell.DebugFrames:
        request = cell.CellRequest(header=codec.local_header(), debug_fetch=debug_id)
        return ask(session_id, request).debug

    return fetch


def install(shell: Any) -> None:
    """Make ``%debug`` and ``%pdb`` open remote cells' frames (idempotent).

    The shell's ``debugger`` method is what both call; it is wrapped on this shell only.
    """
    if getattr(shell.debugger, "_flame_magic", False):
        return
    original = shell.debugger

    def debugger(force: bool = False) -> None:
        if (force or shell.call_pdb) and not _prepare(shell):
            return
        original(force)

    debugger._flame_magic = True  # type: ignore[attr-defined]
    shell.debugger = debugger


def uninstall(shell: Any) -> None:
    """Undo :func:`install`."""
    if getattr(shell.__dict__.get("debugger"), "_flame_magic", False):
        del shell.debugger


def _prepare(shell: Any) -> bool:
    """Set a remote failure's rebuilt frames as its traceback; False if the debugger should not open."""
    exc = getattr(sys, "last_value", None)
    failure = _failure_of(exc)
    if failure is None or not isinstance(exc, RemoteError):
        return True  # a local error: IPython's debugger as usual
    if failure.traceback is None:
        frames = failure.frames
        if frames is None and failure.fetch is not None:
            try:
                frames = failure.fetch()
            except Exception as problem:  # a FlameError or CellFailed, said in one line
                return _fall_back(exc, f"the runner could not be asked ({problem})")
        if frames is None or frames.missing or not frames.frames:
            return _fall_back(exc, frames.missing if frames is not None and frames.missing else "no frames")
        try:
            failure.traceback = build_traceback(frames, shell.user_ns)
        except Exception as problem:  # data this notebook cannot rebuild
            return _fall_back(exc, f"they could not be rebuilt here ({problem!r})")
        failure.left_out = frames.left_out
    where = f" of {failure.where}" if failure.where else ""
    print(
        f"flmrun: debugging the remote frames{where}, rebuilt from the runner's data "
        "(locals that did not travel show as their repr)."
    )
    if failure.left_out:
        print(f"flmrun: {failure.left_out} frames in the middle of this deep traceback did not travel.")
    tb = failure.traceback
    top = getattr(sys, "last_traceback", None)
    if top is not None:  # IPython's own bottom frame first, as for a local cell (it hides it)
        tb = TracebackType(tb, top.tb_frame, top.tb_lasti, top.tb_lineno)
    exc.__traceback__ = tb
    sys.last_traceback = tb
    # A traceback IPython kept from an earlier local error would be opened instead.
    shell.InteractiveTB.tb = None
    return True


def _fall_back(exc: RemoteError, why: str) -> bool:
    """Say in one line why the remote frames cannot be opened, and show the remote traceback."""
    print(f"flmrun: cannot open the remote frames: {why}. The remote traceback:", file=sys.stderr)
    print(exc.remote_traceback.rstrip("\n"), file=sys.stderr)
    return False


class _Standin(Exception):
    """Raised by the innermost stand-in frame; only its traceback is kept."""


def build_traceback(frames: cell.DebugFrames, notebook: dict[str, Any] | None = None) -> TracebackType:
    """A genuine traceback whose frames stand in for ``frames`` (outermost first).

    Parameters
    ----------
    frames
        The runner's description of the frames.
    notebook
        The notebook's namespace: frames of its own functions are given the file they were
        defined in, so that their lines show (cloudpickle sends them as ``<dynamic-code>``).
    """
    _register_sources(frames.sources)
    defined = _notebook_files(notebook or {}) if any(f.filename == DYNAMIC for f in frames.frames) else {}
    values = [_values(frame) for frame in frames.frames]
    cell_globals = next((v for f, v in zip(frames.frames, values, strict=True) if f.module), None)
    if cell_globals is not None:
        cell_globals["__builtins__"] = builtins
    call: Callable[[], Any] | None = None  # the next inner frame, as the outer one calls it
    for frame, local in reversed(list(zip(frames.frames, values, strict=True))):
        action: Any = _Standin() if call is None else call
        filename = defined.get((frame.function, frame.first_lineno), frame.filename)
        if frame.module:
            code = _stand_in(frame, filename, [], [], action)
            call = functools.partial(exec, code, local)
        else:
            if frame.cell_globals and cell_globals is not None:
                namespace = cell_globals
            else:
                namespace = {"__builtins__": builtins, "__name__": frame.filename}
            args = [name for name in frame.args if _usable(name) and name in local]
            others = [name for name in local if _usable(name) and name not in args]
            code = _stand_in(frame, filename, args, [(name, local[name]) for name in others], action)
            function = FunctionType(code, namespace, frame.function)
            call = functools.partial(function, *(local[name] for name in args))
    assert call is not None, "no frames"
    try:
        call()
    except _Standin as raised:
        tb = raised.__traceback__
        assert tb is not None and tb.tb_next is not None
        return tb.tb_next  # without this function's own frame
    raise AssertionError("the innermost stand-in frame did not raise")


def _stand_in(
    frame: cell.Frame, filename: str, args: list[str], assigned: list[tuple[str, Any]], action: Any
) -> CodeType:
    """The code of one stand-in frame: set its locals, then call or raise ``action``, on its line.

    The locals' values and ``action`` are constants of the code object, so the frame's
    locals are exactly the remote ones: placeholders are compiled, then swapped.
    """
    act = "\0flame-magic action"
    marks = {act: action}
    body = []
    for index, (name, value) in enumerate(assigned):
        mark = f"\0flame-magic {index}"
        marks[mark] = value
        body.append(f"    {name} = {mark!r}\n")
    step = f"raise {act!r}" if isinstance(action, BaseException) else f"{act!r}()"
    if frame.module:
        source = step + "\n"
    else:
        source = f"def _stand_in({', '.join(args)}):\n{''.join(body)}    {step}\n"
    tree = ast.parse(source)
    line = max(frame.lineno, 1)
    for node in ast.walk(tree):
        if hasattr(node, "lineno"):
            node.lineno = node.end_lineno = line  # type: ignore[attr-defined]
    if not frame.module:
        tree.body[0].lineno = max(min(frame.first_lineno, line), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # "'str' object is not callable"
        code = compile(tree, filename, "exec", dont_inherit=True)
    if not frame.module:
        code = next(c for c in code.co_consts if isinstance(c, CodeType))
    consts = tuple(marks.get(c, c) if isinstance(c, str) else c for c in code.co_consts)
    renamed: dict[str, Any] = {"co_consts": consts}
    if not frame.module:
        renamed["co_name"] = frame.function
        if sys.version_info >= (3, 11):
            renamed["co_qualname"] = frame.function
    return code.replace(**renamed)


def _notebook_files(namespace: dict[str, Any]) -> dict[tuple[str, int], str]:
    """Where the notebook's own functions (and methods, and the functions inside them) were defined.

    By name and first line, the two things cloudpickle keeps of a function it sends by value.
    """
    found: dict[tuple[str, int], str] = {}
    codes = [f.__code__ for value in list(namespace.values()) for f in _own_functions(value)]
    while codes:
        code = codes.pop()
        if found.setdefault((code.co_name, code.co_firstlineno), code.co_filename) == code.co_filename:
            codes.extend(c for c in code.co_consts if isinstance(c, CodeType))
    return found


def _own_functions(value: Any) -> list[FunctionType]:
    if getattr(value, "__module__", None) != "__main__":
        return []  # an installed library's: it travelled by reference, with its file name
    if isinstance(value, FunctionType):
        return [value]
    if not isinstance(value, type):
        return []
    functions = []
    for attribute in vars(value).values():
        parts = (
            (attribute.fget, attribute.fset, attribute.fdel)
            if isinstance(attribute, property)
            else (attribute,)
        )
        for part in parts:
            part = getattr(part, "__func__", part)  # staticmethod, classmethod
            if isinstance(part, FunctionType):
                functions.append(part)
    return functions


def _usable(name: str) -> bool:
    # Comprehensions' hidden `.0` and the like cannot be a stand-in's variable.
    return name.isidentifier() and not keyword.iskeyword(name)


def _values(frame: cell.Frame) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for local in frame.locals:
        if local.pickle:
            try:
                # The pickle came in a CellResult whose version header was checked.
                values[local.name] = codec.loads(local.pickle)
                continue
            except Exception as exc:
                why = f"it cannot be loaded here: {type(exc).__name__}: {exc}"
                values[local.name] = NotSent(f"<remote value of `{local.name}`>", why, shown=True)
                continue
        if local.too_large:
            values[local.name] = NotSent(local.repr, local.too_large, shown=True)
        else:
            values[local.name] = NotSent(local.repr, f"it does not pickle: {local.unpicklable}", shown=False)
    return values


def _register_sources(sources: Any) -> None:
    """Put the runner's lines of the frames' files where pdb's ``list`` and ``ll`` read them."""
    for source in sources:
        name = source.filename
        if os.path.isfile(name):
            continue  # the same path here (the embedded Flame): its lines are already readable
        lines = ["\n"] * (max(source.first_line, 1) - 1) + list(source.lines)
        # mtime None: linecache.checkcache keeps the entry.
        linecache.cache[name] = (sum(len(line) for line in lines), None, lines, name)
