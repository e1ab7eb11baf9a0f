"""A notebook's link to Flame: which Flame, which session, and running one cell there.

This is the engine behind the magics. It knows Flame (through the client) and
the envelope (through the codec); it does not present anything.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flame_magic import codec
from flame_magic.capture import ShipError, check_size
from flame_magic.client import FlameClient, FlameError, SessionStartError, failure_message, new_session_id
from flame_magic.config import Target
from flame_magic.errors import CellFailed
from flame_magic.protocol import MAX_MESSAGE_BYTES, cell, types

if TYPE_CHECKING:
    from flame_magic.embedded import EmbeddedFlame

# Room left in a task for Flame's own envelope around our bytes.
ENVELOPE_MARGIN = 64 * 1024
TASK_INPUT_LIMIT = MAX_MESSAGE_BYTES - ENVELOPE_MARGIN


@dataclass
class SessionInfo:
    """One line of ``%flame status``."""

    session_id: str
    application: str
    state: str
    pending: int
    running: int
    succeed: int
    failed: int
    cancelled: int


class Connection:
    """The Flame this notebook uses, started or reached on first need.

    Parameters
    ----------
    target
        The cluster to use, or the embedded Flame.
    application
        The Flame application whose processes run the cells.
    connect_timeout
        Seconds to wait for the session manager before giving up.
    """

    def __init__(self, target: Target, application: str, connect_timeout: float) -> None:
        self.target = target
        self.application = application
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._embedded: EmbeddedFlame | None = None
        self._client: FlameClient | None = None
        self._session_id: str | None = None
        self.session_ids: list[str] = []

    def use_application(self, application: str) -> None:
        """Run the next cells on another application, in a new session."""
        with self._lock:
            self.application = application
            self._session_id = None

    @property
    def endpoint(self) -> str:
        return self._client.endpoint if self._client else self.target.endpoint

    def client(self) -> FlameClient:
        """The Frontend client, starting the embedded Flame when no cluster is configured."""
        with self._lock:
            if self._client is None:
                endpoint = self.target.endpoint
                if self.target.embedded:
                    from flame_magic.embedded import EmbeddedFlame

                    embedded = EmbeddedFlame.start(working_directory=os.getcwd())
                    self._embedded = embedded
                    endpoint = embedded.endpoint
                client = FlameClient(endpoint, self.target.ca_file)
                try:
                    client.wait_ready(self.connect_timeout)
                except FlameError:
                    client.close()
                    raise
                self._client = client
            return self._client

    def session(self) -> str:
        """This notebook's open session of the application, opened on first use."""
        with self._lock:
            if self._session_id is None:
                client = self.client()
                if client.get_application(self.application) is None:
                    raise FlameError(
                        f"Flame at {client.endpoint} has no application {self.application!r}. Register "
                        "flame-magic's runner there (README: 'Running on a Flame cluster'), or choose "
                        "another with `%config FlameMagics.application = 'NAME'`."
                    )
                session_id = new_session_id(self.application)
                spec = types.SessionSpec(
                    application=self.application,
                    common_data=codec.encode(cell.SessionHello(header=codec.local_header())),
                    # One warm runner keeps the notebook's remote state (imports) between cells.
                    min_instances=1,
                    max_instances=1,
                    batch_size=1,
                )
                client.open_session(session_id, spec)
                self._session_id = session_id
                self.session_ids.append(session_id)
            return self._session_id

    def run(self, request: cell.CellRequest) -> cell.CellResult:
        """Run one cell as a task of this notebook's session and return its result."""
        check_size(request, TASK_INPUT_LIMIT)
        data = codec.encode(request)
        client = self.client()
        session_id = self.session()
        try:
            task = client.create_task(session_id, data)
        except FlameError:
            if not self._session_gone(session_id):
                raise
            self._session_id = None  # closed behind our back: a fresh one, once
            session_id = self.session()
            task = client.create_task(session_id, data)
        try:
            task = client.wait_task(session_id, task.metadata.id)
        except SessionStartError as exc:
            self._abandon(session_id)
            raise CellFailed(
                f"{exc}. The session was closed; fix the runner's environment and run the cell again."
            ) from None
        return self._result(task)

    def _result(self, task: types.Task) -> cell.CellResult:
        state = task.status.state
        if task.spec.HasField("output") and task.spec.output:
            try:
                return codec.decode(cell.CellResult, task.spec.output, "the Flame runner")
            except codec.PayloadError as exc:
                raise CellFailed(str(exc)) from None
        if state == types.Cancelled:
            raise CellFailed(
                "The cell's task was cancelled because its session was closed. Run the cell again: "
                "a new session starts."
            )
        message = failure_message(task) or "no message"
        raise CellFailed(
            f"Flame could not run the cell: {message}. If the runner process died, what it held "
            "(imports, definitions) is gone: the next cell starts on a fresh runner."
        )

    def _session_gone(self, session_id: str) -> bool:
        try:
            return self.client().get_session(session_id).status.state == types.Closed
        except FlameError:
            return True

    def _abandon(self, session_id: str) -> None:
        self._session_id = None
        try:
            self.client().close_session(session_id)
        except FlameError:
            pass

    def sessions(self) -> list[SessionInfo]:
        """This notebook's sessions as Flame reports them."""
        if self._client is None:
            return []
        mine = set(self.session_ids)
        infos = []
        for session in self._client.list_sessions():
            if session.metadata.id in mine:
                status = session.status
                infos.append(
                    SessionInfo(
                        session_id=session.metadata.id,
                        application=session.spec.application,
                        state=types.SessionState.Name(status.state),
                        pending=status.pending,
                        running=status.running,
                        succeed=status.succeed,
                        failed=status.failed,
                        cancelled=status.cancelled,
                    )
                )
        return infos

    def close_sessions(self) -> list[str]:
        """Close this notebook's open sessions; return the ids closed."""
        closed = []
        for info in self.sessions():
            if info.state == "Open":
                try:
                    self._client.close_session(info.session_id)  # type: ignore[union-attr]
                    closed.append(info.session_id)
                except FlameError:
                    pass  # closed meanwhile, or a task still runs: Flame keeps it open
        self._session_id = None
        return closed

    def shutdown(self) -> None:
        """Close the sessions and stop the embedded Flame, if this notebook started one."""
        with self._lock:
            try:
                self.close_sessions()
            finally:
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if self._embedded is not None:
                    self._embedded.stop()
                    self._embedded = None


__all__ = ["Connection", "SessionInfo", "ShipError", "TASK_INPUT_LIMIT"]
