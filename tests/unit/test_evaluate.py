"""The runner's evaluation of a cell: what the notebook gets back for what the cell did."""

from __future__ import annotations

import base64
import json
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from flame_magic import codec
from flame_magic.protocol import MAX_MESSAGE_BYTES, cell
from flame_magic.wire import PAYLOAD_LIMIT
from flame_magic_runner.evaluate import Evaluator

MiB = 1024 * 1024


@pytest.fixture
def evaluator() -> Iterator[Evaluator]:
    ev = Evaluator()
    yield ev
    ev.close()


def run(
    ev: Evaluator,
    source: str,
    *,
    inputs: dict[str, Any] | None = None,
    assign: tuple[str, ...] = (),
    filename: str = "<flmrun cell 1>",
    first_line: int = 1,
) -> cell.CellResult:
    request = cell.CellRequest(
        header=codec.local_header(),
        source=source,
        filename=filename,
        first_line=first_line,
        assign=list(assign),
    )
    for name, value in (inputs or {}).items():
        request.inputs.add(name=name, pickle=codec.dumps(value))
    return ev.evaluate(request)


def shown(result: cell.CellResult) -> list[tuple[str, Any]]:
    """The outputs as (stream name, text) or ("display", mime data)."""
    out: list[tuple[str, Any]] = []
    for output in result.outputs:
        if output.HasField("stream"):
            out.append((output.stream.name, output.stream.text))
        else:
            out.append(("display", json.loads(output.display.data_json)))
    return out


def plain(result: cell.CellResult) -> str:
    return json.loads(result.result.data_json)["text/plain"]  # type: ignore[no-any-return]


def assigned(result: cell.CellResult) -> dict[str, Any]:
    return {value.name: codec.loads(value.pickle) for value in result.assigned}


def not_returned(result: cell.CellResult) -> dict[str, str]:
    return {entry.name: entry.reason for entry in result.not_returned}


def test_last_expression_is_the_result(evaluator: Evaluator) -> None:
    result = run(evaluator, "x = 20\nx * 2 + 2")

    assert not result.HasField("error")
    assert plain(result) == "42"
    assert codec.loads(result.value.pickle) == 42
    assert shown(result) == []


def test_trailing_semicolon_or_none_shows_no_result(evaluator: Evaluator) -> None:
    assert not run(evaluator, "1 + 1;  # quiet").HasField("result")
    assert not run(evaluator, "None").HasField("result")
    assert not run(evaluator, "x = 1").HasField("result")


def test_prints_and_displays_keep_their_order(evaluator: Evaluator) -> None:
    stdout = sys.stdout
    source = (
        "import sys\n"
        "from IPython.display import HTML, display\n"
        "print('one')\n"
        "print('two')\n"
        "display(HTML('<b>three</b>'))\n"
        "print('four', file=sys.stderr)\n"
        "print('five')\n"
    )

    outputs = shown(run(evaluator, source))

    assert [kind for kind, _ in outputs] == ["stdout", "display", "stderr", "stdout"]
    assert outputs[0][1] == "one\ntwo\n"
    assert outputs[1][1]["text/html"] == "<b>three</b>"
    assert "text/plain" in outputs[1][1]
    assert outputs[2][1] == "four\n"
    assert outputs[3][1] == "five\n"
    assert sys.stdout is stdout


def test_binary_display_data_travels_as_base64(evaluator: Evaluator) -> None:
    source = (
        "class Picture:\n"
        "    def _repr_png_(self):\n"
        "        return b'\\x89PNG-ish'\n"
        "from IPython.display import display\n"
        "display(Picture())\n"
    )

    [(kind, data)] = shown(run(evaluator, source))

    assert kind == "display"
    assert data["image/png"] == "iVBORy1pc2g="


def test_assigned_names_come_back_and_unpicklable_ones_are_reported(evaluator: Evaluator) -> None:
    source = "import threading\nx = [1, 2]\nlock = threading.Lock()\n"

    result = run(evaluator, source, assign=("x", "lock", "never_bound"))

    assert assigned(result) == {"x": [1, 2]}
    assert not_returned(result) == {"lock": "cannot pickle '_thread.lock' object"}


