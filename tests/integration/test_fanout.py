"""%%flmrun --map, resources and named sessions, through a real shell, embedded Flame and runners."""

from __future__ import annotations

import re

import pytest
from IPython.core.error import UsageError
from test_embedded_flame import wait_for

from flame_magic import codec
from flame_magic.errors import CellFailed, RemoteError
from flame_magic.fanout import NOT_DONE
from flame_magic.progress import ProgressDisplay


@pytest.fixture(scope="module", autouse=True)
def close_sessions_after(shell):
    """Leave no session of this module open for the next ones (they count sessions)."""
    yield
    shell.run_line_magic("flame", "close")


def _connection(shell):
    return shell.magics_manager.registry["FlameMagics"].connection()


def _session(shell, label_part: str):
    """This notebook's open session whose %flame status label contains ``label_part``."""
    infos = [i for i in _connection(shell).sessions() if label_part in i.label and i.state == "Open"]
    assert len(infos) == 1, infos
    return infos[0]


def test_map_collects_results_in_input_order_across_runners(run, shell, tmp_path):
    # The first item finishes last: it waits until another runner has run an item.
    shell.user_ns["delays"] = list(range(10))
    shell.user_ns["scale"] = 10
    shell.user_ns["meeting"] = str(tmp_path)
    ran = run(
        "%%flmrun --map d=delays --into out --instances 2\n"
        "import os, time\nopen(os.path.join(meeting, str(os.getpid())), 'w').close()\n"
        "deadline = time.monotonic() + 60  # a guard against a hang\n"
        "while d == 0 and len(os.listdir(meeting)) < 2 and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "(d * scale, os.getpid())"
    )
    assert ran.error is None, ran.error
    out = shell.user_ns["out"]
    assert [value for value, _ in out] == [d * 10 for d in range(10)]
    assert len({pid for _, pid in out}) == 2  # two runner instances shared the items
    assert ran.value is None  # with --into the cell shows nothing
    assert re.search(r"flmrun --map d=delays: 10/10 done, [\d,]+ items/s", ran.stderr)


def test_map_without_into_is_the_cells_value_and_names_stay_put(run, shell):
    shell.user_ns["words"] = ["flame", "map", ""]
    shell.user_ns.pop("n", None)
    ran = run("%%flmrun --map w=words --instances 2\nn = len(w)\nprint('item', w)\nn")
    assert ran.error is None, ran.error
    assert ran.value == [5, 3, 0]
    assert "n" not in shell.user_ns  # per-item names are not brought back
    assert ran.stdout.index("item flame") < ran.stdout.index("item map")  # outputs in input order
    assert run("%%flmrun --map w=nothing_yet\nw").error is not None
    shell.user_ns["nothing"] = []
    assert run("%%flmrun --map w=nothing --into empty\nw").error is None
    assert shell.user_ns["empty"] == []


def test_first_failure_is_raised_naming_the_item_and_finished_results_are_kept(run, shell, tmp_path):
    shell.user_ns["xs"] = list(range(12))
    # Items from 6 on wait for the test to let them go on, after the map has stopped.
    gate = tmp_path / "go-on"
    shell.user_ns["gate"] = str(gate)
    ran = run(
        "%%flmrun --map x=xs --into out --instances 2\n"
        "import os, time\ndeadline = time.monotonic() + 60  # a guard against a hang\n"
        "while x >= 6 and not os.path.exists(gate) and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\n"
        "if x == 3:\n    raise ValueError(f'bad {x}')\nx * 10"
    )
    gate.touch()
    assert isinstance(ran.error, RemoteError) and isinstance(ran.error, ValueError)
    rendered = "\n".join(ran.error._render_traceback_())
    assert "raise ValueError(f'bad {x}')" in rendered
    assert "Item 3 of 12 failed (x=3)" in rendered and "`out` holds" in rendered
    out = shell.user_ns["out"]
    assert len(out) == 12 and out[3] is ran.error
    assert out[0] == 0 and out[1] == 10
    assert all(value == 10 * i or value is NOT_DONE for i, value in enumerate(out) if i != 3)
    assert out[6:] == [NOT_DONE] * 6  # it stopped: it did not wait for the items still running


def test_return_exceptions_puts_failures_in_place(run, shell):
    shell.user_ns["xs"] = list(range(6))
    ran = run("%%flmrun --map x=xs --into out --instances 2 --return-exceptions\n10 // (x - 2)")
    assert ran.error is None, ran.error
    out = shell.user_ns["out"]
    assert isinstance(out[2], ZeroDivisionError) and "integer division" in str(out[2])
    assert [v for i, v in enumerate(out) if i != 2] == [-5, -10, 10, 5, 3]
    assert "1 failed" in ran.stderr


def test_interrupt_stops_pending_items_and_keeps_finished_ones(run, shell, monkeypatch):
    shell.user_ns["xs"] = list(range(60))
    update = ProgressDisplay.update
    fired = []

    def interrupt_once_some_are_done(self, progress):
        update(self, progress)
        if progress.done >= 4 and not fired:
            fired.append(progress.done)
            raise KeyboardInterrupt  # as Ctrl-C does, in the thread that runs the cell

    monkeypatch.setattr(ProgressDisplay, "update", interrupt_once_some_are_done)
    # --cpu 1: a session of its own, to count its tasks.
    ran = run("%%flmrun --map x=xs --into out --instances 2 --cpu 1\nimport time\ntime.sleep(0.1)\nx")
    assert isinstance(ran.error, KeyboardInterrupt)
    assert "The map stopped after" in str(ran.error) and "`out` holds" in str(ran.error)
    out = shell.user_ns["out"]
    done = [i for i, value in enumerate(out) if value is not NOT_DONE]
    assert len(done) >= fired[0] and all(out[i] == i for i in done)
    assert NOT_DONE in out

    def settled():  # type: ignore[no-untyped-def]
        """The map's session, once what Flame still had (a few items) has finished or was cancelled."""
        [info] = [i for i in _connection(shell).sessions() if "up to 2 instances, 1 CPU" in i.label]
        return info if info.pending == 0 and info.running == 0 else None

    info = wait_for(settled)
    sent = info.succeed + info.failed + info.cancelled
    assert sent < 30, f"{sent} of 60 items were sent to Flame: pending ones were not held back"


