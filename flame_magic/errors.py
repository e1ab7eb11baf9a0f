"""Every exception the notebook side raises, in one hierarchy.

Nothing here imports the rest of flame-magic, so every layer can raise these (the stock
runner's evaluator takes this module with it, as source)::

    FlameMagicError
    ├── UsageProblem          the cell or its options cannot be sent as written (one line)
    │   ├── ConfigError       the Flame configuration cannot be used as written
    │   ├── RequestError      an option value Flame cannot take
    │   └── ShipError         a value or module that cannot travel
    ├── PayloadError          a payload that is not ours, or of incompatible versions
    ├── UnpicklableError      a value cloudpickle cannot serialise
    ├── TooLargeError         a pickle over the size it was allowed
    ├── FlameError            Flame (or its object cache) refused, or could not be reached
    │   ├── SessionStartError     the application could not start a session
    │   │   └── RunnerStartTimeout    no runner came up within the start timeout
    │   ├── SessionGoneError      the session was closed or deleted by someone else
    │   ├── PythonMismatch        the runner's Python minor version is not the notebook's
    │   └── CacheError            the object cache refused or could not be reached
    │       └── ObjectNotFound        no object under that key
    ├── WaitStopped           a wait given up because its stop event was set (not a failure)
    ├── CellFailed            Flame could not run the cell: what a user sees of a FlameError
    └── RemoteError           the cell raised on its runner (also an instance of its builtin type)
    MapInterrupted            a --map cell interrupted (a KeyboardInterrupt, not an error)

The magics turn these into what a user sees in one place (``flame_magic.magics``):
a :class:`UsageProblem` is IPython's one-line ``UsageError``, a :class:`FlameError` a
:class:`CellFailed`; the others show their own rendering. The embedded Flame's own errors
(its gRPC statuses, binds, installs) live in :mod:`flame_magic.embedded.errors`.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from functools import cache
from typing import Any


class FlameMagicError(Exception):
    """The base of every exception flame-magic raises in the notebook."""


class UsageProblem(FlameMagicError):
    """The cell or its options cannot be sent as written; the message says what to do."""


class ConfigError(UsageProblem):
    """The Flame configuration cannot be used as written."""


class RequestError(UsageProblem, ValueError):
    """An option value that cannot be sent to Flame; the message says what is accepted."""


class RequirementError(RequestError):
    """A ``--pip`` requirement that cannot be installed as given; the message says what is accepted."""


class ShipError(UsageProblem):
    """The cell cannot be sent as it is; the message says what to do."""


class PayloadError(FlameMagicError):
    """A payload that is not ours, or was written by incompatible versions."""


class UnpicklableError(FlameMagicError):
    """A value that cloudpickle cannot serialise."""


class TooLargeError(FlameMagicError):
    """A value whose pickle would pass the size it was allowed."""


class FlameError(FlameMagicError):
    """Flame refused a request or could not be reached; the message says what to do."""


class SessionStartError(FlameError):
    """The application could not start a session (Flame events 1001/1002)."""


class RunnerStartTimeout(SessionStartError):
    """No runner of the session's application came up within the start timeout."""


class SessionGoneError(FlameError):
    """The session was closed or deleted by someone else (flmctl, an administrator)."""


class PythonMismatch(FlameError):
    """The runner's Python minor version is not the notebook's.

    Attributes
    ----------
    python
        The runner's ``major.minor``.
    """

    def __init__(self, message: str, python: str) -> None:
        super().__init__(message)
        self.python = python


class CacheError(FlameError):
    """The object cache refused a request or could not be reached; the message says what to do."""

    def _render_traceback_(self) -> list[str]:
        return [f"CacheError: {self}"]


class ObjectNotFound(CacheError):
    """The cache holds no object under the key (never put, deleted, or evicted)."""


class DigestMismatch(CacheError):
    """What the object cache gave for a value is not what was sent: nothing of it was loaded."""


class WaitStopped(FlameMagicError):
    """A wait for a task was given up because its ``stop`` event was set (the task goes on)."""


class RemoteError(FlameMagicError):
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


class CellFailed(FlameMagicError):
    """Flame could not run the cell (a dead runner, a session that cannot start...)."""

    def _render_traceback_(self) -> list[str]:
        return [f"CellFailed: {self}", *_notes(self)]


class MapInterrupted(KeyboardInterrupt):
    """A ``%%flmrun --map`` cell was interrupted; the message says what was kept.

    A KeyboardInterrupt, outside :class:`FlameMagicError` on purpose: ``except Exception``
    must not swallow an interrupt.

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
