"""Evaluate notebook cells in the runner's persistent namespace.

This module turns a ``CellRequest`` into a ``CellResult`` and knows nothing of gRPC.

Namespace
    One module named ``__main__`` per process, installed in ``sys.modules``, so imports
    and definitions persist from cell to cell and what a cell defines pickles by value
    (cloudpickle, and plain pickle inside the cell, both look ``__main__`` up).

Capturing ``display()``
    IPython's ``display()`` only publishes rich output while an ``InteractiveShell``
    singleton exists; without one it prints. So the runner creates a plain
    ``InteractiveShell`` once, with its history database disabled, and while a cell runs
    swaps the shell's ``display_pub`` for a publisher that appends to the cell's output
    list. The same shell's ``display_formatter`` formats the cell's value, so the notebook
    shows what Jupyter would have shown (pretty printing, ``_repr_html_``...). Measured
    with Python 3.11 and IPython 8.12: importing IPython costs about 170 ms, which the
    formatter needs anyway, and creating the shell about 10 ms more. Lighter tricks
    (patching ``IPython.display.display``, faking the singleton) would save only those
    10 ms, and miss libraries that imported ``display`` before the patch or trip IPython's
    ``isinstance`` checks. :func:`prepare` pays the cost while Flame connects and binds the
    session, before the first cell arrives; the socket is listening about 85 ms after the
    process starts. The shell keeps its own namespace, so ``In``, ``Out`` or ``exit`` never
    appear among the cell's variables.

File descriptors and figures
    What the cell's subprocesses and C code write to fds 1 and 2 is recorded too, in order
    with its prints (:mod:`runner.fdcapture`). matplotlib uses the inline backend, as in a
    Jupyter kernel (``MPLBACKEND``, unless set): the figures a cell leaves open are shown
    as PNG displays at its end and closed.

Size
    Flame carries a task's output in one gRPC message of at most 4 MiB. When the notebook
    reads Flame's object cache (``CellRequest.cache``), large values (the last expression's,
    assigned ones) go back through it by reference, like the notebook's large inputs come
    (:mod:`flame_magic.transfer`). Otherwise, or if the cache fails, :func:`fit_to_limit`
    shrinks a result that would not fit: first the pickled value of the last expression,
    then the largest assigned values, then the tail of the printed text, then rich
    displays, each with a note saying what was left out.
"""

from __future__ import annotations
import __future__

import ast
import asyncio
import base64
import builtins
import importlib.util
import inspect
import io
import json
import linecache
import os
import signal
import sys
import threading
import tokenize
import traceback
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TextIO

from flame_magic import codec
from flame_magic.cache import CacheClient, CacheError
from flame_magic.protocol import MAX_MESSAGE_BYTES, cell
from flame_magic.transfer import CACHE_HINT, RUNNER_SIDE, Outgoing, Shipper

from .debug import FailureKeeper
from .environment import Environment
from .fdcapture import fd_capture
from .live import raise_in_thread

# matplotlib's backend for cells, as ipykernel sets it: figures become PNG displays.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

# Bytes of assigned values a result may carry inline; the rest goes through the object cache.
INLINE_BUDGET = 3 * 1024 * 1024

# Room for the TaskResult around the CellResult (return code, failure message).
RESULT_LIMIT = MAX_MESSAGE_BYTES - 64 * 1024

_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag

_MISSING = object()
_NOTICE_ROOM = 128  # bytes kept free for the "[output truncated ...]" line


