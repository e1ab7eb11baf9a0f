"""fit_to_limit with an object cache: what is shown gives way, values never; notes state true sizes."""

from __future__ import annotations

import json

from flame_magic.protocol import cell
from flame_magic_runner.limits import RESULT_LIMIT, fit_to_limit

MB = 1024 * 1024


def shown(result: cell.CellResult) -> str:
    return json.loads(result.result.data_json)["text/plain"]


def test_a_large_representation_is_capped_and_the_values_kept() -> None:
    result = cell.CellResult()
    result.result.data_json = json.dumps({"text/plain": "z" * (5 * MB), "text/html": "<b>z</b>" * MB})
    # By reference (a blob in the cache), as the runner sends a large value with a cache.
    result.value.CopyFrom(cell.Value(cached_pickle=cell.Blob(size=5 * MB, digest="d")))
    result.assigned.add(name="a4", pickle=b"p" * 200)
    result.assigned.add(name="s", cached_pickle=cell.Blob(size=5 * MB, digest="e"))

    fit_to_limit(result, RESULT_LIMIT, cache=True)

    assert result.ByteSize() <= RESULT_LIMIT
    assert [v.name for v in result.assigned] == ["a4", "s"] and not result.not_returned
    assert result.HasField("value")
    text = shown(result)
    assert text.startswith("zzzz")
    note = text.rsplit("\n", 1)[1]
    assert note.startswith("[representation cut: showing ") and "of its 13.0 MiB" in note
    assert note.endswith("the value itself came back]")


def test_without_a_cache_the_note_states_the_true_size_of_what_stayed() -> None:
    result = cell.CellResult()
    result.assigned.add(name="big", pickle=b"x" * (5 * MB))
    result.assigned.add(name="small", pickle=b"y" * 208)

    fit_to_limit(result, RESULT_LIMIT, cache=False)

    assert [v.name for v in result.assigned] == ["small"]
    assert result.not_returned[0].reason.startswith("5.0 MiB is over Flame's 4 MiB task limit")
