"""Remote exceptions rebuilt from data: builtin bases, rendering, pickling."""

from __future__ import annotations

import pickle

from flame_magic.errors import CellFailed, MapInterrupted, RemoteError, add_note, remote_error
from flame_magic.items import Progress
from flame_magic.progress import describe


def test_a_cells_class_is_an_instance_of_its_most_derived_builtin_bases():
    error = remote_error("MyErr", "missing", "Traceback...\nMyErr: missing\n", ["KeyError", "LookupError"])
    assert isinstance(error, KeyError) and isinstance(error, RemoteError)
    assert type(error).__name__ == "MyErr"
    assert not isinstance(remote_error("Odd", "x", "tb", []), ValueError)


def test_a_builtin_whose_constructor_differs_falls_back_to_a_less_derived_base():
    error = remote_error("UnicodeDecodeError", "bad byte", "tb", ["UnicodeError", "ValueError"])
    assert isinstance(error, UnicodeError) and str(error) == "bad byte"


def test_remote_errors_pickle_with_their_notes_and_bases():
    error = remote_error("MyErr", "bad", "Traceback...\n", ["ValueError"])
    add_note(error, "Item 3 of 7 failed")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, ValueError) and str(again) == "bad"
    assert again.remote_traceback == "Traceback...\n" and again.__notes__ == ["Item 3 of 7 failed"]
    interrupted = pickle.loads(pickle.dumps(MapInterrupted("stopped", [1])))
    assert str(interrupted) == "stopped" and interrupted.results == [1]
    assert str(pickle.loads(pickle.dumps(CellFailed("gone")))) == "gone"


def test_progress_without_a_total_counts():
    assert describe("m", Progress(done=3, total=None, failed=0, elapsed=1.0)).startswith("m: 3 done,")
    assert describe("m", Progress(done=3, total=9, failed=1, elapsed=1.0)).startswith("m: 3/9 done, 1 failed")