class _Recorder:
    """What one cell showed, in order: stream text (merged per run) and display bundles."""

    def __init__(self, stream_limit: int) -> None:
        # Cells may print from their own threads.
        self._lock = threading.Lock()
        self.items: list[tuple[str, list[str]] | cell.MimeBundle] = []
        self._room = stream_limit  # characters; bounds memory for a cell that prints forever
        self.dropped = 0  # UTF-8 bytes of stream text not kept
        self._sent: tuple[int, int] = (0, 0)  # what take() gave: (item, parts or 1) of the last one

    def write(self, name: str, text: str) -> None:
        with self._lock:
            if len(text) > self._room:
                self.dropped += _utf8_len(text[self._room :])
                text = text[: self._room]
                if not text:
                    return
            self._room -= len(text)
            last = self.items[-1] if self.items else None
            if isinstance(last, tuple) and last[0] == name:
                last[1].append(text)
            else:
                self.items.append((name, [text]))

    def display(self, bundle: cell.MimeBundle) -> None:
        with self._lock:
            self.items.append(bundle)

    def take(self) -> list[cell.Output]:
        """What was shown since the last call, in order (all of it the first time)."""
        with self._lock:
            taken: list[cell.Output] = []
            first, done = self._sent
            for index in range(first, len(self.items)):
                item = self.items[index]
                if isinstance(item, tuple):
                    text = "".join(item[1][done if index == first else 0 :])
                    if text:
                        taken.append(cell.Output(stream=cell.Stream(name=item[0], text=_clean(text))))
                elif index != first or done == 0:
                    taken.append(cell.Output(display=item))
            if self.items:
                last = self.items[-1]
                self._sent = (len(self.items) - 1, len(last[1]) if isinstance(last, tuple) else 1)
            return taken


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` for cells: to the running cell's recorder, if any.

    One object per stream for the life of the process, like ipykernel's: a logging
    handler or thread a cell set up keeps writing to whichever cell is running, and
    between cells to the stream the process had (the executor's log).
    """

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name: str, fallback: TextIO) -> None:
        super().__init__()
        self._name = name
        self.fallback = fallback
        self.recorder: _Recorder | None = None
        # Called before recording: hands over what reached fds 1 and 2 first (fd capture).
        self.sync: Callable[[], None] | None = None

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        recorder = self.recorder
        if recorder is None:
            return self.fallback.write(text)
        if text:
            sync = self.sync
            if sync is not None:
                sync()
            recorder.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        if self.recorder is None:
            self.fallback.flush()


def _make_publisher(shell: Any) -> Any:
    """A display publisher for ``shell`` that hands bundles to the current cell's recorder."""
    from IPython.core.displaypub import DisplayPublisher

    class RecordingPublisher(DisplayPublisher):  # type: ignore[misc]
        recorder: _Recorder | None = None

        def publish(
            self,
            data: dict[str, Any],
            metadata: dict[str, Any] | None = None,
            source: Any = None,
            *,
            transient: Any = None,
            update: bool = False,
            **kwargs: Any,
        ) -> None:
            # Updates of an earlier display (display_id) arrive as new displays: the
            # notebook shows a remote cell's outputs once, when it finishes.
            if self.recorder is not None:
                self.recorder.display(mime_bundle(data, metadata))

        def clear_output(self, wait: bool = False) -> None:
            # The base class prints an ANSI escape; a remote cell has no area to clear.
            pass

    return RecordingPublisher(parent=shell, shell=shell)


class Evaluator:
    """Runs cells one at a time in one namespace that persists between them.

    Creating an evaluator installs its namespace as ``sys.modules["__main__"]``;
    :meth:`close` puts the previous one back (for tests; the runner never closes).
    """

    def __init__(self) -> None:
        self.module = types.ModuleType("__main__", "The namespace of a notebook's %%flmrun cells.")
        self.namespace: dict[str, Any] = self.module.__dict__
        self.namespace["__builtins__"] = builtins
        self._previous_main = sys.modules.get("__main__")
        self._shell: Any = None
        self._publisher: Any = None
        self._own_shell = False
        self._plain = False  # no IPython here: plain reprs, no display capture
        self._future_flags = 0  # `from __future__ import ...` in a cell lasts, as in IPython
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compiled: tuple[tuple[str, str, int, int], tuple[Any, Any, bool]] | None = None
        self._stdout = _Stream("stdout", sys.stdout)
        self._stderr = _Stream("stderr", sys.stderr)
        self._caches: dict[str, CacheClient] = {}
        self._shippers: dict[tuple[str, str], Shipper] = {}
        self._shipper = Shipper(None, None, RUNNER_SIDE)  # the running cell's
        self.environment = Environment()  # the notebook's modules, --pip, package versions
        self._failure = FailureKeeper()  # the last failed cell's frames, for %debug
        sys.modules["__main__"] = self.module

    def prepare(self) -> None:
        """Import IPython and set up display capture (idempotent; about 0.2 s the first time).

        Without IPython (Flame's stock runner may lack it) cells still run: values show as
        their ``repr`` and ``display()`` is not captured (the notebook says so once).
        """
        if self._shell is not None or self._plain:
            return
        self.environment.warm()
        if not os.environ.get("MPLBACKEND") and importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ["MPLBACKEND"] = INLINE_BACKEND
        try:
            from IPython.core.interactiveshell import InteractiveShell
            from traitlets.config import Config
        except ImportError:
            self._plain = True
            return
        if InteractiveShell.initialized():
            shell = InteractiveShell.instance()
        else:
            config = Config()
            config.HistoryManager.enabled = False  # no sqlite file or writer thread
            shell = InteractiveShell.instance(config=config)
            self._own_shell = True
        self._publisher = _make_publisher(shell)
        self._shell = shell
        # The shell installs its own namespace as __main__; cells need theirs to be it.
        sys.modules["__main__"] = self.module

    def close(self) -> None:
        """Restore the ``__main__`` module and IPython singleton found at creation."""
        if sys.modules.get("__main__") is self.module:
            if self._previous_main is not None:
                sys.modules["__main__"] = self._previous_main
            else:
                del sys.modules["__main__"]
        if self._own_shell:
            from IPython.core.interactiveshell import InteractiveShell

            InteractiveShell.clear_instance()
            self._own_shell = False
        self._shell = None

    def evaluate(self, request: cell.CellRequest) -> cell.CellResult:
        """Run one cell and describe what it did.

        Parameters
        ----------
        request
            The cell, whose header the caller has already checked.

        Returns
        -------
        cell.CellResult
            Outputs, last-expression value, assigned names and error, fitted in
            :data:`RESULT_LIMIT` bytes. Errors of the cell are reported, never raised.
        """
        if request.debug_fetch:  # %debug asks for a failed cell's frames: no cell runs
            answer = self._failure.answer(request.debug_fetch)
            return cell.CellResult(header=codec.local_header(), debug=answer)
        self._failure.clear()
        self.prepare()
        result = cell.CellResult(header=codec.local_header())
        recorder = _Recorder(RESULT_LIMIT)
        self._shipper = self.shipper(request.cache if request.HasField("cache") else None)
        self._shipper.new_request()
        live = None
        if request.channel and self._shipper.enabled and self._shipper.cache is not None:
            from .live import Live

            live = Live(self._shipper.cache, self._shipper.key_prefix or "", request.channel, recorder.take)
            live.start()
        try:
            with self._capture(recorder):
                self._run(request, result)
        finally:
            # Only what the notebook has not seen live comes with the result.
            unsent = live.stop() if live is not None else []
        result.streamed = live is not None and live.created
        result.outputs.extend(unsent + recorder.take())
        if self._shipper.enabled:
            self._by_reference(result)
        fit_to_limit(result, RESULT_LIMIT, dropped=recorder.dropped, cache=self._shipper.enabled)
        self._shipper.evict()
        return result

    def _by_reference(self, result: cell.CellResult) -> None:
        """Make room by sending inline values through the cache, so that no value gives way."""
        cap_representation(result, RESULT_LIMIT)
        try:
            if result.ByteSize() > RESULT_LIMIT and len(result.result_pickle) >= 1024:
                pickled = codec.Pickled(result.result_pickle)
                result.result_value.CopyFrom(self._shipper.ship("", pickled, force=True))
                result.ClearField("result_pickle")
            for value in sorted(result.assigned, key=lambda v: v.ByteSize(), reverse=True):
                if result.ByteSize() <= RESULT_LIMIT or len(value.pickle) < 1024:
                    break
                if not value.buffers and not value.HasField("cached_pickle"):
                    value.CopyFrom(self._shipper.ship(value.name, codec.Pickled(value.pickle), force=True))
        except CacheError:
            pass  # fit_to_limit leaves out what still does not fit, and says so

    def shipper(self, access: cell.CacheAccess | None) -> Shipper:
        """How values travel for a cell: through the object cache when the notebook reads it.

        The cache is the one Flame gave this process (``FLAME_CACHE_ENDPOINT``, and its
        storage in ``FLAME_CACHE_STORAGE`` when shared), else the one the notebook names.
        """
        endpoint = os.environ.get("FLAME_CACHE_ENDPOINT") or (access.endpoint if access else "")
        if not endpoint:
            return Shipper(None, None, RUNNER_SIDE)
        prefix = access.key_prefix if access else ""
        if (endpoint, prefix) not in self._shippers:
            if endpoint not in self._caches:
                storage = (
                    os.environ.get("FLAME_CACHE_STORAGE") if os.environ.get("FLAME_CACHE_ENDPOINT") else None
                )
                self._caches[endpoint] = CacheClient(endpoint, os.environ.get("FLAME_CA_FILE"), storage)
            # Without a prefix the notebook cannot read the cache: values come in, none go out.
            self._shippers[(endpoint, prefix)] = Shipper(self._caches[endpoint], prefix or None, RUNNER_SIDE)
        return self._shippers[(endpoint, prefix)]

    @contextmanager
    def _capture(self, recorder: _Recorder) -> Iterator[None]:
        shell = self._shell
        saved = sys.stdout, sys.stderr, (shell.display_pub if shell is not None else None)
        for stream, previous in ((self._stdout, saved[0]), (self._stderr, saved[1])):
            if previous is not stream:
                stream.fallback = previous
            stream.recorder = recorder
        sys.stdout, sys.stderr = self._stdout, self._stderr
        if shell is not None:
            self._publisher.recorder = recorder
            shell.display_pub = self._publisher
        fds = fd_capture()
        if fds is not None:
            fds.start(recorder.write)
            self._stdout.sync = self._stderr.sync = fds.drain
        try:
            yield
        finally:
            try:
                _flush_figures()
            finally:
                if fds is not None:
                    # Everything the cell wrote to fds 1 and 2 is recorded before its result is built.
                    fds.stop()
                    self._stdout.sync = self._stderr.sync = None
                # Restored even if the cell replaced them itself.
                sys.stdout, sys.stderr = saved[0], saved[1]
                self._stdout.recorder = self._stderr.recorder = None
                if shell is not None:
                    shell.display_pub = saved[2]
                    self._publisher.recorder = None

    def _run(self, request: cell.CellRequest, result: cell.CellResult) -> None:
        filename = request.filename or "<flmrun cell>"
        if not self.environment.prepare(request, result, self._shipper):
            return  # refused before anything is unpickled
        loaded = self._load_inputs(request.inputs, result)
        if loaded is None:
            return
        self.namespace.update(loaded)
        assign = list(dict.fromkeys(request.assign))
        before = {name: self.namespace.get(name, _MISSING) for name in assign}
        try:
            with time_limit(request.timeout):
                value, quiet = self._execute(request.source, filename, max(request.first_line, 1))
        except BaseException as exc:  # noqa: B036 - SystemExit and KeyboardInterrupt of a cell are its errors
            result.error.CopyFrom(remote_exception(exc, filename))
            self._failure.keep(exc, result.error, send=request.send_frames)
        else:
            if value is not None and not quiet:
                self._set_result(result, value, values_only=request.values_only)
        self._return_assigned(assign, before, loaded.keys(), result)

    def _load_inputs(self, inputs: Iterable[cell.Value], result: cell.CellResult) -> dict[str, Any] | None:
        loaded: dict[str, Any] = {}
        for value in inputs:
            try:
                loaded[value.name] = self._shipper.load(value)
            except BaseException as exc:  # noqa: B036 - unpickling runs arbitrary code
                result.error.CopyFrom(_input_error(value.name, exc))
                return None
        return loaded

    def _execute(self, source: str, filename: str, first_line: int) -> tuple[Any, bool]:
        """Run ``source``; return the last expression's value and whether a ``;`` hides it."""
        offset = first_line - 1
        lines = source.splitlines(keepends=True)
        # Tracebacks through this cell's code, now or from a later cell, read its lines here;
        # mtime None keeps linecache.checkcache from discarding the entry.
        linecache.cache[filename] = (len(source), None, ["\n"] * offset + lines, filename)
        key = (source, filename, first_line, self._future_flags)
        if self._compiled is not None and self._compiled[0] == key:
            # A --map runs one cell once per item: parse and compile it once.
            body, tail, quiet = self._compiled[1]
            self._run_code(body)
            return (None if tail is None else self._run_code(tail)), quiet
        try:
            tree = ast.parse(source, filename, "exec")
        except SyntaxError as exc:
            if exc.lineno is not None:
                exc.lineno += offset
            if exc.end_lineno is not None:
                exc.end_lineno += offset
            raise
        last: ast.Expression | None = None
        quiet = False
        expr = tree.body[-1] if tree.body else None
        if isinstance(expr, ast.Expr):
            tree.body.pop()
            last = ast.Expression(expr.value)
            quiet = _ends_with_semicolon("".join(lines[expr.lineno - 1 :]))
        ast.increment_lineno(tree, offset)
        # Compile everything before running anything: a bad last line must not half-run the cell.
        # Top-level `await`, as in IPython: such code compiles to a coroutine, run to its end.
        flags = self._future_flags | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        body = compile(tree, filename, "exec", flags=flags, dont_inherit=True)
        self._future_flags |= body.co_flags & _FUTURE_FLAGS
        tail = None
        if last is not None:
            ast.increment_lineno(last, offset)
            flags = self._future_flags | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            tail = compile(last, filename, "eval", flags=flags, dont_inherit=True)
        self._compiled = ((source, filename, first_line, self._future_flags), (body, tail, quiet))
        self._run_code(body)
        if tail is None:
            return None, quiet
        return self._run_code(tail), quiet

    def _run_code(self, code: types.CodeType) -> Any:
        """Run compiled cell code in the namespace; a coroutine (top-level await) on the event loop."""
        outcome = eval(code, self.namespace)
        if not code.co_flags & inspect.CO_COROUTINE:
            return outcome
        # One loop for the process, like IPython's: tasks a cell starts live on for later cells.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        task = self._loop.create_task(outcome)
        try:
            return self._loop.run_until_complete(task)
        except BaseException:
            # Interrupted or timed out while the loop waited: the cell's code stops here too.
            if not task.done():
                task.cancel()
                with suppress(BaseException):
                    self._loop.run_until_complete(task)
            raise

    def _set_result(self, result: cell.CellResult, value: Any, values_only: bool = False) -> None:
        """The last value: its representation (as Jupyter shows it) and the value itself.

        With ``values_only`` (a --map item) the representation, which costs more than the
        pickle of most values, is made only for a value that cannot travel.
        """
        if not values_only:
            self._set_representation(result, value)
        self._set_value(result, value)
        if values_only and not (result.HasField("result_pickle") or result.HasField("result_value")):
            self._set_representation(result, value)

    def _set_representation(self, result: cell.CellResult, value: Any) -> None:
        if self._shell is None:
            result.result.CopyFrom(mime_bundle({"text/plain": _safe_repr(value)}, {}))
            return
        try:
            data, metadata = self._shell.display_formatter.format(value)
        except Exception:
            data, metadata = {"text/plain": _safe_repr(value)}, {}
        # Empty data means the value displayed itself (_ipython_display_): nothing more to show.
        if data:
            if "text/plain" not in data:
                data["text/plain"] = _safe_repr(value)
            result.result.CopyFrom(mime_bundle(data, metadata))

    def _set_value(self, result: cell.CellResult, value: Any) -> None:
        try:
            pickled = self._shipper.pickle(value)
        except Exception:
            return  # the repr still shows
        if self._shipper.enabled:
            try:
                shipped = self._shipper.ship("", pickled)
            except CacheError:
                return  # the repr still shows
            if shipped.buffers or shipped.HasField("cached_pickle"):
                result.result_value.CopyFrom(shipped)
                return
        if len(pickled.pickle) <= RESULT_LIMIT and not pickled.buffers:
            result.result_pickle = pickled.pickle

    def _return_assigned(
        self,
        names: list[str],
        before: dict[str, Any],
        inputs: Iterable[str],
        result: cell.CellResult,
    ) -> None:
        # A name is returned if the cell bound it (a new object), or if it came in as an
        # input (`x += [1]` keeps the object). A value left over from an earlier cell that
        # this one did not touch is not sent back over the notebook's newer value.
        inputs = set(inputs)
        outgoing = []
        for name in names:
            value = self.namespace.get(name, _MISSING)
            if value is _MISSING or (value is before[name] and name not in inputs):
                continue
            try:
                pickled = self._shipper.pickle(value)
            except codec.UnpicklableError as exc:
                result.not_returned.add(name=name, reason=_clean(str(exc)))
                continue
            except BaseException as exc:  # noqa: B036 - a reducer may raise anything
                result.not_returned.add(name=name, reason=_clean(f"{_ename(exc)}: {_str(exc)}"))
                continue
            if not self._shipper.enabled and len(pickled.pickle) > RESULT_LIMIT:
                result.not_returned.add(name=name, reason=_too_large(len(pickled.pickle), alone=True))
            else:
                outgoing.append(Outgoing(name, pickled))
        try:
            result.assigned.extend(self._shipper.ship_all(outgoing, INLINE_BUDGET))
        except CacheError as exc:
            reason = _clean(f"Flame's object cache could not take it: {exc}")
            for item in outgoing:
                result.not_returned.add(name=item.name, reason=reason)


def _flush_figures() -> None:
    """Show the cell's matplotlib figures as PNG displays and close them, as a local cell does."""
    backend = sys.modules.get("matplotlib_inline.backend_inline")
    if backend is None:
        return
    try:
        backend.flush_figures()
    except Exception as exc:
        sys.stderr.write(f"matplotlib figures could not be shown: {_ename(exc)}: {_str(exc)}\n")


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the cell after ``seconds`` (0: no limit).

    On the main thread (flame-magic's runner) an interval timer's SIGALRM interrupts even a
    blocking call such as ``time.sleep``. Elsewhere (flamepy's runner calls cells on a gRPC
    worker thread, and signals reach only the main thread) a watchdog thread raises it
    asynchronously, which takes effect at the cell's next Python instruction; a cell blocked
    in one long C call for :data:`HARD_STOP_GRACE` seconds more has its process stopped.
    """
    if seconds <= 0:
        yield
        return
    message = (
        f"the cell ran longer than its {seconds:g} s timeout and was stopped "
        "(%%flmrun --timeout SECONDS, or %config FlameMagics.timeout)"
    )
    if threading.current_thread() is not threading.main_thread():
        with _watchdog(seconds, _timeout_error(message)):
            yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Seconds a cell that ignores its timeout on a worker thread gets before its process exits.
HARD_STOP_GRACE = 5.0


def _timeout_error(message: str) -> type[BaseException]:
    """A TimeoutError raised without arguments (as asynchronous exceptions are) that says ``message``."""

    class CellTimeout(TimeoutError):
        def __init__(self, *args: object) -> None:
            super().__init__(*(args or (message,)))

    # Shown, and mirrored in the notebook, as the builtin it is.
    CellTimeout.__module__ = "builtins"
    CellTimeout.__name__ = CellTimeout.__qualname__ = "TimeoutError"
    return CellTimeout


@contextmanager
def _watchdog(seconds: float, error: type[BaseException]) -> Iterator[None]:
    ident = threading.get_ident()
    lock = threading.Lock()
    done = threading.Event()
    state = {"running": True, "fired": False}

    def watch() -> None:
        if done.wait(seconds):
            return
        with lock:
            if not state["running"]:
                return
            state["fired"] = True
            raise_in_thread(ident, error)
        if done.wait(HARD_STOP_GRACE):
            return
        os.write(2, f"flame-magic: the cell ignored its {seconds:g} s timeout; exiting\n".encode())
        os._exit(3)

    threading.Thread(target=watch, name="flmrun-timeout", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            state["running"] = False
            if state["fired"]:
                raise_in_thread(ident, None)  # not raised yet: the cell ended first
        done.set()


def remote_exception(exc: BaseException, filename: str) -> cell.RemoteException:
    """Describe an exception raised by a cell as Python would print it.

    The runner's own frames are removed, so the traceback starts at the cell's frame
    and shows none of the runner's signal handlers (interrupt, timeout); chained
    exceptions are kept.

    Parameters
    ----------
    exc
        The exception the cell raised.
    filename
        The cell's filename: frames before its first frame are the runner's.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    # No cell frame at all: the source never ran (a SyntaxError), so show no frames.
    exc.__traceback__ = tb
    _drop_runner_frames(exc)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"{_ename(exc)}: {_str(exc)}\n"
    return cell.RemoteException(
        ename=_clean(_ename(exc)),
        evalue=_clean(_str(exc)),
        traceback=_clean(text),
        builtin_bases=_builtin_bases(exc),
    )


# The runner's own modules, by name: also when they travel as source (no files, a private package).
_RUNNER_PACKAGE = __name__.rpartition(".")[0] + "."


def _drop_runner_frames(exc: BaseException) -> None:
    """Unlink the frames of the runner's own files from ``exc``'s traceback and its chain's."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        kept = []
        tb = current.__traceback__
        while tb is not None:
            if not str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_RUNNER_PACKAGE):
                kept.append(tb)
            tb = tb.tb_next
        for entry, following in zip(kept, [*kept[1:], None]):  # noqa: B905 - one longer when kept is empty
            entry.tb_next = following
        current.__traceback__ = kept[0] if kept else None
        pending += [current.__cause__, current.__context__]


def _builtin_bases(exc: BaseException) -> list[str]:
    """The builtin exception classes an exception's class derives from, most derived first."""
    return [
        base.__name__
        for base in type(exc).__mro__[1:]
        if getattr(builtins, base.__name__, None) is base and base not in (BaseException, Exception, object)
    ]


def _input_error(name: str, exc: BaseException) -> cell.RemoteException:
    """The error for a notebook value that does not unpickle on the executor."""
    evalue = f"{_str(exc)} (while loading the notebook's value {name!r} on the executor)"
    if isinstance(exc, ImportError):
        evalue += " — install it on the executor"
    elif isinstance(exc, AttributeError):
        evalue += " — the executor may have another version of the library that defines it"
    ename = _ename(exc)
    text = f"Could not load the notebook's value {name!r} on the executor.\n{ename}: {evalue}\n"
    return cell.RemoteException(ename=ename, evalue=_clean(evalue), traceback=_clean(text))


def mime_bundle(data: dict[str, Any], metadata: dict[str, Any] | None) -> cell.MimeBundle:
    """A display bundle as JSON text; bytes (e.g. PNG data) become base64, as Jupyter sends them."""
    return cell.MimeBundle(
        data_json=json.dumps(data, default=_json_default),
        metadata_json=json.dumps(metadata or {}, default=_json_default),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return _safe_repr(value)


def fit_to_limit(
    result: cell.CellResult, limit: int = RESULT_LIMIT, dropped: int = 0, cache: bool = False
) -> None:
    """Shrink ``result`` until its encoding fits in ``limit`` bytes.

    In order: drop the last expression's pickle (its repr still shows), then the largest
    assigned values (each reported in ``not_returned``), then the tail of the printed
    text (the start is kept, with a note), then the largest rich displays, the result's
    representation and the traceback's head.

    Parameters
    ----------
    result
        The result to shrink in place.
    limit
        Maximum encoded size in bytes.
    dropped
        Bytes of printed text already left out while recording.
    cache
        Whether large values could have gone through the object cache (the notes then do
        not suggest configuring one).
    """
    reserve = _NOTICE_ROOM if dropped else 0
    if result.ByteSize() + reserve > limit and result.error.HasField("frames"):
        result.error.ClearField("frames")  # %debug then asks the runner, which kept them
    if cache:
        # Values went by reference and take little room: what is shown gives way first.
        cap_representation(result, limit - reserve)
    else:
        _drop_values(result, limit - reserve, cache)
    excess = result.ByteSize() + _NOTICE_ROOM - limit
    if excess > 0:
        dropped += _cut_streams(result, excess)
    if dropped:
        _add_notice(result, f"[output truncated: {dropped} bytes more]")
    while result.ByteSize() > limit and _drop_largest_display(result):
        pass
    if result.ByteSize() > limit and result.HasField("result"):
        size = result.result.ByteSize()
        shown = f"[result not shown: its representation, {_size(size)}, {_OVER}]"
        result.result.CopyFrom(_placeholder(shown))
    if result.ByteSize() > limit and result.HasField("error"):
        error = result.error
        error.evalue = _clip(error.evalue, 4096)
        error.traceback = _clip(error.traceback, 64 * 1024, keep_end=True)
    if cache:
        _drop_values(result, limit, cache)
    if result.ByteSize() > limit:
        del result.outputs[:]
        result.outputs.add(stream=cell.Stream(name="stderr", text=f"[all output dropped: {_OVER}]\n"))


def _drop_values(result: cell.CellResult, limit: int, cache: bool) -> None:
    """Leave out the last expression's pickle (its repr still shows), then the largest assigned values."""
    if result.ByteSize() > limit:
        result.ClearField("result_pickle")
    while result.ByteSize() > limit and len(result.assigned) > 0:
        index = max(range(len(result.assigned)), key=lambda i: result.assigned[i].ByteSize())
        value = result.assigned[index]
        alone = value.ByteSize() + _NOTICE_ROOM > limit
        reason = _too_large(value_size(value), alone=alone, cache=cache)
        result.not_returned.add(name=value.name, reason=reason)
        del result.assigned[index]


def cap_representation(result: cell.CellResult, limit: int) -> None:
    """Cut the last expression's shown form so that ``result`` fits in ``limit`` bytes.

    Only its plain text is kept, its start, with a note that states the true sizes; the
    value itself (``result_pickle``, ``result_value``) is not touched.
    """
    if result.ByteSize() <= limit or not result.HasField("result"):
        return
    bundle = result.result
    total = bundle.ByteSize()
    try:
        text = str(json.loads(bundle.data_json).get("text/plain", ""))
    except (ValueError, AttributeError):
        text = ""
    came_back = result.HasField("result_pickle") or result.HasField("result_value")
    value_note = "the value itself came back" if came_back else "the value did not travel"
    room = limit - (result.ByteSize() - total) - _NOTICE_ROOM
    keep = max(0, room // 2)
    while True:
        shown = text[:keep]
        note = (
            f"[representation cut: showing {_size(_utf8_len(shown))} of its {_size(total)}, "
            f"{_OVER}; {value_note}]"
        )
        bundle.CopyFrom(_placeholder(f"{shown}\n{note}" if shown else note))
        if result.ByteSize() <= limit or keep == 0:
            return
        keep //= 2


def value_size(value: cell.Value) -> int:
    """The true size of a value in bytes: its pickle and its buffers, inline or in the cache."""
    size = len(value.pickle) + sum(blob.size for blob in value.buffers)
    if value.HasField("cached_pickle"):
        size += value.cached_pickle.size
    return size


_OVER = "over Flame's 4 MiB task limit"


def _too_large(size: int, *, alone: bool, cache: bool = False) -> str:
    where = "it is still defined in this session's runner, for later %%flmrun cells"
    if not cache:
        where += f"; to bring large values back, {CACHE_HINT}"
    if alone:
        return f"{_size(size)} is {_OVER}; {where}"
    return f"{_size(size)} did not fit in Flame's 4 MiB task limit with the cell's other results; {where}"


def _cut_streams(result: cell.CellResult, excess: int) -> int:
    """Remove at least ``excess`` bytes from the end of the printed text; return how many."""
    removed = 0
    for index in reversed(range(len(result.outputs))):
        if removed >= excess:
            break
        output = result.outputs[index]
        if not output.HasField("stream"):
            continue
        data = output.stream.text.encode("utf-8")
        need = excess - removed
        if len(data) <= need:
            removed += len(data)
            del result.outputs[index]
        else:
            kept = data[: len(data) - need].decode("utf-8", "ignore")
            removed += len(data) - _utf8_len(kept)
            output.stream.text = kept
    return removed


def _add_notice(result: cell.CellResult, notice: str) -> None:
    for output in reversed(result.outputs):
        if output.HasField("stream"):
            text = output.stream.text
            separator = "\n" if text and not text.endswith("\n") else ""
            output.stream.text = f"{text}{separator}{notice}\n"
            return
    result.outputs.add(stream=cell.Stream(name="stderr", text=f"{notice}\n"))


def _drop_largest_display(result: cell.CellResult) -> bool:
    sizes = [
        (output.display.ByteSize(), index)
        for index, output in enumerate(result.outputs)
        if output.HasField("display")
    ]
    if not sizes:
        return False
    size, index = max(sizes)
    if size <= 1024:
        return False
    result.outputs[index].display.CopyFrom(_placeholder(f"[display not shown: {_size(size)}, {_OVER}]"))
    return True


def _placeholder(text: str) -> cell.MimeBundle:
    return cell.MimeBundle(data_json=json.dumps({"text/plain": text}), metadata_json="{}")


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    note = f"[... {len(text) - limit} characters cut ...]"
    return note + "\n" + text[-limit:] if keep_end else text[:limit] + note


def _size(size: int) -> str:
    """``size`` bytes for a reader: "208 bytes", "12.5 KiB", "4.3 MiB"."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"


def _ends_with_semicolon(source: str) -> bool:
    """Whether the last statement ends with ``;``: IPython then shows no value."""
    skip = {tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.DEDENT}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    for token in reversed(tokens):
        if token.type not in skip:
            return token.type == tokenize.OP and token.string == ";"
    return False


def _ename(exc: BaseException) -> str:
    kind = type(exc)
    module = getattr(kind, "__module__", None)
    # As Python prints it: builtins and the cell's own classes need no module.
    if module in (None, "builtins", "__main__"):
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: B036 - a broken __str__ must not break the report
        return f"<{type(exc).__name__}: str() failed>"


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except BaseException:  # noqa: B036 - a broken __repr__ must not break the report
        return f"<{type(value).__name__} object: repr() failed>"


def _clean(text: str) -> str:
    """``text`` as valid UTF-8 (protobuf refuses lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


_default: Evaluator | None = None


def default_evaluator() -> Evaluator:
    """The process's evaluator, created on first use."""
    global _default
    if _default is None:
        _default = Evaluator()
    return _default


def prepare() -> None:
    """Warm up the process's evaluator (imports IPython) before the first cell arrives."""
    from .live import warm

    warm()
    default_evaluator().prepare()


def evaluate(request: cell.CellRequest) -> cell.CellResult:
    """Run one cell in the process's persistent namespace; see :meth:`Evaluator.evaluate`."""
    return default_evaluator().evaluate(request)
