"""A failed cell's frames: kept and described by the runner, rebuilt as frames in the notebook.

The runner's side runs real cells in a real :class:`Evaluator`; the notebook's side rebuilds
what it sent, and the tests read the rebuilt frames as pdb does (``f_locals``, ``f_code``,
the traceback's line numbers). The real debugger, through a kernel, is in
``tests/integration/test_debug.py``.
"""

from __future__ import annotations

import linecache
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from flame_magic import codec, debugger
from flame_magic.errors import RemoteError
from flame_magic.protocol import cell
from flame_magic.sessions import SessionKey
from flame_magic_runner import debug
from flame_magic_runner.evaluate import Evaluator
from flame_magic_runner.limits import fit_to_limit

FILENAME = "<flmrun-cell-9>"
CELL = """import threading

def inner(n, *rest, scale=1):
    note = "inner-" + str(n)
    lock = threading.Lock()
    blob = b"x" * (3 * 1024 * 1024)
    return n / 0

total = 40 + 2
(lambda value: inner(value))(total)
"""


@pytest.fixture
def evaluator() -> Iterator[Evaluator]:
    ev = Evaluator()
    yield ev
    ev.close()


def request(source: str = CELL, **fields) -> cell.CellRequest:
    header = codec.local_header()
    return cell.CellRequest(header=header, source=source, filename=FILENAME, first_line=2, **fields)


def fetch(ev: Evaluator, debug_id: str) -> cell.DebugFrames:
    answer = ev.evaluate(cell.CellRequest(header=codec.local_header(), debug_fetch=debug_id))
    assert not answer.HasField("error") and not answer.outputs
    return answer.debug


def locals_of(frame: cell.Frame) -> dict[str, cell.FrameLocal]:
    return {local.name: local for local in frame.locals}


def test_a_failed_cell_keeps_its_frames_until_the_next_cell(evaluator):
    result = evaluator.evaluate(request())
    assert result.error.ename == "ZeroDivisionError"
    assert result.error.debug_id and not result.error.HasField("frames")  # nothing sent unasked
    frames = fetch(evaluator, result.error.debug_id)
    assert not frames.missing
    shape = [(f.function, f.lineno) for f in frames.frames]
    assert shape == [("<module>", 11), ("<lambda>", 11), ("inner", 8)]
    assert fetch(evaluator, result.error.debug_id).frames  # asking twice works
    assert "another cell" in fetch(evaluator, "not-that-one").missing
    evaluator.evaluate(request("1 + 1"))
    assert "ran another cell since" in fetch(evaluator, result.error.debug_id).missing


def test_frames_describe_place_source_and_locals(evaluator):
    result = evaluator.evaluate(request())
    module, _, inner = fetch(evaluator, result.error.debug_id).frames
    assert module.module and module.cell_globals and module.filename == FILENAME
    assert inner.cell_globals and not inner.module
    assert list(inner.args) == ["n", "scale", "rest"] and inner.first_lineno == 4
    values = locals_of(inner)
    assert codec.loads(values["n"].pickle) == 42 and codec.loads(values["note"].pickle) == "inner-42"
    assert values["lock"].repr.startswith("<unlocked _thread.lock") and "lock" in values["lock"].unpicklable
    # Over the frame's 1 MiB: its repr (bounded), and why.
    assert not values["blob"].pickle and "not sent" in values["blob"].too_large
    assert len(values["blob"].repr) <= debug.REPR_LIMIT
    assert codec.loads(locals_of(module)["total"].pickle) == 42
    assert "__builtins__" not in locals_of(module)


def test_the_cells_own_lines_travel_with_the_frames(evaluator):
    result = evaluator.evaluate(request())
    frames = fetch(evaluator, result.error.debug_id)
    (source,) = [s for s in frames.sources if s.filename == FILENAME]
    lines = [""] * (source.first_line - 1) + list(source.lines)
    assert lines[7].strip() == "return n / 0"  # line 8: the body starts on line 2


