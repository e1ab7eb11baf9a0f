"""The notebook's end of a cell's live output and interrupt, through Flame's object cache.

The runner appends what the cell shows to an object of the cache as it runs
(:mod:`flame_magic_runner.live`); the notebook polls it while it waits for the task, and
writes an interrupt to a second object, which the runner watches.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flame_magic.cache import CacheClient
from flame_magic.errors import CacheError, ObjectNotFound
from flame_magic.protocol import cell


class LiveChannel:
    """The notebook's end of a cell's live output and interrupt (see :mod:`flame_magic_runner.live`)."""

    def __init__(
        self, cache: CacheClient, prefix: str, channel: str, show: Callable[[cell.Output], None]
    ) -> None:
        self.cache = cache
        self.channel = channel
        self.out_key = f"{prefix}/{channel}-out"
        self.ctl_key = f"{prefix}/{channel}-ctl"
        self.show = show
        self.version = 0
        self.interrupted = False
        self.polled = False
        self._failed = False

    def poll(self) -> None:
        """Show what the runner appended since the last poll."""
        if self._failed:
            return
        self.polled = True
        try:
            fetched = self.cache.get(self.out_key, have=self.version)
        except ObjectNotFound:
            return  # the runner makes it on its first flush, after a quarter second
        except CacheError:
            self._failed = True  # the runner keeps what it could not send for the result
            return
        if fetched is None:
            return
        self.version = fetched.version
        chunks = ([fetched.base] if fetched.base is not None else []) + [data for _, data in fetched.patches]
        for chunk in chunks:
            for output in cell.CellResult.FromString(bytes(chunk)).outputs:
                self.show(output)

    def interrupt(self, grace: float) -> None:
        """Ask the runner to interrupt the cell, and to exit if it has not stopped after ``grace`` s."""
        self.cache.put(self.ctl_key, json.dumps({"interrupt": True, "grace": grace}).encode())
        self.interrupted = True

    def finish(self, streamed: bool = False) -> None:
        """Show the rest of what was streamed, then remove the channel's objects.

        The runner streams only from a quarter second into the cell, and this side polls
        from a fifth: a cell that ended before the first poll streamed nothing, so a
        quick cell costs no cache call at all. ``streamed`` (the result's flag) says the
        runner wrote to the channel though it was never polled (a --map item's, shown in turn).
        """
        keys = []
        if self.polled or streamed:
            self.poll()
            keys.append(self.out_key)
        if self.interrupted:
            keys.append(self.ctl_key)
        for key in keys:
            try:
                self.cache.delete(key)
            except CacheError:
                pass
