"""Exceptions a %%flmrun cell raises in the notebook."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from functools import cache
from typing import Any


class RemoteError(Exception):
    """An exception raised by the cell on the Flame runner, rebuilt from data.

    Nothing is unpickled to show it: the runner sends the type name, the message
    and the traceback text. When the remote type is a builtin exception, or a class
    of the cell's derived from builtin ones, the local one is also an instance of
    those, so ``except NameError`` or ``except ValueError`` works.

    Attributes
    ----------
    ename, evalue, remote_traceback
        The remote exception's type name, message and formatted traceback.
    builtin_bases
        The builtin exception classes the remote type derives from, by name.
    """

    def __init__(
        self, ename: str, evalue: str, remote_traceback: str, builtin_bases: tuple[str, ...] = ()
    ) -> None:
        # A class that mirrors a builtin is named after it, so its text is the message alone.
        mirrored = type(self) is not RemoteError
        super().__init__(evalue if mirrored else (f"{ename}: {evalue}" if evalue else ename))
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = remote_traceback
        self.builtin_bases = tuple(builtin_bases)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt by remote_error (its class is made at run time), notes and all: a map's
        # results holding failures can be stored and sent to later cells.
        args = (self.ename, self.evalue, self.remote_traceback, self.builtin_bases)
        return remote_error, args, self.__dict__

    def _render_traceback_(self) -> list[str]:
        # IPython shows these lines instead of a local traceback of the magic.
        lines = self.remote_traceback.rstrip("\n").splitlines()
        return ["Remote traceback (on the Flame runner):", *lines, *_notes(self)]


def _builtin_exception(name: str) -> type[BaseException] | None:
    base = getattr(builtins, name, None)
    # KeyboardInterrupt too: an interrupted cell ends as interrupted, as a local one does.
    if (
        isinstance(base, type)
        and (issubclass(base, Exception) or base is KeyboardInterrupt)
        and base is not Exception
    ):
        return base
    return None


@cache
def _remote_class(ename: str, builtin_bases: tuple[str, ...] = ()) -> type[RemoteError]:
    bases = [base for base in map(_builtin_exception, (ename, *builtin_bases)) if base is not None]
    # The most derived ones: KeyError, not also LookupError (it already is one).
    leaves = [b for b in bases if not any(o is not b and issubclass(o, b) for o in bases)]
    for chosen in (leaves, *([base] for base in bases)):
        if not chosen:
            continue
        try:
            # Named like the remote type, as Jupyter shows the class name.
            kind = type(ename, (RemoteError, *chosen), {"__module__": __name__})
            kind(ename, "", "", ())  # some builtins take other arguments (UnicodeDecodeError)
        except Exception:  # or have C layouts that do not mix: a less derived one, then
            continue
        return kind
    return RemoteError


def remote_error(
    ename: str, evalue: str, remote_traceback: str, builtin_bases: Iterable[str] = ()
) -> RemoteError:
    """A RemoteError that is also an instance of the remote type's builtin exception classes."""
    bases = tuple(builtin_bases)
    return _remote_class(ename, bases)(ename, evalue, remote_traceback, bases)


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

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.results), self.__dict__

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


def _notes(exc: BaseException) -> list[str]:
    # add_note() (Python 3.11+) or a __notes__ list set by hand: shown after the traceback.
    return [str(note) for note in getattr(exc, "__notes__", ())]


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10 (where only our rendering shows it)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]
