"""A runner process started ahead of its first session, so that a notebook's first cell waits less.

Flame's executor manager starts an application process when a session binds an executor.
The embedded Flame does the same, except that for flame-magic's runner it starts one process
as it starts itself, unbound, which the first session of that application then binds (it
sends ``OnSessionEnter`` as to any new process): the process's start, a Python interpreter
and its imports, overlaps with the notebook loading the extension and the user typing. A
spare nobody takes is stopped with the Flame, like every process it started.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from flame_magic import protocol
from flame_magic.embedded.executor import BindError, Instance

log = logging.getLogger(__name__)


class Spares:
    """At most one unbound process per application, for that application's next session.

    Parameters
    ----------
    make
        Builds an :class:`Instance` of an application (its executor id, name, spec and
        ``session_id=""``), as the session manager would for a session.
    spawn
        Runs a coroutine in the background (the session manager's).
    """

    def __init__(self, make: Callable[..., Instance], spawn: Callable[[Any], Any]) -> None:
        self._make = make
        self._spawn = spawn
        self._spares: dict[str, Instance] = {}

    def prepare(self, name: str, spec: protocol.types.ApplicationSpec) -> Any:
        """Start a spare process of application ``name``, if one can start before its session.

        Returns the asyncio task starting it (done once the process is forked), or None.
        """
        if name in self._spares or spec.HasField("url") or not spec.command:
            return None  # an installation needs its session's bind; Flame fails an empty command at bind
        if spec.shim != protocol.types.Host:
            return None
        inst = self._make(executor_id=uuid.uuid4().hex[:12], app_name=name, app_spec=spec)
        self._spares[name] = inst

        async def start() -> None:
            try:
                await inst.start()
            except BindError as err:  # its session's own bind will fail the same way, and say so
                log.info("spare process of %s did not start: %s", name, err)
                self._spares.pop(name, None)

        return self._spawn(start())

    def take(self, name: str, spec: protocol.types.ApplicationSpec) -> Instance | None:
        """The spare of ``name``, if it runs still and its application is unchanged (None otherwise)."""
        inst = self._spares.pop(name, None)
        if inst is None:
            return None
        if inst.app_spec.SerializeToString() != spec.SerializeToString() or inst.returncode is not None:
            self._spawn(inst.release(leave=False))
            return None
        return inst

    def drop(self, name: str) -> None:
        """Stop the spare of ``name`` (its application changed or went)."""
        inst = self._spares.pop(name, None)
        if inst is not None:
            self._spawn(inst.release(leave=False))

    def all(self) -> list[Instance]:
        """The spares not taken (stopped with the Flame)."""
        spares, self._spares = list(self._spares.values()), {}
        return spares
