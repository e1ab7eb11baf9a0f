"""The progress display of ``%%flmrun --map``: done/total (or done, for an iterator) and the rate.

In Jupyter it is one output updated in place (``display_id``), with an HTML ``<progress>``
bar and a text line for frontends without HTML; in a terminal, one line on stderr rewritten
with a carriage return. No widget library is needed.
"""

from __future__ import annotations

import html
import sys
from typing import Any

from flame_magic.items import Progress


def describe(label: str, progress: Progress) -> str:
    """``label: 250/1000 done, 1 failed, 812 items/s, 0.3 s`` (``250 done`` while the total is unknown)."""
    failed = f", {progress.failed} failed" if progress.failed else ""
    count = f"{progress.done}" if progress.total is None else f"{progress.done}/{progress.total}"
    return f"{label}: {count} done{failed}, {progress.rate:,.0f} items/s, {progress.elapsed:.1f} s"


class ProgressDisplay:
    """Shows a map's progress in the cell that runs it.

    Parameters
    ----------
    shell
        The InteractiveShell: in a Jupyter kernel (it has a ``kernel``) the display is
        updated in place, otherwise a text line on stderr is.
    label
        What the map is, e.g. ``--map x=xs``.
    """

    def __init__(self, shell: Any, label: str) -> None:
        self.label = label
        self._jupyter = getattr(shell, "kernel", None) is not None
        self._handle: Any = None
        self._last = ""
        self._line_open = False

    def update(self, progress: Progress) -> None:
        text = describe(self.label, progress)
        if text == self._last:
            return
        self._last = text
        if self._jupyter:
            self._show(progress, text)
        else:
            self._line_open = progress.total is None or progress.done < progress.total
            sys.stderr.write(f"\r{text}{'' if self._line_open else chr(10)}")
            sys.stderr.flush()

    def close(self) -> None:
        """End the terminal line if the map stopped before its end."""
        if self._line_open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._line_open = False

    def _show(self, progress: Progress, text: str) -> None:
        from IPython.display import display

        # Without a total the bar is an indeterminate one (no value): the text counts.
        bar = "" if progress.total is None else f' value="{progress.done}" max="{max(progress.total, 1)}"'
        bundle = {
            "text/plain": text,
            "text/html": (
                f'<progress{bar} style="width: 20em; vertical-align: middle"></progress> '
                f"<code>{html.escape(text)}</code>"
            ),
        }
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