def test_only_names_the_cell_bound_come_back(evaluator: Evaluator) -> None:
    run(evaluator, "x = 1\nitems = [1]", assign=("x", "items"))

    # x was not rebound: the notebook's own x must not be overwritten by this runner's old one.
    untouched = run(evaluator, "if False:\n    x = 2", assign=("x",))
    # An input changed in place by augmented assignment is the same object, and comes back.
    grown = run(evaluator, "items += [2]", inputs={"items": [1]}, assign=("items",))

    assert assigned(untouched) == {}
    assert assigned(grown) == {"items": [1, 2]}


def test_exception_traceback_shows_the_cells_own_line(evaluator: Evaluator) -> None:
    source = "a = 1\nb = 0\na / b\n"

    result = run(evaluator, source, filename="<flmrun cell 7>", first_line=3)

    error = result.error
    assert (error.ename, error.evalue) == ("ZeroDivisionError", "division by zero")
    lines = error.traceback.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    # The runner's own frames are gone: the first frame is the cell's.
    assert lines[1] == '  File "<flmrun cell 7>", line 5, in <module>'
    assert lines[2].strip() == "a / b"
    assert lines[-1] == "ZeroDivisionError: division by zero"
    assert "runner" not in error.traceback


def test_error_in_a_function_from_an_earlier_cell_shows_both_cells(evaluator: Evaluator) -> None:
    run(evaluator, "def boom():\n    raise ValueError('inner')", filename="<cell 1>", first_line=2)

    result = run(evaluator, "x = 1\nboom()", filename="<cell 2>", first_line=2)

    trace = result.error.traceback
    assert '"<cell 2>", line 3, in <module>' in trace
    assert '"<cell 1>", line 3, in boom' in trace
    assert "raise ValueError('inner')" in trace


def test_chained_exceptions_are_kept(evaluator: Evaluator) -> None:
    source = "try:\n    {}['key']\nexcept KeyError as exc:\n    raise ValueError('bad value') from exc\n"

    error = run(evaluator, source).error

    assert (error.ename, error.evalue) == ("ValueError", "bad value")
    assert "KeyError: 'key'" in error.traceback
    assert "The above exception was the direct cause of the following exception:" in error.traceback
    assert error.traceback.rstrip().endswith("ValueError: bad value")


def test_exception_names_outside_builtins_are_qualified(evaluator: Evaluator) -> None:
    error = run(evaluator, "import json\njson.loads('{')").error

    assert error.ename == "json.decoder.JSONDecodeError"


def test_what_was_assigned_before_an_error_comes_back(evaluator: Evaluator) -> None:
    result = run(evaluator, "x = 1\nraise RuntimeError('late')\ny = 2", assign=("x", "y"))

    assert result.error.ename == "RuntimeError"
    assert assigned(result) == {"x": 1}


def test_syntax_error_points_at_the_cell_line(evaluator: Evaluator) -> None:
    error = run(evaluator, "x = 1\ny = (\n", filename="<flmrun cell 3>", first_line=4).error

    assert error.ename == "SyntaxError"
    assert '"<flmrun cell 3>", line 5' in error.traceback
    assert "Traceback" not in error.traceback  # nothing ran


def test_namespace_persists_between_cells(evaluator: Evaluator) -> None:
    run(evaluator, "import math\nradius = 2")

    result = run(evaluator, "math.sqrt(16) + radius")

    assert plain(result) == "6.0"


def test_function_defined_in_a_cell_comes_back_callable(evaluator: Evaluator) -> None:
    source = "offset = 10\ndef shift(value):\n    return value + offset\n"

    result = run(evaluator, source, assign=("shift",))

    shift = assigned(result)["shift"]
    assert shift(1) == 11


def test_plain_pickle_in_a_cell_finds_the_cells_classes(evaluator: Evaluator) -> None:
    source = "import pickle\nclass Point:\n    pass\ntype(pickle.loads(pickle.dumps(Point()))).__name__"

    assert plain(run(evaluator, source)) == "'Point'"


def test_inputs_are_seeded_in_the_namespace(evaluator: Evaluator) -> None:
    result = run(evaluator, "data['b'] = n\ndata", inputs={"data": {"a": 1}, "n": 2})

    assert plain(result) == "{'a': 1, 'b': 2}"


