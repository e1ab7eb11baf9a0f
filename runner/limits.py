"""Fitting a cell's result in Flame's task limit, saying what was left out.

Flame carries a task's output in one gRPC message of at most 4 MiB. When the notebook
reads Flame's object cache, large values go back through it by reference
(:mod:`flame_magic_runner.values`). Otherwise, or if the cache fails, :func:`fit_to_limit`
shrinks a result that would not fit: first the pickled value of the last expression, then
the largest assigned values, then the tail of the printed text, then rich displays, each
with a note saying what was left out.
"""

from __future__ import annotations

import json

from flame_magic.protocol import cell
from flame_magic.transfer import CACHE_HINT
from flame_magic.wire import PAYLOAD_LIMIT

from .text import human_size, utf8_len

# What an encoded CellResult may take: Flame's TaskResult goes around it.
RESULT_LIMIT = PAYLOAD_LIMIT
_NOTICE_ROOM = 128  # bytes kept free for the "[output truncated ...]" line


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
        shown = f"[result not shown: its representation, {human_size(size)}, {_OVER}]"
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
    if result.ByteSize() > limit and inline(result.value):
        result.ClearField("value")
    while result.ByteSize() > limit and len(result.assigned) > 0:
        index = max(range(len(result.assigned)), key=lambda i: result.assigned[i].ByteSize())
        value = result.assigned[index]
        alone = value.ByteSize() + _NOTICE_ROOM > limit
        reason = too_large(value_size(value), alone=alone, cache=cache)
        result.not_returned.add(name=value.name, reason=reason)
        del result.assigned[index]


def cap_representation(result: cell.CellResult, limit: int) -> None:
    """Cut the last expression's shown form so that ``result`` fits in ``limit`` bytes.

    Only its plain text is kept, its start, with a note that states the true sizes; the
    value itself (``result.value``) is not touched.
    """
    if result.ByteSize() <= limit or not result.HasField("result"):
        return
    bundle = result.result
    total = bundle.ByteSize()
    try:
        text = str(json.loads(bundle.data_json).get("text/plain", ""))
    except (ValueError, AttributeError):
        text = ""
    value_note = "the value itself came back" if result.HasField("value") else "the value did not travel"
    room = limit - (result.ByteSize() - total) - _NOTICE_ROOM
    keep = max(0, room // 2)
    while True:
        shown = text[:keep]
        note = (
            f"[representation cut: showing {human_size(utf8_len(shown))} of its {human_size(total)}, "
            f"{_OVER}; {value_note}]"
        )
        bundle.CopyFrom(_placeholder(f"{shown}\n{note}" if shown else note))
        if result.ByteSize() <= limit or keep == 0:
            return
        keep //= 2


def inline(value: cell.Value) -> bool:
    """Whether a value travels inside the message (not through the object cache)."""
    return not value.buffers and not value.HasField("cached_pickle")


def value_size(value: cell.Value) -> int:
    """The true size of a value in bytes: its pickle and its buffers, inline or in the cache."""
    size = len(value.pickle) + sum(blob.size for blob in value.buffers)
    if value.HasField("cached_pickle"):
        size += value.cached_pickle.size
    return size


_OVER = "over Flame's 4 MiB task limit"


def too_large(size: int, *, alone: bool, cache: bool = False) -> str:
    where = "it is still defined in this session's runner, for later %%flmrun cells"
    if not cache:
        where += f"; to bring large values back, {CACHE_HINT}"
    if alone:
        return f"{human_size(size)} is {_OVER}; {where}"
    together = "did not fit in Flame's 4 MiB task limit with the cell's other results"
    return f"{human_size(size)} {together}; {where}"


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
            removed += len(data) - utf8_len(kept)
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
    result.outputs[index].display.CopyFrom(_placeholder(f"[display not shown: {human_size(size)}, {_OVER}]"))
    return True


def _placeholder(text: str) -> cell.MimeBundle:
    return cell.MimeBundle(data_json=json.dumps({"text/plain": text}), metadata_json="{}")


def _clip(text: str, limit: int, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    note = f"[... {len(text) - limit} characters cut ...]"
    return note + "\n" + text[-limit:] if keep_end else text[:limit] + note
