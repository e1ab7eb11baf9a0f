"""Exceptions a %%flmrun cell raises in the notebook."""

from __future__ import annotations

import builtins
from functools import cache


class RemoteError(Exception):
    """An exception raised by the cell on the Flame runner, rebuilt from data.

    Nothing is unpickled to show it: the runner sends the type name, the message
    and the traceback text. When the remote type is a builtin exception the
    local one is also an instance of it, so ``except NameError`` works.

    Attributes
    ----------
    ename, evalue, remote_traceback
        The remote exception's type name, message and formatted traceback.
    """

    def __init__(self, ename: str, evalue: str, remote_traceback: str) -> None:
        # A class that mirrors a builtin is named after it, so its text is the message alone.
        mirrored = type(self) is not RemoteError
        super().__init__(evalue if mirrored else (f"{ename}: {evalue}" if evalue else ename))
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = remote_traceback

    def _render_traceback_(self) -> list[str]:
        # IPython shows these lines instead of a local traceback of the magic.
        lines = self.remote_traceback.rstrip("\n").splitlines()
        return ["Remote traceback (on the Flame runner):", *lines, *_notes(self)]


@cache
def _remote_class(ename: str) -> type[RemoteError]:
    base = getattr(builtins, ename, None)
    # KeyboardInterrupt too: an interrupted cell ends as interrupted, as a local one does.
    if (
        isinstance(base, type)
        and (issubclass(base, Exception) or base is KeyboardInterrupt)
        and base is not Exception
    ):
        try:
            # Named like the remote type, as Jupyter shows the class name.
            return type(ename, (RemoteError, base), {"__module__": __name__})
        except TypeError:  # a builtin whose C layout does not mix
            pass
    return RemoteError


def remote_error(ename: str, evalue: str, remote_traceback: str) -> RemoteError:
    """A RemoteError that is also an instance of the remote builtin exception type."""
    return _remote_class(ename)(ename, evalue, remote_traceback)


class CellFailed(Exception):
    """Flame could not run the cell (a dead runner, a session that cannot start...)."""

    def _render_traceback_(self) -> list[str]:
        return [f"CellFailed: {self}", *_notes(self)]


class MapInterrupted(KeyboardInterrupt):
    """A ``%%flmrun --map`` cell was interrupted; the message says what was kept.

    Attributes
    ----------
    results
        The results in input order, ``NOT_DONE`` for items that did not finish.
    """

    def __init__(self, message: str, results: list[object]) -> None:
        super().__init__(message)
        self.results = results

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


def _notes(exc: BaseException) -> list[str]:
    # add_note() (Python 3.11+) or a __notes__ list set by hand: shown after the traceback.
    return [str(note) for note in getattr(exc, "__notes__", ())]


class CellSyntaxError(SyntaxError):
    """A syntax error in a %%flmrun cell, found before anything is sent."""

    def _render_traceback_(self) -> list[str]:
        import traceback

        return [line.rstrip("\n") for line in traceback.format_exception_only(SyntaxError, self)]


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10 (where only our rendering shows it)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]