def test_send_frames_puts_a_capped_snapshot_in_the_error(evaluator):
    result = evaluator.evaluate(request(send_frames=True))
    frames = result.error.frames
    assert [f.function for f in frames.frames] == ["<module>", "<lambda>", "inner"]
    assert frames.ByteSize() < debug.SNAPSHOT_BUDGET + 64 * 1024


def test_a_timeout_shows_the_cells_frame_not_the_runners_handler(evaluator):
    result = evaluator.evaluate(request("import time\nwaited = 'yes'\ntime.sleep(60)", timeout=0.3))
    assert result.error.ename == "TimeoutError"
    frames = fetch(evaluator, result.error.debug_id)
    assert [f.function for f in frames.frames] == ["<module>"]


def test_a_syntax_error_keeps_no_frames(evaluator):
    result = evaluator.evaluate(request("def broken(:\n"))
    assert result.error.ename == "SyntaxError" and not result.error.debug_id


def test_a_result_over_the_limit_drops_the_frames_first(evaluator):
    result = evaluator.evaluate(request(send_frames=True))
    result.outputs.add(stream=cell.Stream(name="stdout", text="kept\n"))
    fit_to_limit(result, limit=result.ByteSize() - 10)
    assert not result.error.HasField("frames") and result.error.debug_id
    assert result.outputs[-1].stream.text == "kept\n"


def test_rebuilt_frames_are_genuine_frames_with_the_remote_locals(evaluator):
    result = evaluator.evaluate(request())
    frames = cell.DebugFrames.FromString(fetch(evaluator, result.error.debug_id).SerializeToString())
    linecache.cache.pop(FILENAME, None)  # the notebook has not seen this cell's lines
    tb = debugger.build_traceback(frames)
    shape = []
    while tb is not None:
        shape.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    assert [(f.f_code.co_filename, f.f_code.co_name, line) for f, line in shape] == [
        (FILENAME, "<module>", 11),
        (FILENAME, "<lambda>", 11),
        (FILENAME, "inner", 8),
    ]
    module, _, inner = (frame for frame, _ in shape)
    assert module.f_locals is module.f_globals and module.f_globals["total"] == 42
    assert inner.f_globals is module.f_globals  # a function of the cell sees the cell's names
    assert set(inner.f_locals) == {"n", "rest", "scale", "note", "lock", "blob"}  # nothing of ours
    assert inner.f_locals["n"] == 42 and inner.f_code.co_firstlineno == 4
    assert inner.f_code.co_varnames[: inner.f_code.co_argcount] == ("n", "scale", "rest")
    assert repr(inner.f_locals["lock"]).startswith("<unlocked _thread.lock")
    assert "not sent" in repr(inner.f_locals["blob"])
    with pytest.raises(AttributeError, match="only the repr"):
        inner.f_locals["lock"].acquire()
    assert linecache.getline(FILENAME, 8).strip() == "return n / 0"


def test_a_value_that_does_not_load_here_shows_why():
    frame = cell.Frame(filename="<x>", function="f", lineno=3, first_lineno=1)
    frame.locals.add(name="odd", pickle=b"not a pickle")
    tb = debugger.build_traceback(cell.DebugFrames(frames=[frame]))
    assert "cannot be loaded here" in repr(tb.tb_frame.f_locals["odd"])


def test_the_error_carries_a_way_to_its_frames():
    asked = []

    def ask(debug_id: str) -> cell.DebugFrames:
        asked.append(debug_id)
        return cell.DebugFrames(missing="gone")

    error = debugger.remote_failure(cell.RemoteException(ename="KeyError", evalue="'k'", debug_id="d1"), ask)
    assert isinstance(error, KeyError) and isinstance(error, RemoteError)
    assert debugger._failures[error].fetch is not None
    debugger._failures[error].fetch()
    assert asked == ["d1"]
    plain = debugger.remote_failure(cell.RemoteException(ename="KeyError", evalue="'k'"))
    assert plain not in debugger._failures  # no frames and no way to them: a plain error


