"""The pieces of live output and interrupt that need no Flame."""

from __future__ import annotations

import pytest
from fake_flame import FakeFlame

from flame_magic.config import Target
from flame_magic.errors import CellFailed
from flame_magic.protocol import cell
from flame_magic.remote import Connection
from flame_magic.runs import Runs
from flame_magic_runner.recording import Recorder

TARGET = Target(endpoint="http://fake-flame:8080", ca_file=None, source="a fake Flame")


def test_recorder_take_gives_each_output_once_in_order():
    recorder = Recorder(1000)
    recorder.write("stdout", "a")
    recorder.write("stdout", "b")
    assert [o.stream.text for o in recorder.take()] == ["ab"]
    recorder.write("stdout", "c")
    recorder.display(cell.MimeBundle(data_json='{"text/plain": "x"}'))
    recorder.write("stderr", "d")
    taken = recorder.take()
    assert [o.WhichOneof("kind") for o in taken] == ["stream", "display", "stream"]
    assert (taken[0].stream.text, taken[2].stream.name, taken[2].stream.text) == ("c", "stderr", "d")
    assert recorder.take() == []
    # Patches concatenated parse as one message with every output.
    joined = b"".join(cell.CellResult(outputs=[o]).SerializeToString() for o in taken)
    assert len(cell.CellResult.FromString(joined).outputs) == 3


def test_interrupt_without_a_cache_stops_waiting_with_a_clear_message():
    class Client:
        def wait_task(self, session_id, task_id, stop=None, tick=None, pending=None):
            raise KeyboardInterrupt

    flame = FakeFlame()  # Flame, as far as the interrupt asks it about the task: it knows none
    connection = Connection(TARGET, "flmrun", 1.0, flame)  # type: ignore[arg-type]
    with pytest.raises(CellFailed, match="could not be interrupted.*keeps running"):
        Runs(connection)._wait(Client(), "s", "t", None, 5.0)  # type: ignore[arg-type]
    connection.shutdown()
