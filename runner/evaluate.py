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

Values and size
    The notebook's values come in, and the cell's go back, through
    :mod:`flame_magic_runner.values` (inline, or through Flame's object cache by reference);
    :mod:`flame_magic_runner.limits` fits the result in Flame's 4 MiB task limit. Neither
    calls back into this module.
"""

from __future__ import annotations
import __future__

import ast
import asyncio
import builtins
import importlib.util
import inspect
import io
import linecache
import os
import sys
import tokenize
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from flame_magic import codec
from flame_magic.protocol import cell

from .debug import FailureKeeper
from .environment import Environment
from .exceptions import remote_exception
from .fdcapture import fd_capture
from .limits import RESULT_LIMIT
from .recording import Recorder, Stream, flush_figures, make_publisher, mime_bundle
from .text import safe_repr
from .timeout import time_limit
from .values import Traffic

__all__ = ["Evaluator", "default_evaluator", "evaluate", "prepare", "remote_exception", "time_limit"]

# matplotlib's backend for cells, as ipykernel sets it: figures become PNG displays.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag

_MISSING = object()
# Bytes a batch's result spends around each item's own (its field's tag and length).
_ITEM_ENVELOPE = 16


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
        self._stdout = Stream("stdout", sys.stdout)
        self._stderr = Stream("stderr", sys.stderr)
        self._traffic = Traffic()  # the cells' values, in and out
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
        self._publisher = make_publisher(shell)
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
        if len(request.items) > 0:
            return self._evaluate_batch(request)
        return self._evaluate_one(request, RESULT_LIMIT)

    def _evaluate_batch(self, request: cell.CellRequest) -> cell.CellResult:
        """Run a --map batch: the cell once per item, in order; one result per item run.

        The items share the task's output: each may take what the items before it left,
        less a reserve for each item after it (half the task's room, shared among them), so
        that an item that shows a lot is cut only when the batch is full. With
        ``stop_at_error`` a failed item ends the batch.
        """
        batch = cell.CellResult(header=codec.local_header())
        items = list(request.items)
        request.ClearField("items")
        shared = len(request.inputs)
        reserve = RESULT_LIMIT // (2 * len(items))
        for position, item in enumerate(items):
            del request.inputs[shared:]
            request.inputs.append(item.value)
            request.channel = item.channel
            after = len(items) - position - 1
            room = RESULT_LIMIT - batch.ByteSize() - after * reserve - _ITEM_ENVELOPE
            result = self._evaluate_one(request, room)
            result.ClearField("header")
            batch.items.append(result)
            if request.stop_at_error and result.HasField("error"):
                break
        return batch

    def _evaluate_one(self, request: cell.CellRequest, limit: int) -> cell.CellResult:
        """Run one cell; its result fitted in ``limit`` bytes."""
        self._failure.clear()
        self.prepare()
        result = cell.CellResult(header=codec.local_header())
        recorder = Recorder(limit)
        self._traffic.begin(request)
        live = self._traffic.live(request.channel, recorder.take)
        if live is not None:
            live.start()
        try:
            with self._capture(recorder):
                self._run(request, result)
        finally:
            # Only what the notebook has not seen live comes with the result.
            unsent = live.stop() if live is not None else []
        result.streamed = live is not None and live.created
        result.outputs.extend(unsent + recorder.take())
        self._traffic.finish(result, recorder.dropped, limit)
        return result

    @contextmanager
    def _capture(self, recorder: Recorder) -> Iterator[None]:
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
                flush_figures()
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
        if not self.environment.prepare(request, result, self._traffic.shipper):
            return  # refused before anything is unpickled
        loaded = self._traffic.inputs(request.inputs, result)
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
            quiet = ends_with_semicolon("".join(lines[expr.lineno - 1 :]))
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
        self._traffic.last_value(result, value)
        if values_only and not result.HasField("value"):
            self._set_representation(result, value)

    def _set_representation(self, result: cell.CellResult, value: Any) -> None:
        if self._shell is None:
            result.result.CopyFrom(mime_bundle({"text/plain": safe_repr(value)}, {}))
            return
        try:
            data, metadata = self._shell.display_formatter.format(value)
        except Exception:
            data, metadata = {"text/plain": safe_repr(value)}, {}
        # Empty data means the value displayed itself (_ipython_display_): nothing more to show.
        if data:
            if "text/plain" not in data:
                data["text/plain"] = safe_repr(value)
            result.result.CopyFrom(mime_bundle(data, metadata))

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
        bound = {}
        for name in names:
            value = self.namespace.get(name, _MISSING)
            if value is not _MISSING and (value is not before[name] or name in inputs):
                bound[name] = value
        self._traffic.assigned(bound, result)


def ends_with_semicolon(source: str) -> bool:
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