def test_an_item_whose_runner_dies_fails_alone_and_values_that_cannot_travel_are_shown(run, shell):
    shell.user_ns["xs"] = list(range(4))
    ran = run(
        "%%flmrun --map x=xs --into out --instances 2 --return-exceptions\n"
        "import os, threading\nif x == 2:\n    os._exit(3)\nthreading.Lock() if x == 3 else x"
    )
    assert ran.error is None, ran.error
    out = shell.user_ns["out"]
    assert out[:2] == [0, 1]
    assert isinstance(out[2], CellFailed) and "exit code 3" in str(out[2])
    assert repr(out[3]).startswith("<unlocked _thread.lock object")  # as the runner showed it


def test_a_map_whose_runners_cannot_start_fails_quickly(run, shell, monkeypatch):
    monkeypatch.setattr(codec, "CLOUDPICKLE_VERSION", "0.0.1")
    shell.user_ns["xs"] = [1, 2, 3]
    # Were the refusal not noticed, the map would wait for ever (pytest's timeout would end it).
    ran = run("%%flmrun --map x=xs --into out --instances 2 --memory 300Mi\nx")
    assert isinstance(ran.error, CellFailed)
    assert "cloudpickle" in str(ran.error) and "0.0.1" in str(ran.error)
    assert shell.user_ns["out"] == [NOT_DONE] * 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--into out", "--into goes with --map"),
        ("--return-exceptions", "--return-exceptions goes with --map"),
        ("--map x", "--map takes ITEM=ITERABLE"),
        ("--map x=undefined_name", "NameError: name 'undefined_name' is not defined"),
        ("--map x=xs[", "ITERABLE is a Python expression"),
        ("--map x=number", "`number` (int) is not iterable"),
        ("--map 1x=xs", "ITEM takes a Python name"),
        ("--map x=xs --background h", "cannot run in the background"),
        ("--map x=xs --assign y", "not names"),
        ("--instances 2", "--instances goes with --map or --session"),
        ("--map x=xs --instances 0", "--instances takes a whole number from 1"),
        ("--cpu 0", "--cpu takes a whole number from 1"),
        ("--cpu two", "--cpu takes a whole number"),
        ("--gpu -1", "--gpu takes a whole number from 0"),
        ("--memory lots", "--memory takes bytes or a size with a unit (512Mi, 2Gi"),
        ("--cpu 4096", "No node of this Flame can hold an instance with 4096 CPU"),
        ("--gpu 1", "No node of this Flame can hold an instance with 1 CPU, 1Gi memory, 1 GPU"),
        ("--session 'bad name'", "--session takes a name of letters, digits"),
        ("--background 'not a name'", "--background takes a Python name"),
    ],
)
def test_options_are_checked_with_clear_messages(run, shell, options, message):
    shell.user_ns["xs"] = [1, 2]
    shell.user_ns["number"] = 3
    ran = run(f"%%flmrun {options}\n1")
    assert isinstance(ran.error, UsageError), ran.error
    assert message in str(ran.error)


def test_instances_and_resources_reach_flame(run, shell):
    shell.user_ns["xs"] = [1, 2, 3]
    ran = run("%%flmrun --map x=xs --into out --instances 3 --cpu 1 --memory 256Mi\nx")
    assert ran.error is None, ran.error
    info = _session(shell, "up to 3 instances, 1 CPU, 256Mi memory, 0 GPU")
    spec = _connection(shell).client().get_session(info.session_id).spec
    assert (spec.min_instances, spec.max_instances) == (0, 3)
    assert (spec.resreq.cpu, spec.resreq.memory, spec.resreq.gpu) == (1, 256 * 1024**2, 0)


def test_named_session_keeps_its_runner_and_imports_and_shows_in_status(run, shell):
    first = run("%%flmrun --session keep\nimport fractions, os\nos.getpid()")
    assert first.error is None, first.error
    again = run("%%flmrun --session keep\n(str(fractions.Fraction(1, 3)), os.getpid())")
    assert again.value == ("1/3", first.value)
    shell.user_ns["xs"] = [1, 2]
    mapped = run("%%flmrun --session keep --map x=xs\n(str(fractions.Fraction(1, x)), os.getpid())")
    assert mapped.value == [("1", first.value), ("1/2", first.value)]  # its one runner, its imports
    status = run("%flame status").stdout
    assert re.search(r"Session flame-magic-keep-\w+ \[named 'keep'\] \(flame-magic, Open\)", status)
    mismatch = run("%%flmrun --session keep --cpu 1\n1")
    assert isinstance(mismatch.error, UsageError) and "%flame close keep" in str(mismatch.error)
    assert "Closed session 'keep'" in run("%flame close keep").stdout
    fresh = run("%%flmrun --session keep\nimport os\nos.getpid()")
    assert fresh.error is None and fresh.value != first.value
    assert isinstance(run("%flame close nosuch").error, UsageError)


def test_help_documents_the_new_options(shell):
    doc = shell.find_cell_magic("flmrun").__doc__
    for option in ("--map", "--into", "--return-exceptions", "--instances", "--cpu", "--memory", "--gpu"):
        assert option in doc
    for option in ("--session", "--background", "NOT_DONE", "%%flmrun --map path=paths"):
        assert option in doc