def test_input_that_does_not_load_fails_the_cell_clearly(evaluator: Evaluator) -> None:
    module = types.ModuleType("fm_only_in_the_notebook")
    exec("class Frame:\n    pass", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        pickle = codec.dumps(module.Frame())  # by reference: a module the executor lacks
    finally:
        del sys.modules[module.__name__]
    request = cell.CellRequest(header=codec.local_header(), source="ran = True", filename="<c>", first_line=1)
    request.inputs.add(name="df", pickle=pickle)

    result = evaluator.evaluate(request)

    assert result.error.ename == "ModuleNotFoundError"
    assert "No module named 'fm_only_in_the_notebook'" in result.error.evalue
    assert "'df'" in result.error.evalue
    assert result.error.evalue.endswith("install it on the executor")
    assert "ran" not in evaluator.namespace


def test_large_assigned_value_is_dropped_and_small_ones_return(evaluator: Evaluator) -> None:
    source = "big = b'x' * (12 * 1024 * 1024)\nsmall = 'kept'\n"

    result = run(evaluator, source, assign=("big", "small"))

    assert assigned(result) == {"small": "kept"}
    reason = not_returned(result)["big"]
    assert reason.startswith("12.0 MiB is over Flame's 4 MiB task limit")
    assert len(codec.encode(result)) < PAYLOAD_LIMIT


def test_values_that_only_fit_one_by_one_drop_the_largest_first(evaluator: Evaluator) -> None:
    source = "a = b'a' * (3 * 1024 * 1024)\nb = b'b' * (2 * 1024 * 1024)\nc = b'c' * 1024\n"

    result = run(evaluator, source, assign=("a", "b", "c"))

    assert sorted(assigned(result)) == ["b", "c"]
    assert "did not fit in Flame's 4 MiB task limit" in not_returned(result)["a"]
    assert len(codec.encode(result)) < PAYLOAD_LIMIT


def test_large_result_is_shown_but_not_pickled(evaluator: Evaluator) -> None:
    result = run(evaluator, "b'y' * (5 * 1024 * 1024)")

    assert not result.HasField("value")
    assert len(codec.encode(result)) < MAX_MESSAGE_BYTES


def test_long_output_keeps_its_start_and_says_what_was_cut(evaluator: Evaluator) -> None:
    result = run(evaluator, "print('start')\nprint('x' * (6 * 1024 * 1024))\nprint('end')")

    [(name, text)] = shown(result)
    assert name == "stdout"
    assert text.startswith("start\nxxxx")
    assert text.endswith(" bytes more]\n")
    assert "[output truncated: " in text
    assert len(codec.encode(result)) < PAYLOAD_LIMIT


@pytest.mark.parametrize(
    ("source", "ename", "evalue"),
    [
        ("import sys\nsys.exit(3)", "SystemExit", "3"),
        ("raise KeyboardInterrupt('stop')", "KeyboardInterrupt", "stop"),
    ],
)
def test_system_exit_and_interrupts_are_reported_not_raised(
    evaluator: Evaluator, source: str, ename: str, evalue: str
) -> None:
    stdout, stderr = sys.stdout, sys.stderr

    result = run(evaluator, "print('before')\n" + source)

    assert (result.error.ename, result.error.evalue) == (ename, evalue)
    assert shown(result) == [("stdout", "before\n")]
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert plain(run(evaluator, "'still running'")) == "'still running'"


def test_streams_are_restored_even_if_the_cell_replaced_them(evaluator: Evaluator) -> None:
    stdout = sys.stdout

    run(evaluator, "import io, sys\nsys.stdout = io.StringIO()\nraise ValueError")

    assert sys.stdout is stdout


def test_a_log_handler_set_up_in_one_cell_writes_into_later_cells(evaluator: Evaluator) -> None:
    setup = (
        "import logging, sys\n"
        "log = logging.getLogger('flame_magic.tests.cell')\n"
        "log.addHandler(logging.StreamHandler(sys.stderr))\n"
        "log.propagate = False\n"
        "log.warning('one')\n"
    )
    try:
        first = run(evaluator, setup)
        second = run(evaluator, "log.warning('two')")
    finally:
        run(evaluator, "log.handlers.clear()")

    assert shown(first) == [("stderr", "one\n")]
    assert shown(second) == [("stderr", "two\n")]


def test_timeout_stops_a_blocking_cell_and_says_how_to_change_it():
    evaluator = Evaluator()
    try:
        # It sleeps far longer than the test may take: it ends only if the timeout stops it.
        request = cell.CellRequest(
            header=codec.local_header(), source="import time\ntime.sleep(3600)", filename="<t>", timeout=0.3
        )
        result = evaluator.evaluate(request)
        assert result.error.ename == "TimeoutError"
        assert "0.3 s timeout" in result.error.evalue and "--timeout" in result.error.evalue
        # The next cell has no leftover alarm.
        after = evaluator.evaluate(
            cell.CellRequest(
                header=codec.local_header(), source="import time\ntime.sleep(0.5)\n1", filename="<u>"
            )
        )
        assert not after.HasField("error")
    finally:
        evaluator.close()


def test_file_descriptor_output_is_captured_in_order_with_prints(evaluator: Evaluator) -> None:
    source = (
        "import os, subprocess, sys\n"
        "print('one')\n"
        "os.system('echo two')\n"
        "subprocess.run(['echo', 'three'])\n"
        "os.write(1, b'four\\n')\n"
        "print('five')\n"
        "subprocess.run(['sh', '-c', 'echo six >&2'])\n"
        "print('seven', file=sys.stderr)\n"
        "os.write(1, b'eight\\n')\n"
    )

    outputs = shown(run(evaluator, source))

    assert outputs == [
        ("stdout", "one\ntwo\nthree\nfour\nfive\n"),
        ("stderr", "six\nseven\n"),
        ("stdout", "eight\n"),
    ]


def test_c_level_printf_is_captured_before_the_next_print(evaluator: Evaluator) -> None:
    source = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "print('python')\n"
        "libc.printf(b'from C\\n')\n"
        "print('python again')\n"
    )

    assert shown(run(evaluator, source)) == [("stdout", "python\nfrom C\npython again\n")]


