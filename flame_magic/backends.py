"""The two kinds of runner a cell can reach, behind one small interface.

A cell always travels as a ``CellRequest`` and comes back as a ``CellResult`` (the
envelope of :mod:`flame_magic.codec`). What differs between runner applications is how
that envelope is wrapped for Flame:

- flame-magic's runner (``python -m flame_magic_runner``, :class:`OwnRunner`) takes the
  envelope itself as the task's input and gives the result as its output; the session's
  common data is a hello with the notebook's versions, checked at session enter.
- Flame's stock ``flmrun`` (flamepy's runner, :class:`flame_magic.stock.StockRunner`) runs
  a flamepy object: the envelope goes inside flamepy's payloads, the result comes back
  through the object cache, and the evaluator itself travels with the session.

:class:`~flame_magic.remote.Connection` picks one per session from the application's spec
(:func:`backend_for`) and goes through it for everything that differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from flame_magic import codec
from flame_magic.applications import is_stock_runner
from flame_magic.protocol import cell, types

if TYPE_CHECKING:
    from flame_magic.cache import CacheClient
    from flame_magic.client import FlameClient


class Backend(Protocol):
    """How the notebook speaks to one kind of runner application."""

    #: For ``%flame status`` and messages, e.g. "flame-magic's runner".
    path: str
    #: Whether the runner's cloudpickle must be the notebook's (see :func:`codec.check_header`).
    same_cloudpickle: bool

    def common_data(self, application: str, session_id: str) -> bytes:
        """The session's common data, sent when it is opened."""
        ...

    def started(self, client: FlameClient, application: str, session_id: str) -> list[str]:
        """Check a just-opened session's runner; return notes for the user.

        Raises
        ------
        flame_magic.client.FlameError
            If the runner cannot run this notebook's cells (the caller closes the session).
        """
        ...

    def task_input(self, data: bytes) -> bytes:
        """A task's input for an encoded ``CellRequest``."""
        ...

    def cell_result(self, task: types.Task) -> bytes | None:
        """The encoded ``CellResult`` of a finished task, or None if the runner gave none."""
        ...


class OwnRunner:
    """flame-magic's own runner: the envelope is the task's input and output."""

    path = "flame-magic's runner"
    same_cloudpickle = True

    def common_data(self, application: str, session_id: str) -> bytes:
        return codec.encode(cell.SessionHello(header=codec.local_header()))

    def started(self, client: FlameClient, application: str, session_id: str) -> list[str]:
        return []  # the runner checks the hello itself, at session enter

    def task_input(self, data: bytes) -> bytes:
        return data

    def cell_result(self, task: types.Task) -> bytes | None:
        if task.spec.HasField("output") and task.spec.output:
            return task.spec.output
        return None


OWN_RUNNER = OwnRunner()


def backend_for(spec: types.ApplicationSpec, cache: CacheClient | None) -> Backend:
    """The backend for an application: Flame's flmrun when it runs flamepy's runner, else ours.

    Raises
    ------
    flame_magic.client.FlameError
        For flamepy's runner without an object cache, which it cannot run without.
    """
    if not is_stock_runner(spec):
        return OWN_RUNNER
    from flame_magic.stock import StockRunner

    return StockRunner.for_cache(cache)
