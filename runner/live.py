"""Live output and interrupt of a running cell, through Flame's object cache.

Flame returns a task's output only when the task ends. While a cell runs, a flusher
thread appends what the cell showed since its last flush (every
:data:`~flame_magic.wire.LIVE_FLUSH` s) to the channel's output object
(each patch a ``CellResult`` holding only ``outputs``: patches concatenated still parse
as one message), and checks its control object, where the notebook puts an ``Interrupt``
when the user interrupts the cell (both keys: :mod:`flame_magic.wire`). The flusher then
sends SIGUSR2 to the main thread, whose handler raises ``KeyboardInterrupt`` in the cell (a signal, unlike
``_thread.interrupt_main``, also ends a blocking call such as ``time.sleep``). A cell on
another thread (flamepy's runner calls cells on a gRPC worker thread) gets it as an
asynchronous exception instead, at its next Python instruction. If the cell is still
running after the grace period the notebook gave, the process exits, so that Flame fails
the task and starts a fresh runner.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from flame_magic import codec, wire
from flame_magic.cache import CacheClient, CacheError, ObjectNotFound
from flame_magic.protocol import cell

INTERRUPT_SIGNAL = signal.SIGUSR2

_armed: Live | None = None
_handler_installed = False

# One flusher thread for the life of the process, handed each cell in turn: starting a
# thread per cell cost a quarter millisecond of every cell's round trip.
_handoff = threading.Condition()
_next: Live | None = None
_flusher: threading.Thread | None = None


def _serve() -> None:
    global _next
    while True:
        with _handoff:
            while _next is None:
                _handoff.wait()
            live, _next = _next, None
            live._picked_up = True
        try:
            live._loop()
        finally:
            live._done.set()


def _hand_over(live: Live) -> None:
    global _next, _flusher
    with _handoff:
        if _flusher is None:
            _flusher = threading.Thread(target=_serve, name="flmrun-live", daemon=True)
            _flusher.start()
        _next = live
        _handoff.notify()


def _take_back(live: Live) -> None:
    """Return once the flusher no longer works for ``live``."""
    global _next
    with _handoff:
        if _next is live:  # a quick cell: never picked up
            _next = None
            return
    if live._picked_up:
        live._done.wait()


def warm() -> None:
    """Import the cache client's pyarrow on a thread, with an object cache: a session's first
    live line would otherwise wait for the import (a third of a second, more on a busy machine)."""
    if os.environ.get("FLAME_CACHE_ENDPOINT"):
        threading.Thread(target=_import_flight, name="flmrun-warm-cache", daemon=True).start()


def _import_flight() -> None:
    try:
        import pyarrow.flight  # noqa: F401
    except ImportError:  # the first cache call says so
        pass


def raise_in_thread(ident: int, kind: type[BaseException] | None) -> None:
    """Raise ``kind`` in the thread ``ident`` at its next Python instruction (None: cancel that)."""
    import ctypes

    exc = ctypes.py_object(kind) if kind is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc)


def _on_interrupt(signum: int, frame: Any) -> None:
    live = _armed
    if live is not None and live.interrupting:
        raise KeyboardInterrupt("interrupted from the notebook")


def _install_handler() -> None:
    """Installed once, never removed: a late signal finds a handler that ignores it."""
    global _handler_installed
    if not _handler_installed:
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt)
        _handler_installed = True


class Live:
    """The flusher of one running cell; :meth:`start` and :meth:`stop` on the main thread.

    Parameters
    ----------
    cache
        The object cache the notebook reads.
    prefix
        ``<app>/<session>``.
    channel
        The cell's channel, from its request.
    take
        Returns the outputs shown since its last call (and marks them as sent).
    """

    def __init__(
        self, cache: CacheClient, prefix: str, channel: str, take: Callable[[], list[cell.Output]]
    ) -> None:
        self.cache = cache
        self.out_key = wire.live_output_key(prefix, channel)
        self.ctl_key = wire.live_control_key(prefix, channel)
        self._take = take
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time
        self._picked_up = False
        self._done = threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.get_ident()  # the cell's (start() is called on it)
        self._interrupt_lock = threading.Lock()
        self._raised = False
        self.interrupting = False
        self.failed = False  # the cache refused a patch: the rest comes with the result
        self._created = False  # the notebook reads the object only once it exists
        self._unsent: list[cell.Output] = []

    def start(self) -> None:
        global _armed
        self._thread = threading.get_ident()
        if self._thread == self._main:
            _install_handler()
            _armed = self
        _hand_over(self)

    def stop(self) -> list[cell.Output]:
        """Stop the flusher; return what was not sent (it travels with the result)."""
        global _armed
        with self._interrupt_lock:
            self._stop.set()
            self.interrupting = False
            if self._raised:
                raise_in_thread(self._thread, None)  # not raised yet: the cell ended first
        if _armed is self:
            _armed = None
        _take_back(self)
        return self._unsent

    @property
    def created(self) -> bool:
        """Whether some output went to the channel (the notebook then reads it before the result's)."""
        return self._created

    def flush(self) -> None:
        with self._lock:
            outputs = self._take()
            if self.failed:
                self._unsent.extend(outputs)
                return
            if not outputs:
                return
            data = cell.CellResult(outputs=outputs).SerializeToString()
            try:
                if self._created:
                    self.cache.patch(self.out_key, data)
                else:
                    self.cache.put(self.out_key, data)
                    self._created = True
            except CacheError:
                self.failed = True
                self._unsent.extend(outputs)

    def _loop(self) -> None:
        interrupted_at: float | None = None
        grace = wire.INTERRUPT_GRACE
        control_at = time.monotonic() + wire.LIVE_CONTROL
        while not self._stop.wait(wire.LIVE_FLUSH):
            self.flush()
            if interrupted_at is None:
                if time.monotonic() < control_at:
                    continue
                control_at = time.monotonic() + wire.LIVE_CONTROL
                request = self._control()
                if request is not None:
                    grace = request.grace
                    interrupted_at = time.monotonic()
                    self._interrupt()
            elif time.monotonic() - interrupted_at > grace and not self._stop.is_set():
                self.flush()
                os.write(
                    2,
                    f"flame-magic-runner: the cell ignored the interrupt for {grace:g} s; exiting\n".encode(),
                )
                os._exit(3)

    def _interrupt(self) -> None:
        if self._thread == self._main:
            self.interrupting = True
            signal.pthread_kill(self._main, INTERRUPT_SIGNAL)  # type: ignore[arg-type]
            return
        with self._interrupt_lock:
            if self._stop.is_set():
                return  # the cell has ended
            self.interrupting = self._raised = True
            raise_in_thread(self._thread, KeyboardInterrupt)

    def _control(self) -> cell.Interrupt | None:
        """The notebook's interrupt, if it put one (anything else there is not ours: ignored)."""
        try:
            fetched = self.cache.get(self.ctl_key)
        except (ObjectNotFound, CacheError):
            return None
        if fetched is None or fetched.base is None:
            return None
        try:
            # It holds no pickle: the runner's cloudpickle may differ (Flame's stock flmrun).
            return codec.decode(cell.Interrupt, bytes(fetched.base), "the notebook", same_cloudpickle=False)
        except codec.PayloadError:
            return None
