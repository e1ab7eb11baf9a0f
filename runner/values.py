"""A cell's values on their way in and out of the runner, inline or through Flame's object cache.

The evaluation calls this module, never the other way round: it hands over the request
before the cell runs (:meth:`Traffic.begin`, :meth:`Traffic.inputs`, :meth:`Traffic.live`)
and what the cell made after (:meth:`Traffic.last_value`, :meth:`Traffic.assigned`,
:meth:`Traffic.finish`). How
values travel (pickles, out-of-band buffers, the cache's objects, their digests) is
:mod:`flame_magic.transfer`'s; what does not fit is left out by
:mod:`flame_magic_runner.limits`, with a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flame_magic import codec, shm
from flame_magic.cache import CacheClient, CacheError
from flame_magic.protocol import cell
from flame_magic.transfer import Outgoing, Shipper
from flame_magic.wire import INLINE_BUDGET, RUNNER_SIDE

from .exceptions import input_error
from .limits import RESULT_LIMIT, cap_representation, fit_to_limit, inline, too_large
from .text import clean, safe_str, type_name

if TYPE_CHECKING:
    from .live import Live


class Traffic:
    """The runner's end of the values of a session's cells (one object cache client per endpoint)."""

    def __init__(self) -> None:
        self._caches: dict[str, CacheClient] = {}
        self._shippers: dict[tuple[str, str], Shipper] = {}
        self.shipper = Shipper(None, None, RUNNER_SIDE)  # the running cell's

    def begin(self, request: cell.CellRequest) -> Shipper:
        """Start a cell: choose how its values travel, and count what it uses as in use."""
        access = request.cache if request.HasField("cache") else None
        self.shipper = self._shipper_for(access)
        # Results through shared memory when the notebook is on this host; not a --map's,
        # whose results the notebook may read after this runner's later items.
        here = shm.host_id()
        self.shipper.local = bool(access and here and access.host == here and not request.values_only)
        self.shipper.new_request()
        return self.shipper

    def live(self, channel: str, take: Callable[[], list[cell.Output]]) -> Live | None:
        """The running cell's live output and interrupt, through the cache (None: at the end)."""
        shipper = self.shipper
        if not channel or not shipper.enabled or shipper.cache is None:
            return None
        from .live import Live

        return Live(shipper.cache, shipper.key_prefix or "", channel, take)

    def _shipper_for(self, access: cell.CacheAccess | None) -> Shipper:
        """Through the object cache when the notebook reads it.

        The cache is the one Flame gave this process (``FLAME_CACHE_ENDPOINT``, and its
        storage in ``FLAME_CACHE_STORAGE`` when shared), else the one the notebook names.
        """
        endpoint = os.environ.get("FLAME_CACHE_ENDPOINT") or (access.endpoint if access else "")
        if not endpoint:
            return Shipper(None, None, RUNNER_SIDE)
        prefix = access.key_prefix if access else ""
        if (endpoint, prefix) not in self._shippers:
            if endpoint not in self._caches:
                storage = (
                    os.environ.get("FLAME_CACHE_STORAGE") if os.environ.get("FLAME_CACHE_ENDPOINT") else None
                )
                self._caches[endpoint] = CacheClient(endpoint, os.environ.get("FLAME_CA_FILE"), storage)
            shm.sweep()  # a new session: segments of runners killed since this one started go
            # Without a prefix the notebook cannot read the cache: values come in, none go out.
            self._shippers[(endpoint, prefix)] = Shipper(self._caches[endpoint], prefix or None, RUNNER_SIDE)
        return self._shippers[(endpoint, prefix)]

    def inputs(self, inputs: Iterable[cell.Value], result: cell.CellResult) -> dict[str, Any] | None:
        """The notebook's values, loaded; None (and the error in ``result``) if one does not load."""
        loaded: dict[str, Any] = {}
        for value in inputs:
            try:
                loaded[value.name] = self.shipper.load(value)
            except BaseException as exc:  # noqa: B036 - unpickling runs arbitrary code
                result.error.CopyFrom(input_error(value.name, exc))
                return None
        return loaded

    def last_value(self, result: cell.CellResult, value: Any) -> None:
        """Put the last expression's value in ``result.value``, if it pickles (its repr shows anyway)."""
        try:
            pickled = self.shipper.pickle(value)
        except Exception:
            return
        if self.shipper.enabled:
            try:
                result.value.CopyFrom(self.shipper.ship("", pickled))
            except CacheError:
                pass
        elif len(pickled.pickle) <= RESULT_LIMIT and not pickled.buffers:
            result.value.pickle = pickled.pickle

    def assigned(self, values: dict[str, Any], result: cell.CellResult) -> None:
        """Send back the names the cell bound; those that cannot go are in ``result.not_returned``."""
        outgoing = []
        for name, value in values.items():
            try:
                pickled = self.shipper.pickle(value)
            except codec.UnpicklableError as exc:
                result.not_returned.add(name=name, reason=clean(str(exc)))
                continue
            except BaseException as exc:  # noqa: B036 - a reducer may raise anything
                result.not_returned.add(name=name, reason=clean(f"{type_name(exc)}: {safe_str(exc)}"))
                continue
            if not self.shipper.enabled and len(pickled.pickle) > RESULT_LIMIT:
                result.not_returned.add(name=name, reason=too_large(len(pickled.pickle), alone=True))
            else:
                outgoing.append(Outgoing(name, pickled))
        try:
            result.assigned.extend(self.shipper.ship_all(outgoing, INLINE_BUDGET))
        except CacheError as exc:
            reason = clean(f"Flame's object cache could not take it: {exc}")
            for item in outgoing:
                result.not_returned.add(name=item.name, reason=reason)

    def finish(self, result: cell.CellResult, dropped: int, limit: int = RESULT_LIMIT) -> None:
        """Fit ``result`` in ``limit`` bytes, then let the cache forget what is no longer used.

        Parameters
        ----------
        dropped
            Bytes of printed text already left out while recording.
        limit
            Flame's task limit, or a --map item's share of it.
        """
        if self.shipper.enabled:
            result.host = shm.host_id()  # the notebook sends through shared memory if it is its own
            self._by_reference(result, limit)
        fit_to_limit(result, limit, dropped=dropped, cache=self.shipper.enabled)
        self.shipper.evict()

    def _by_reference(self, result: cell.CellResult, limit: int) -> None:
        """Make room by sending inline values through the cache, so that no value gives way."""
        cap_representation(result, limit)
        values = [result.value] if result.HasField("value") else []
        values += sorted(result.assigned, key=lambda v: v.ByteSize(), reverse=True)
        try:
            for value in values:
                if result.ByteSize() <= limit:
                    break
                if inline(value) and len(value.pickle) >= 1024:
                    value.CopyFrom(self.shipper.ship(value.name, codec.Pickled(value.pickle), force=True))
        except CacheError:
            pass  # fit_to_limit leaves out what still does not fit, and says so
