"""%%flmrun through a real IPython shell, an embedded Flame and real runner processes."""

from __future__ import annotations

import os
import re
import threading

import pytest
from IPython.core.error import UsageError

from flame_magic import codec
from flame_magic.errors import CellFailed, RemoteError
from flame_magic.remote import Connection


def test_prints_and_last_expression_come_back(run):
    ran = run("%%flmrun\nprint('hello from the runner')\n40 + 2")
    assert ran.error is None
    assert ran.value == 42
    assert "hello from the runner" in ran.stdout


def test_cell_runs_in_another_process(run, shell):
    ran = run("%%flmrun\nimport os\nos.getpid()")
    assert ran.error is None
    assert isinstance(ran.value, int) and ran.value != os.getpid()


def test_notebook_functions_classes_closures_and_lambdas_travel(run, shell):
    setup = (
        "factor = 3\n"
        "def make_scaler(k):\n    def scale(v):\n        return v * k * factor\n    return scale\n"
        "scaler = make_scaler(2)\n"
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "    def norm(self):\n        return abs(self.x)\n"
        "shift = lambda v: v + 1\n"
        "items = [1, 2, 3]\n"
    )
    assert shell.run_cell(setup).success
    ran = run("%%flmrun\n[shift(scaler(i)) for i in items] + [Point(-5).norm()]")
    assert ran.error is None, ran.error
    assert ran.value == [7, 13, 19, 5]


def test_assigned_names_appear_in_the_notebook(run, shell):
    shell.user_ns.pop("made_remotely", None)
    ran = run("%%flmrun\nmade_remotely = {'k': [1, 2]}\ndef helper(v):\n    return v * 10\n")
    assert ran.error is None
    assert shell.user_ns["made_remotely"] == {"k": [1, 2]}
    assert shell.user_ns["helper"](4) == 40


def test_assign_option_chooses_names_and_no_assign_brings_none(run, shell):
    for name in ("kept", "dropped", "nothing"):
        shell.user_ns.pop(name, None)
    assert run("%%flmrun --assign kept\nkept = 1\ndropped = 2").error is None
    assert shell.user_ns["kept"] == 1 and "dropped" not in shell.user_ns
    assert run("%%flmrun --no-assign\nnothing = 3").error is None
    assert "nothing" not in shell.user_ns
    bad = run("%%flmrun --assign 'not a name'\nx = 1")
    assert isinstance(bad.error, UsageError)


def test_runner_keeps_imports_between_cells(run):
    assert run("%%flmrun --no-assign\nimport fractions as fr").error is None
    ran = run("%%flmrun\nstr(fr.Fraction(1, 3))")
    assert ran.value == "1/3"


def test_remote_exception_is_raised_with_the_cells_own_lines(run, shell):
    ran = run("%%flmrun\nvalue = 1\nvalue / 0")
    assert isinstance(ran.error, RemoteError)
    assert isinstance(ran.error, ZeroDivisionError)
    rendered = "\n".join(ran.error._render_traceback_())
    assert re.search(r'File "<flmrun-cell-\d+>", line 3, in <module>', rendered)
    assert "value / 0" in rendered
    assert "runner/" not in rendered  # the runner's own frames are not shown


def test_chained_exceptions_are_kept(run):
    ran = run("%%flmrun\ntry:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('bad key') from e")
    assert isinstance(ran.error, ValueError)
    rendered = "\n".join(ran.error._render_traceback_())
    assert "KeyError" in rendered and "direct cause" in rendered


def test_missing_name_is_a_name_error_as_locally(run, shell):
    shell.user_ns.pop("never_defined", None)
    ran = run("%%flmrun\nnever_defined + 1")
    assert isinstance(ran.error, NameError)
    assert "never_defined" in str(ran.error)


def test_syntax_error_is_reported_before_anything_is_sent(run, shell):
    before = _task_total(shell)
    ran = run("%%flmrun\nx = 1\nif x\n    pass")
    assert isinstance(ran.error, SyntaxError)
    assert ran.error.lineno == 3
    assert _task_total(shell) == before


def test_magics_inside_the_cell_get_a_clear_message(run):
    ran = run("%%flmrun\n!ls\n%time 1")
    assert isinstance(ran.error, UsageError)
    assert "not available there" in str(ran.error)


def test_unpicklable_value_is_named_and_notebook_survives(run, shell):
    shell.user_ns["guard"] = threading.Lock()
    shell.user_ns["survivor"] = [1, 2, 3]
    ran = run("%%flmrun\nwith guard:\n    pass")
    assert isinstance(ran.error, UsageError)
    assert "`guard`" in str(ran.error) and "_thread.lock" in str(ran.error)
    assert shell.user_ns["survivor"] == [1, 2, 3]


