"""A ``--map``'s items as Flame's tasks carry them, and what a map reports.

A batch's task input is the cell's shared request, encoded once, followed by its items, each
a ``CellRequest`` of one ``MapItem``: protobuf merges the concatenation into one request
(see :mod:`flame_magic.fanout`, which sends and watches the batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flame_magic import codec
from flame_magic.capture import format_size
from flame_magic.errors import ShipError
from flame_magic.protocol import cell
from flame_magic.wire import item_channel


@dataclass
class Progress:
    """How far a map is, for the progress display."""

    done: int
    total: int | None  # None while the items' iterator has not ended
    failed: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class MapOutcome:
    """What a map produced, in input order.

    Attributes
    ----------
    results
        One entry per item: its last expression's value (None when the cell ends with a
        statement), its exception if it failed, or :data:`NOT_DONE`.
    outputs
        ``(index, CellResult)`` of the items that printed or displayed something, by index.
    failure
        ``(index, exception)`` of the first failure seen, when failures stop the map.
    fatal
        An error that stopped the whole map (the session could not start, Flame went away).
    interrupted
        Whether a KeyboardInterrupt stopped it.
    """

    results: list[Any]
    outputs: list[tuple[int, cell.CellResult]] = field(default_factory=list)
    failure: tuple[int, BaseException] | None = None
    fatal: BaseException | None = None
    interrupted: bool = False
    progress: Progress | None = None
    left_running: int = 0
    #: The items read (for messages that name a failed one).
    items: list[Any] = field(default_factory=list)
    #: The most runners seen at once, when Flame said (see ``runners.RunnerCount``).
    runners: int | None = None


def item_payloads(
    shared: bytes, name: str, items: Iterable[Any], limit: int, channel: str = ""
) -> list[bytes]:
    """Each item encoded as a ``CellRequest`` of one ``MapItem``, to follow the encoded ``shared``
    request in a batch's task input (see :func:`batch_input`).

    With ``channel``, item ``i`` streams its live output to channel ``<channel>-<i>``.

    Raises
    ------
    ShipError
        If an item cannot be pickled, or its task would exceed ``limit`` bytes.
    """
    return list(iter_item_payloads(shared, name, items, limit, channel))


def iter_item_payloads(
    shared: bytes, name: str, items: Iterable[Any], limit: int, channel: str = ""
) -> Iterator[bytes]:
    """:func:`item_payloads` one at a time, as the items come (for iterators of unknown length)."""
    for index, item in enumerate(items):
        try:
            pickled = codec.dumps(item)
        except codec.UnpicklableError as exc:
            kind = f"{type(item).__module__}.{type(item).__qualname__}"
            raise ShipError(
                f"Cannot send item {index} ({kind}) of the map to the Flame runner: {exc}. "
                "Map over picklable values (e.g. file names or parameters) and create the rest in the cell."
            ) from None
        own = cell.MapItem(value=cell.Value(name=name, pickle=pickled))
        if channel:
            own.channel = item_channel(channel, index)
        payload = cell.CellRequest(items=[own]).SerializeToString()
        size = len(shared) + len(payload)
        if size > limit:
            raise ShipError(
                f"Item {index} of the map would send {format_size(size)} to Flame (the cell's "
                f"shared inputs are {format_size(len(shared))}), over its {format_size(limit)} limit "
                "for a task. Map over smaller items (e.g. file names or slices' bounds) and load the "
                "data inside the cell."
            )
        yield payload


def batch_input(shared: bytes, items: Sequence[bytes]) -> bytes:
    """The task input of a batch: the encoded shared request, then its items (:func:`item_payloads`)."""
    return shared + b"".join(items)