def test_a_forked_child_writing_to_the_file_descriptors_is_captured(evaluator: Evaluator) -> None:
    source = (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.write(1, b'child\\n')\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent')\n"
    )

    assert shown(run(evaluator, source)) == [("stdout", "child\nparent\n")]


def test_file_descriptors_are_restored_after_the_cell(
    evaluator: Evaluator, capfd: pytest.CaptureFixture
) -> None:
    result = run(evaluator, "import os\nos.write(1, b'inside\\n')\nos.write(2, b'inside too\\n')")
    os.write(1, b"outside\n")
    os.write(2, b"outside too\n")

    assert shown(result) == [("stdout", "inside\n"), ("stderr", "inside too\n")]
    out, err = capfd.readouterr()
    assert "outside\n" in out and "inside" not in out
    assert "outside too\n" in err and "inside" not in err
    # The next cell captures again.
    assert shown(run(evaluator, "import os\nos.write(1, b'again\\n')")) == [("stdout", "again\n")]


def test_output_of_a_subprocess_after_its_cell_does_not_enter_the_next_cell(evaluator: Evaluator) -> None:
    run(evaluator, "import subprocess\nlate = subprocess.Popen(['sh', '-c', 'sleep 0.3; echo late'])")

    result = run(evaluator, "late.wait()\nimport time\ntime.sleep(0.1)\nprint('mine')")

    # The subprocess inherited the first cell's pipe: its output is the first cell's, sent
    # to whichever cell is running when it arrives, as a thread's prints are.
    assert ("stdout", "mine\n") in [(name, text.replace("late\n", "")) for name, text in shown(result)]


def test_matplotlib_figures_become_png_displays(evaluator: Evaluator) -> None:
    if "matplotlib" in sys.modules:
        pytest.skip("matplotlib was imported in this process before the evaluator chose its backend")
    source = (
        "import matplotlib\n"
        "backend = matplotlib.get_backend()\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "print('drawn')\n"
    )
    result = run(evaluator, source, assign=("backend",))

    assert assigned(result)["backend"] in ("inline", "module://matplotlib_inline.backend_inline")
    outputs = shown(result)
    assert [kind for kind, _ in outputs] == ["stdout", "display"]
    assert base64.b64decode(outputs[1][1]["image/png"]).startswith(b"\x89PNG")
    assert outputs[1][1]["text/plain"].startswith("<Figure size")

    # plt.show() shows it there; figures are closed after each cell, as in Jupyter.
    shown_now = shown(run(evaluator, "plt.figure()\nplt.plot([3, 1])\nplt.show()\nprint('after')"))
    assert [kind for kind, _ in shown_now] == ["display", "stdout"]
    assert shown(run(evaluator, "x = len(plt.get_fignums())", assign=("x",))) == []
    assert assigned(run(evaluator, "n = len(plt.get_fignums())", assign=("n",))) == {"n": 0}


