"""What a running cell shows: its streams, its displays and its figures, in order.

:class:`Recorder` keeps what one cell showed; :class:`Stream` is ``sys.stdout`` or
``sys.stderr`` for cells; :func:`make_publisher` makes IPython's ``display()`` record into
the running cell's recorder; :func:`flush_figures` shows the figures a cell left open.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from flame_magic.protocol import cell

from .text import clean, safe_repr, safe_str, type_name, utf8_len


class Recorder:
    """What one cell showed, in order: stream text (merged per run) and display bundles."""

    def __init__(self, stream_limit: int) -> None:
        # Cells may print from their own threads.
        self._lock = threading.Lock()
        self.items: list[tuple[str, list[str]] | cell.MimeBundle] = []
        self._room = stream_limit  # characters; bounds memory for a cell that prints forever
        self.dropped = 0  # UTF-8 bytes of stream text not kept
        self._sent: tuple[int, int] = (0, 0)  # what take() gave: (item, parts or 1) of the last one

    def write(self, name: str, text: str) -> None:
        with self._lock:
            if len(text) > self._room:
                self.dropped += utf8_len(text[self._room :])
                text = text[: self._room]
                if not text:
                    return
            self._room -= len(text)
            last = self.items[-1] if self.items else None
            if isinstance(last, tuple) and last[0] == name:
                last[1].append(text)
            else:
                self.items.append((name, [text]))

    def display(self, bundle: cell.MimeBundle) -> None:
        with self._lock:
            self.items.append(bundle)

    def take(self) -> list[cell.Output]:
        """What was shown since the last call, in order (all of it the first time)."""
        with self._lock:
            taken: list[cell.Output] = []
            first, done = self._sent
            for index in range(first, len(self.items)):
                item = self.items[index]
                if isinstance(item, tuple):
                    text = "".join(item[1][done if index == first else 0 :])
                    if text:
                        taken.append(cell.Output(stream=cell.Stream(name=item[0], text=clean(text))))
                elif index != first or done == 0:
                    taken.append(cell.Output(display=item))
            if self.items:
                last = self.items[-1]
                self._sent = (len(self.items) - 1, len(last[1]) if isinstance(last, tuple) else 1)
            return taken


class Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` for cells: to the running cell's recorder, if any.

    One object per stream for the life of the process, like ipykernel's: a logging
    handler or thread a cell set up keeps writing to whichever cell is running, and
    between cells to the stream the process had (the executor's log).
    """

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name: str, fallback: TextIO) -> None:
        super().__init__()
        self._name = name
        self.fallback = fallback
        self.recorder: Recorder | None = None
        # Called before recording: hands over what reached fds 1 and 2 first (fd capture).
        self.sync: Callable[[], None] | None = None

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        recorder = self.recorder
        if recorder is None:
            return self.fallback.write(text)
        if text:
            sync = self.sync
            if sync is not None:
                sync()
            recorder.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        if self.recorder is None:
            self.fallback.flush()


def make_publisher(shell: Any) -> Any:
    """A display publisher for ``shell`` that hands bundles to the current cell's recorder."""
    from IPython.core.displaypub import DisplayPublisher

    class RecordingPublisher(DisplayPublisher):  # type: ignore[misc]
        recorder: Recorder | None = None

        def publish(
            self,
            data: dict[str, Any],
            metadata: dict[str, Any] | None = None,
            source: Any = None,
            *,
            transient: Any = None,
            update: bool = False,
            **kwargs: Any,
        ) -> None:
            # Updates of an earlier display (display_id) arrive as new displays: the
            # notebook shows a remote cell's outputs once, when it finishes.
            if self.recorder is not None:
                self.recorder.display(mime_bundle(data, metadata))

        def clear_output(self, wait: bool = False) -> None:
            # The base class prints an ANSI escape; a remote cell has no area to clear.
            pass

    return RecordingPublisher(parent=shell, shell=shell)


def mime_bundle(data: dict[str, Any], metadata: dict[str, Any] | None) -> cell.MimeBundle:
    """A display bundle as JSON text; bytes (e.g. PNG data) become base64, as Jupyter sends them."""
    return cell.MimeBundle(
        data_json=json.dumps(data, default=_json_default),
        metadata_json=json.dumps(metadata or {}, default=_json_default),
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return safe_repr(value)


def flush_figures() -> None:
    """Show the cell's matplotlib figures as PNG displays and close them, as a local cell does."""
    backend = sys.modules.get("matplotlib_inline.backend_inline")
    if backend is None:
        return
    try:
        backend.flush_figures()
    except Exception as exc:
        sys.stderr.write(f"matplotlib figures could not be shown: {type_name(exc)}: {safe_str(exc)}\n")