def test_payload_over_flames_limit_names_the_largest_value(run, shell, monkeypatch):
    # As on a cluster without an object cache (the embedded Flame has one: tests/integration/test_bigdata.py).
    monkeypatch.setattr(Connection, "cache", lambda self: None)
    shell.user_ns["huge"] = b"x" * (5 * 1024 * 1024)
    shell.user_ns["tiny"] = 1
    try:
        ran = run("%%flmrun\nlen(huge) + tiny")
    finally:
        del shell.user_ns["huge"]
    assert isinstance(ran.error, UsageError)
    assert "`huge` (5.0 MiB)" in str(ran.error)
    assert "4.0 MiB" in str(ran.error)
    assert "FLAME_CACHE_ENDPOINT" in str(ran.error)  # how to configure a cache


def test_value_that_cannot_come_back_stays_remote_with_a_note(run, shell):
    shell.user_ns.pop("lock_made_remotely", None)
    ran = run("%%flmrun\nimport threading\nlock_made_remotely = threading.Lock()\nok = 1")
    assert ran.error is None
    assert "lock_made_remotely" not in shell.user_ns
    assert shell.user_ns["ok"] == 1
    assert "`lock_made_remotely` stays on the runner" in ran.stderr


def test_dead_runner_fails_the_cell_and_the_next_cell_gets_a_fresh_one(run, shell):
    first = run("%%flmrun\nimport os\nos.getpid()").value
    shell.user_ns["kept_locally"] = "still here"
    died = run("%%flmrun\nimport os\nos._exit(7)")
    assert isinstance(died.error, CellFailed)
    assert "died" in str(died.error) or "exit" in str(died.error)
    assert "the next cell opens a new session" in str(died.error)
    after = run("%%flmrun\nimport os\nos.getpid()")
    assert after.error is None and after.value != first
    assert shell.user_ns["kept_locally"] == "still here"


def test_remote_timeout_stops_the_cell(run):
    # It sleeps far longer than the test may take: it ends only if the timeout stops it.
    ran = run("%%flmrun --timeout 1\nimport time\ntime.sleep(3600)")
    assert isinstance(ran.error, RemoteError) and isinstance(ran.error, TimeoutError)
    assert "1 s timeout" in str(ran.error)
    assert run("%%flmrun\n'still usable'").value == "still usable"


def test_version_mismatch_fails_the_session_quickly_with_the_reason(run, shell, monkeypatch):
    run("%flame close")
    monkeypatch.setattr(codec, "CLOUDPICKLE_VERSION", "0.0.1")
    # Were the refusal not noticed, the cell would wait for ever (pytest's timeout would end it).
    ran = run("%%flmrun\n1")
    assert isinstance(ran.error, CellFailed)
    assert "cloudpickle" in str(ran.error) and "0.0.1" in str(ran.error)
    monkeypatch.undo()
    assert run("%%flmrun\n'recovered'").value == "recovered"


def test_flame_status_and_close(run):
    assert run("%%flmrun\n1").error is None
    status = run("%flame status")
    assert "Application: flame-magic" in status.stdout  # chosen automatically: flame-magic's runner
    assert "embedded" in status.stdout
    assert "succeeded" in status.stdout
    closed = run("%flame close")
    assert "Closed 1 session" in closed.stdout
    assert run("%%flmrun\n'reopened'").value == "reopened"


def test_help_documents_the_options(shell):
    doc = shell.find_cell_magic("flmrun").__doc__
    for option in ("--assign", "--no-assign", "--timeout", "Examples"):
        assert option in doc


def test_bad_option_is_a_usage_error(run):
    ran = run("%%flmrun --bogus\n1")
    assert isinstance(ran.error, UsageError)


def _task_total(shell) -> int:
    magics = shell.magics_manager.registry["FlameMagics"]
    sessions = magics.connection().sessions()
    return sum(s.pending + s.running + s.succeed + s.failed + s.cancelled for s in sessions)


@pytest.mark.parametrize("times", [2])
def test_extension_loads_twice_unloads_and_reloads(isolated_home, times):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    for _ in range(times):
        ip.run_line_magic("load_ext", "flame_magic")
    assert ip.find_cell_magic("flmrun") is not None
    ip.run_line_magic("unload_ext", "flame_magic")
    assert ip.find_cell_magic("flmrun") is None and ip.find_line_magic("flame") is None
    ip.run_line_magic("load_ext", "flame_magic")
    assert ip.find_cell_magic("flmrun") is not None