@pytest.mark.parametrize(
    ("options", "call_pdb", "expected"),
    [
        ({}, False, False),  # the runner keeps them until %debug asks
        ({}, True, True),  # %pdb on: the debugger opens at once
        ({"item": "x"}, False, True),  # a map's session closes when an item fails
        ({"item": "x", "return_exceptions": True}, False, False),
        ({"background": "job"}, False, True),
        ({"key": SessionKey(name="big", instances=4)}, False, True),  # %debug may reach another runner
    ],
)
def test_when_frames_come_with_the_error(options, call_pdb, expected):
    plan = SimpleNamespace(
        **{"key": SessionKey(), "item": None, "return_exceptions": False, "background": None, **options}
    )
    assert debugger.frames_with_error(plan, call_pdb) is expected  # type: ignore[arg-type]


def test_install_wraps_the_shells_debugger_once_and_uninstall_restores_it():
    calls = []

    class Shell:
        call_pdb = False

        def debugger(self, force: bool = False) -> None:
            calls.append(force)

    shell = Shell()
    debugger.install(shell)
    debugger.install(shell)
    saved = getattr(sys, "last_value", None)
    sys.last_value = ValueError("a local error")
    try:
        shell.debugger(force=True)
    finally:
        sys.last_value = saved
    assert calls == [True]  # a local error goes straight to IPython's debugger
    debugger.uninstall(shell)
    assert "debugger" not in vars(shell)


def test_a_deep_recursion_sends_its_outer_and_inner_frames(evaluator):
    result = evaluator.evaluate(request("def down(n):\n    return down(n + 1)\n\ndown(0)"))
    assert result.error.ename == "RecursionError"
    frames = fetch(evaluator, result.error.debug_id)
    assert len(frames.frames) == debug.MAX_FRAMES and frames.left_out > 0
    assert frames.frames[0].function == "<module>" and frames.frames[-1].function == "down"
    tb = debugger.build_traceback(frames)  # deep, but within the notebook's recursion limit
    depth = 0
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth == debug.MAX_FRAMES


def test_a_large_files_lines_come_as_a_window_around_its_frames(evaluator, tmp_path, monkeypatch):
    module = tmp_path / "bigmodule.py"
    filler = "".join(f"x{i} = {i}  # {'.' * 60}\n" for i in range(6000))  # about 450 KiB
    module.write_text(filler + "def fail(v):\n    return v / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = evaluator.evaluate(request("import bigmodule\nbigmodule.fail(1)"))
    frames = fetch(evaluator, result.error.debug_id)
    (window,) = [s for s in frames.sources if s.filename == str(module)]
    assert window.first_line == 6001 and window.lines[1].strip() == "return v / 0"
    sys.modules.pop("bigmodule", None)


def test_a_notebook_function_gets_back_the_file_it_was_defined_in():
    namespace: dict = {}
    exec(
        compile(
            "def helper(v):\n    return v / 0\n\nclass Box:\n    def get(self):\n        return 1\n",
            "<cell-4>",
            "exec",
        ),
        namespace,
    )
    for value in namespace.values():
        if hasattr(value, "__module__"):
            value.__module__ = "__main__"  # as the notebook's own are
    frames = cell.DebugFrames()
    frames.frames.add(filename=debugger.DYNAMIC, function="get", lineno=6, first_lineno=5)
    frames.frames.add(filename=debugger.DYNAMIC, function="helper", lineno=2, first_lineno=1)
    tb = debugger.build_traceback(frames, namespace)
    assert tb.tb_frame.f_code.co_filename == "<cell-4>"  # a method
    assert tb.tb_next.tb_frame.f_code.co_filename == "<cell-4>"
    unknown = cell.DebugFrames()
    unknown.frames.add(filename=debugger.DYNAMIC, function="gone", lineno=2, first_lineno=1)
    assert debugger.build_traceback(unknown, namespace).tb_frame.f_code.co_filename == debugger.DYNAMIC
