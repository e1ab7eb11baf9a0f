"""The notebook's end of a cell's live output and interrupt, through Flame's object cache.

The runner appends what the cell shows to an object of the cache as it runs
(:mod:`flame_magic_runner.live`); the notebook polls it while it waits for the task, and
writes an interrupt to a second object, which the runner watches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flame_magic import codec, wire
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
        self.out_key = wire.live_output_key(prefix, channel)
        self.ctl_key = wire.live_control_key(prefix, channel)
        self.show = show
        self.version = 0
        self.interrupted = False
        self.polled = False
        self._failed = False
        self._since = time.monotonic()  # the cell runs on the runner within this channel's life

    def poll(self) -> None:
        """Show what the runner appended since the last poll."""
        if self._failed:
            return
        self.polled = True
        try:
            fetched = self.cache.get(self.out_key, have=self.version)
        except ObjectNotFound:
            return  # the runner makes it on its first flush
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
        self.cache.put(self.ctl_key, codec.encode(cell.Interrupt(header=codec.local_header(), grace=grace)))
        self.interrupted = True

    def finish(self, streamed: bool | None = None) -> None:
        """Show the rest of what was streamed, then remove the channel's objects.

        ``streamed`` (the result's flag) says whether the runner wrote to the channel (a --map
        item's, shown in turn). None: unknown, and the runner, which flushes from
        :data:`~flame_magic.wire.LIVE_FLUSH` into the cell, cannot have written if the channel is younger:
        a quick cell costs no cache call at all.
        """
        keys = []
        young = time.monotonic() - self._since < wire.LIVE_FLUSH
        if self.polled or streamed or (streamed is None and not young):
            self.poll()
            keys.append(self.out_key)
        if self.interrupted:
            keys.append(self.ctl_key)
        for key in keys:
            try:
                self.cache.delete(key)
            except CacheError:
                pass
