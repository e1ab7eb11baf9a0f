"""Capture what a cell writes to file descriptors 1 and 2 (C extensions, subprocesses).

``sys.stdout`` and ``sys.stderr`` only see Python-level writes. While a cell runs,
:class:`FdCapture` puts the write ends of two pipes on fds 1 and 2 (``dup2``), so that
``os.system``, ``subprocess.run`` without redirection, ``os.write(1, ...)`` and ``printf``
in a C extension reach the cell's output too; after the cell the process's own fds (the
runner's log) are put back.

The pipes and one reader thread are set up once per process: a cell only pays for four
``dup2`` calls and a non-blocking read of each pipe. The reader thread forwards what
arrives to the running cell's target, or between cells (a subprocess a cell left running)
to the process's original stream. It reads only while holding a lock, so the main thread
drains the pipes itself, under the same lock, before a cell's result is built and before
each Python-level write of the cell: output written to the fds before a ``print`` comes
before it.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

Target = Callable[[str, str], None]  # (stream name, text)

_NAMES = {1: "stdout", 2: "stderr"}
_CHUNK = 65536


def _libc_fflush() -> Callable[[], Any] | None:
    try:
        fflush = ctypes.CDLL(None).fflush
    except (OSError, AttributeError):
        return None
    fflush.argtypes = [ctypes.c_void_p]
    fflush.restype = ctypes.c_int
    return lambda: fflush(None)


class FdCapture:
    """Pipes on fds 1 and 2 while a cell runs; see the module's description."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._target: Target | None = None
        self._saved: dict[int, int] = {}  # fd -> a duplicate of the process's own
        self._write_ends: dict[int, int] = {}  # fd -> pipe write end
        self._read_ends: dict[int, int] = {}  # pipe read end -> fd
        self._decoders: dict[int, Any] = {}
        self._active = False
        self._fflush = _libc_fflush()
        for fd in (1, 2):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_inheritable(saved, False)
            self._saved[fd] = saved
            self._write_ends[fd] = write_end
            self._read_ends[read_end] = fd
            self._decoders[fd] = codecs.getincrementaldecoder("utf-8")("replace")
        # One poll object per thread: a poll object refuses concurrent use.
        self._poll = select.poll()
        self._check = select.poll()
        for read_end in self._read_ends:
            self._poll.register(read_end, select.POLLIN)
            self._check.register(read_end, select.POLLIN)
        threading.Thread(target=self._read_forever, name="fd-capture", daemon=True).start()

    def start(self, target: Target) -> None:
        """Send what is written to fds 1 and 2 to ``target`` until :meth:`stop`."""
        if self._active:
            self.stop()  # an interrupt stopped the last stop() half-way
        self._flush_python()
        with self._lock:
            self._target = target
            self._active = True  # before the switch: stop() then undoes a half-done one
            for fd, write_end in self._write_ends.items():
                # What fd is now (the log, or a test's capture) is what it gets back.
                os.dup2(fd, self._saved[fd], inheritable=False)
                os.dup2(write_end, fd)

    def stop(self) -> None:
        """Put the process's fds back and hand everything written so far to the target."""
        if not self._active:
            return
        self._flush_python()
        if self._fflush is not None:
            self._fflush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
        self._active = False
        with self._lock:
            self._drain_locked(final=True)
            self._target = None

    def drain(self) -> None:
        """Hand what is in the pipes now to the target (called before a Python-level write)."""
        if os.getpid() != self._pid:
            return  # a forked child: the parent's reader owns the pipes (and its lock may be held)
        if self._fflush is not None:
            self._fflush()  # C stdio buffers fully when fd 1 is a pipe: printf before print
        with self._lock:
            self._drain_locked()

    def _flush_python(self) -> None:
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass

    def _drain_locked(self, final: bool = False) -> None:
        # One system call when nothing was written, the common case.
        for read_end, _ in self._check.poll(0):
            self._read_locked(read_end, self._read_ends[read_end])
        if final:
            for fd, decoder in self._decoders.items():
                if decoder.getstate()[0]:  # an incomplete UTF-8 sequence at the end
                    self._emit(fd, decoder.decode(b"", final=True))

    def _read_locked(self, read_end: int, fd: int) -> None:
        while True:
            try:
                data = os.read(read_end, _CHUNK)
            except BlockingIOError:
                return
            except OSError:
                return
            if not data:
                return
            self._emit(fd, self._decoders[fd].decode(data))
            if len(data) < _CHUNK:
                return

    def _emit(self, fd: int, text: str) -> None:
        if not text:
            return
        target = self._target
        if target is not None:
            try:
                target(_NAMES[fd], text)
                return
            except Exception:
                pass
        # Between cells: to the process's own stream (the log).
        try:
            os.write(self._saved[fd], text.encode("utf-8", "replace"))
        except OSError:
            pass

    def _read_forever(self) -> None:
        while True:
            try:
                ready = self._poll.poll()
            except InterruptedError:
                continue
            with self._lock:
                for read_end, _ in ready:
                    self._read_locked(read_end, self._read_ends[read_end])


_capture: FdCapture | None = None
_failed = False


def fd_capture() -> FdCapture | None:
    """The process's capture, created on first use; None where fds 1 and 2 cannot be captured."""
    global _capture, _failed
    if _capture is None and not _failed:
        try:
            _capture = FdCapture()
        except OSError:
            _failed = True
    return _capture