def test_rich_displays_travel_as_their_mime_data(evaluator: Evaluator) -> None:
    source = (
        "from IPython.display import HTML, JSON, SVG, Latex, Markdown, display\n"
        "display(HTML('<table><tr><td>1</td></tr></table>'))\n"
        "display(Markdown('# Title'))\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>\'))\n'
        "display(Latex(r'$\\alpha$'))\n"
        "display(JSON({'a': [1, 2]}))\n"
        "class Table:\n"
        "    def _repr_html_(self):\n"
        "        return '<table><tr><td>remote</td></tr></table>'\n"
        "    def __repr__(self):\n"
        "        return 'Table()'\n"
        "Table()\n"
    )

    result = run(evaluator, source)

    displays = [data for kind, data in shown(result)]
    assert displays[0]["text/html"] == "<table><tr><td>1</td></tr></table>"
    assert displays[1]["text/markdown"] == "# Title"
    assert "<circle" in displays[2]["image/svg+xml"]
    assert displays[3]["text/latex"] == "$\\alpha$"
    assert displays[4]["application/json"] == {"a": [1, 2]}
    value = json.loads(result.result.data_json)
    assert value == {"text/html": "<table><tr><td>remote</td></tr></table>", "text/plain": "Table()"}


def test_top_level_await_runs_and_its_event_loop_lasts_between_cells(evaluator: Evaluator) -> None:
    run(
        evaluator,
        "import asyncio\nawait asyncio.sleep(0)\ntask = asyncio.ensure_future(asyncio.sleep(0, 'later'))",
    )
    result = run(evaluator, "await task")
    assert not result.HasField("error"), result.error.traceback
    assert plain(result) == "'later'"


def test_a_cells_exception_class_names_its_builtin_bases(evaluator: Evaluator) -> None:
    error = run(evaluator, "class MyErr(KeyError):\n    pass\nraise MyErr('k')").error
    assert error.ename == "MyErr"
    assert list(error.builtin_bases) == ["KeyError", "LookupError"]


def test_the_runners_signal_handlers_are_not_in_tracebacks(evaluator: Evaluator) -> None:
    request = cell.CellRequest(header=codec.local_header(), source="import time\ntime.sleep(5)", timeout=0.2)
    error = evaluator.evaluate(request).error
    assert error.ename == "TimeoutError"
    assert "time.sleep(5)" in error.traceback and "evaluate.py" not in error.traceback, error.traceback


def _batch(items: list[Any], source: str, stop_at_error: bool = False) -> cell.CellRequest:
    request = cell.CellRequest(
        header=codec.local_header(), source=source, filename="<map>", stop_at_error=stop_at_error
    )
    request.inputs.add(name="k", pickle=codec.dumps(100))
    for item in items:
        request.items.add(value=cell.Value(name="x", pickle=codec.dumps(item)))
    return request


def test_a_batch_runs_the_cell_once_per_item_with_the_shared_inputs(evaluator: Evaluator) -> None:
    batch = evaluator.evaluate(_batch([1, 2, 3], "print(x)\nx + k"))
    assert [codec.loads(r.value.pickle) for r in batch.items] == [101, 102, 103]
    assert [shown(r) for r in batch.items] == [[("stdout", f"{x}\n")] for x in (1, 2, 3)]
    assert not batch.HasField("error")


def test_a_failed_item_ends_its_batch_only_when_asked(evaluator: Evaluator) -> None:
    stopped = evaluator.evaluate(_batch([1, 0, 2], "k // x", stop_at_error=True))
    assert len(stopped.items) == 2 and stopped.items[1].error.ename == "ZeroDivisionError"
    every = evaluator.evaluate(_batch([1, 0, 2], "k // x"))
    assert [r.HasField("error") for r in every.items] == [False, True, False]
    assert codec.loads(every.items[2].value.pickle) == 50


def test_the_items_of_a_batch_share_the_task_limit(evaluator: Evaluator) -> None:
    # The first item alone fits its output; the second, as large, finds the batch full and is cut.
    batch = evaluator.evaluate(_batch([1, 2, 3, 4], "print('y' * (2 * 1024 * 1024))\nx"))
    assert batch.ByteSize() <= PAYLOAD_LIMIT
    texts = ["".join(text for name, text in shown(r) if name == "stdout") for r in batch.items]
    assert texts[0] == "y" * (2 * MiB) + "\n"
    assert codec.loads(batch.items[0].value.pickle) == 1
    assert len(batch.items) == 4 and "[output truncated" in texts[1]
