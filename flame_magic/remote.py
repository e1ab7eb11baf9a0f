"""A notebook's link to Flame: which Flame, its object cache, and the notebook's sessions.

:class:`Connection` starts the embedded Flame or reaches a cluster, opens the sessions
cells ask for (by :class:`~flame_magic.sessions.SessionKey`), reuses, replaces and closes
them, and keeps what each session stored in the object cache (the shippers of
:mod:`flame_magic.transfer`). Running a cell in one of them is :mod:`flame_magic.runs`'s;
the public API over both is :mod:`flame_magic.engine`. Nothing here presents anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flame_magic import codec, environments, wire
from flame_magic.applications import automatic_application, check_application, is_stock_runner
from flame_magic.backends import OWN_RUNNER, Backend, backend_for
from flame_magic.cache import CacheClient, ObjectRef
from flame_magic.client import FlameClient, new_session_id
from flame_magic.config import Target, resolve_cache
from flame_magic.errors import (
    CacheError,
    FlameError,
    PayloadError,
    PythonMismatch,
    RequestError,
    SessionStartError,
)
from flame_magic.modules import Environment
from flame_magic.protocol import cell, types
from flame_magic.sessions import DEFAULT, Closing, SessionInfo, SessionKey, fits
from flame_magic.stock import ensure_python_copy, python_copy_name
from flame_magic.transfer import Shipper, blobs

#: ``FlameMagics.application`` for "choose": see :func:`automatic_application`.
AUTOMATIC = ""

if TYPE_CHECKING:
    from flame_magic.embedded import EmbeddedFlame


class Connection:
    """The Flame this notebook uses, started or reached on first need.

    Parameters
    ----------
    target
        The cluster to use, or the embedded Flame.
    application
        The Flame application whose processes run the cells; ``""`` (:data:`AUTOMATIC`)
        picks one when first needed (see :func:`automatic_application`).
    connect_timeout
        Seconds to wait for the session manager before giving up.
    client
        A Frontend client already connected to ``target`` (unit tests give a fake Flame).
    """

    def __init__(
        self, target: Target, application: str, connect_timeout: float, client: FlameClient | None = None
    ) -> None:
        self.target = target
        #: The application asked for: a name, or AUTOMATIC.
        self.requested = application
        self._application = application or None
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._embedded: EmbeddedFlame | None = None
        self._client: FlameClient | None = client
        self._session_id: str | None = None
        # Sessions other than the default one, by what they were opened for (--session, --map...).
        self._keyed: dict[SessionKey, str] = {}
        self.session_ids: list[str] = []
        self.labels: dict[str, str] = {}
        self._cache: CacheClient | None = None
        self._cache_resolved = False
        self._shippers: dict[str, Shipper] = {}  # by session id: what each session stored
        # By session id: how to speak to its runner, and the application it runs (which may be
        # a copy of the configured one for this notebook's Python: see flame_magic.stock).
        self._backends: dict[str, Backend] = {}
        self._applications: dict[str, str] = {}
        self._python_copies: dict[str, str] = {}  # configured application -> its copy in use
        self._installing: set[str] = set()  # sessions of --pip environments (see flame_magic.environments)
        # Why a key's last session was given up (its runner died): said once, by the next cell.
        self._lost: dict[SessionKey, str] = {}
        #: Seconds a new session's runner may take to come up (0: no limit); see PendingWatch.
        self.start_timeout = 60.0
        #: Seconds between two reads of a running cell's live output (0: automatic, see live_period).
        self.live_poll = 0.0
        #: Called with a note for the user (the magics print it), e.g. when a session was replaced.
        self.notify: Callable[[str], None] = lambda message: None
        #: The notebook's modules and the packages cells need (see flame_magic.modules).
        self.environment = Environment(notify=lambda message: self.notify(message))

    @property
    def application(self) -> str:
        """The application cells run on: the one asked for, or the automatic choice."""
        with self._lock:
            if self._application is None:
                self._application = automatic_application(self.client())
            return self._application

    def use_application(self, application: str) -> None:
        """Run the next cells on another application (AUTOMATIC: choose again), in a new session."""
        with self._lock:
            self.requested = application
            self._application = application or None
            self._session_id = None
            self._keyed.clear()
            self._lost.clear()

    @property
    def live_period(self) -> float:
        """Seconds between two reads of a running cell's live output: on this machine's embedded
        Flame a line shows within a tenth of a second; on a cluster every read is a network call."""
        if self.live_poll > 0:
            return self.live_poll
        return wire.EMBEDDED_LIVE_POLL if self.target.embedded else wire.LIVE_POLL

    @property
    def endpoint(self) -> str:
        if self._embedded is not None and not self._embedded.running:
            return ""  # stopped: a new one starts on next use
        return self._client.endpoint if self._client else self.target.endpoint

    def client(self) -> FlameClient:
        """The Frontend client, starting the embedded Flame when no cluster is configured.

        An embedded Flame that stopped (killed, crashed) is replaced by a new one, with a note.
        """
        with self._lock:
            self.drop_stopped_embedded("this runs on a new one")
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

    def current_client(self) -> FlameClient | None:
        """The Frontend client in use, without connecting (None before the first call, or after shutdown)."""
        return self._client

    def drop_stopped_embedded(self, then: str, wait: float = 0.0) -> bool:
        """Forget an embedded Flame that stopped and all it held, so that the next call starts anew.

        ``wait``: seconds to give one that is dying (a call to it just broke) to be gone.
        """
        with self._lock:
            embedded = self._embedded
            if embedded is None or not embedded.stopped(within=wait):
                return False
            status = embedded.exit_status
            if self._client is not None:
                self._client.close()
            if self._cache is not None:
                self._cache.close()
            self._client, self._cache, self._cache_resolved = None, None, False
            self._session_id = None
            self._keyed.clear()
            self._shippers.clear()
            self.session_ids.clear()
            self.labels.clear()
            self._embedded = None
            embedded.stop()  # removes what it left in its state directory
            self.notify(
                f"The embedded Flame had stopped (exit status {status}), and what its runners held "
                f"(imports, definitions, values) is lost; {then}."
            )
            return True

    def cache(self) -> CacheClient | None:
        """Flame's object cache, if this Flame has one (the embedded Flame has its own)."""
        with self._lock:
            self.drop_stopped_embedded("this runs on a new one")
            if not self._cache_resolved:
                self.client()  # the embedded Flame says where its cache is once started
                if self._embedded is not None:
                    endpoint = self._embedded.cache_endpoint
                    if endpoint:
                        self._cache = CacheClient(endpoint, storage=self._embedded.cache_storage)
                else:
                    found = resolve_cache(self.target.context)
                    if found is not None:
                        self._cache = CacheClient(found.endpoint, found.ca_file, found.storage)
                self._cache_resolved = True
            return self._cache

    def shipper(self, key: SessionKey = DEFAULT) -> Shipper:
        """How values reach the session for ``key``: large ones by reference through the cache.

        With a cache, the session is opened now: the values are stored under its name.
        """
        if self.cache() is None:
            return Shipper(None, None)
        return self.shipper_for(self.session(key))

    def shipper_for(self, session_id: str) -> Shipper:
        with self._lock:
            if session_id not in self._shippers:
                application = self._applications.get(session_id, self.application)
                prefix = wire.session_prefix(application, session_id)
                self._shippers[session_id] = Shipper(self.cache(), prefix)
            return self._shippers[session_id]

    def load(self, value: cell.Value) -> Any:
        """A value the runner sent back, fetched from the object cache if it came by reference.

        Raises
        ------
        CacheError
            If the cache does not give its data.
        """
        found = blobs([value])
        if not found:
            return codec.loads(value.pickle)
        cached = [blob for blob in found if blob.refs]
        if not cached:  # all in shared-memory segments: no session's objects to remember
            return Shipper(self.cache(), None).load(value)
        prefix = ObjectRef.decode(cached[0].refs[0]).key.rsplit("/", 1)[0]
        with self._lock:
            shipper = next((s for s in self._shippers.values() if s.key_prefix == prefix), None)
        # The session's shipper remembers the blobs: sent back unchanged, they are not stored again.
        return (shipper or Shipper(self.cache(), None)).load(value)

    def _delete_objects(self, session_id: str) -> None:
        """Delete what a closed session left in the object cache (both sides' values)."""
        with self._lock:
            shipper = self._shippers.pop(session_id, None)
        if shipper is not None and shipper.enabled:
            try:
                shipper.delete_all()
            except CacheError as exc:
                self.notify(f"the values of session {session_id} stay in Flame's object cache: {exc}")

    def session(self, key: SessionKey = DEFAULT) -> str:
        """This notebook's open session for ``key``, opened on first use and then reused.

        The default key is the notebook's own session: one warm runner that keeps the
        notebook's remote state (imports) between cells.
        """
        with self._lock:
            self.drop_stopped_embedded("this runs on a new one")
            if key == DEFAULT:
                if self._session_id is None:
                    self._session_id = self.open_session(key)
                    self._tell_lost(key, self._session_id)
                return self._session_id
            if key not in self._keyed:
                self._keyed[key] = self.open_session(key)
                self._tell_lost(key, self._keyed[key])
            return self._keyed[key]

    def _tell_lost(self, key: SessionKey, session_id: str) -> None:
        note = self._lost.pop(key, None)
        if note is not None:
            self.notify(f"{note}; this cell runs in a new session, {session_id}.")

    def give_up(self, session_id: str, reason: str) -> None:
        """Never use ``session_id`` again: its runner died (Flame 0.6 keeps sending it tasks).

        The next cell for the same key (default, ``--session NAME``...) opens a new
        session and says, once, that what the runner held is gone.
        """
        reason = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
        with self._lock:
            keys = [k for k, v in self._keyed.items() if v == session_id]
            if self._session_id == session_id:
                keys.append(DEFAULT)
            for key in keys:
                name = f"{key.name!r} ({session_id})" if key.name else session_id
                self._lost[key] = (
                    f"the runner of session {name} died ({reason}): what earlier cells left on it "
                    "(imports, definitions) is gone"
                )
            self.forget(session_id)

    def idle_maps(self, waiting: str) -> list[str]:
        """This notebook's ``--map`` sessions kept for the next map (no warm runner), but ``waiting``."""
        with self._lock:
            return [v for k, v in self._keyed.items() if k.name is None and k.warm == 0 and v != waiting]

    def describe(self, session_id: str) -> str | None:
        """How to name one of this notebook's open sessions to the user, and how to close it."""
        with self._lock:
            if session_id not in self.session_ids:
                return None
            if self._session_id == session_id:
                return f"the default session {session_id} (`%flame close`)"
            key = next((k for k, v in self._keyed.items() if v == session_id), None)
            if key is not None and key.name is not None:
                return f"session {key.name!r} {session_id} (`%flame close {key.name}`)"
            label = self.labels.get(session_id)
            return f"{label} {session_id}" if label else session_id

    def open_session(self, key: SessionKey) -> str:
        """Open a new Flame session as ``key`` describes (not remembered for reuse: see :meth:`session`).

        On Flame's flmrun the session's runner is probed first (see :mod:`flame_magic.stock`).

        Raises
        ------
        RequestError
            If no node of this Flame can hold one instance with the resources asked for.
        FlameError
            If the application cannot run this notebook's cells; the message says what to do.
        """
        client = self.client()
        name = self.runner_application()
        application = client.get_application(name)
        problem = check_application(application, name, client.endpoint)
        if problem:
            raise FlameError(problem)
        assert application is not None
        if key.requirements:  # --pip: the same runner, as an application that installs them
            application = environments.ensure(
                client, self.cache(), name, application, key.requirements, self.notify
            )
            name = application.metadata.name
        backend = backend_for(application.spec, self.cache() if is_stock_runner(application.spec) else None)
        if key.resources.given:
            too_big = fits(key.resources, client.list_nodes())
            if too_big:
                raise RequestError(too_big)
        prefix = self.application if key.name is None else f"{self.application}-{key.name}"
        session_id = new_session_id(prefix)
        with self._lock:
            self._backends[session_id] = backend
            self._applications[session_id] = name
            if key.requirements:
                self._installing.add(session_id)
        if backend is not OWN_RUNNER:
            self.shipper_for(session_id)  # its objects (the evaluator, results) go when it closes
        try:
            client.open_session(session_id, key.spec(name, backend.common_data(name, session_id)))
        except FlameError:
            self._delete_objects(session_id)  # the evaluator stored for it, on flmrun
            raise
        with self._lock:
            self.session_ids.append(session_id)
            if key.label():
                self.labels[session_id] = key.label()
        try:
            notes = backend.started(client, name, session_id)
        except PythonMismatch as exc:
            self.abandon(session_id)
            if name != self.application:
                raise FlameError(
                    f"{exc} (The copy {name!r} of {self.application!r} with FLAME_PYTHON_VERSION="
                    f"{codec.PYTHON_VERSION} still runs Python {exc.python}.)"
                ) from None
            registered = ensure_python_copy(client, name, application.spec)
            copy = python_copy_name(name)
            self._python_copies[self.application] = copy
            done = "registered" if registered else "uses"
            self.notify(
                f"Flame's {name!r} runs Python {exc.python}, this notebook {codec.PYTHON_VERSION}: this "
                f"notebook {done} {copy!r}, a copy of it with FLAME_PYTHON_VERSION={codec.PYTHON_VERSION}."
            )
            return self.open_session(key)
        except (FlameError, PayloadError) as exc:
            self.abandon(session_id)
            raise FlameError(self.install_failure(session_id, exc) or str(exc)) from None
        for note in notes:
            self.notify(note)
        return session_id

    def install_failure(self, session_id: str, exc: BaseException) -> str | None:
        """The one line for ``session_id`` of a ``--pip`` environment that Flame could not install.

        None when ``exc`` is something else (see :func:`environments.install_failed`).
        """
        application = self._applications.get(session_id)
        if not isinstance(exc, SessionStartError) or application is None:
            return None
        return environments.install_failed(self.client(), self.cache(), application, str(exc))

    def installing(self, session_id: str) -> bool:
        """Whether ``session_id``'s runners wait for Flame to install ``--pip`` packages first."""
        return session_id in self._installing

    def application_of(self, session_id: str) -> str:
        """The application ``session_id`` was opened with (its ``--pip`` one, if any)."""
        return self._applications.get(session_id, self.application)

    def runner_application(self) -> str:
        """The application the notebook's sessions open: :attr:`application`, or its copy for
        this notebook's Python (see :func:`flame_magic.stock.ensure_python_copy`)."""
        return self._python_copies.get(self.application, self.application)

    def backend(self, session_id: str) -> Backend:
        """How this notebook speaks to the runner of ``session_id``."""
        with self._lock:
            return self._backends.get(session_id, OWN_RUNNER)

    def named(self, name: str) -> SessionKey | None:
        """The key of the open named session ``name``, if this notebook has one."""
        with self._lock:
            return next((key for key in self._keyed if key.name == name), None)

    def close_session(self, session_id: str) -> bool:
        """Close one of this notebook's sessions now (pending tasks are cancelled).

        Returns False, and the session stays in use, when Flame refuses: a task still runs.
        """
        try:
            self.client().close_session(session_id)
        except FlameError:
            if not self.session_gone(session_id):
                return False
        self.forget(session_id)
        self._delete_objects(session_id)
        return True

    def forget(self, session_id: str) -> None:
        """Stop reusing a session (closed, gone, or being closed): the next cell opens a new one."""
        with self._lock:
            if self._session_id == session_id:
                self._session_id = None
            for key in [k for k, v in self._keyed.items() if v == session_id]:
                del self._keyed[key]

    def close_quietly(self, session_id: str) -> None:
        try:
            self.client().close_session(session_id)
        except FlameError:
            pass  # another task runs there: the session is closed with the others, later

    def session_shipper(self, session_id: str) -> Shipper:
        """How values reach ``session_id`` (a session opened with :meth:`open_session`)."""
        if self.cache() is None:
            return Shipper(None, None)
        return self.shipper_for(session_id)

    def reopen(self, session_id: str, key: SessionKey, reason: str) -> str:
        """Give up ``session_id`` (its runner died) and open a new session for ``key``.

        The values stored for the old session are the cell's inputs: the new one keeps them.
        """
        with self._lock:
            shipper = self._shippers.pop(session_id, None)
        self.give_up(session_id, reason)
        self.close_quietly(session_id)
        fresh = self.session(key)
        if shipper is not None:
            with self._lock:
                self._shippers.setdefault(fresh, shipper)
        return fresh

    def session_gone(self, session_id: str) -> bool:
        """Whether Flame closed or forgot the session (or cannot say)."""
        try:
            return self.client().get_session(session_id).status.state == types.Closed
        except FlameError:
            return True

    def abandon(self, session_id: str) -> None:
        self.forget(session_id)
        try:
            self.client().close_session(session_id)
        except FlameError:
            pass
        self._delete_objects(session_id)

    def applications(self) -> list[types.Application]:
        """The applications registered on Flame (connecting first)."""
        try:
            return self.client().list_applications()
        except FlameError:
            # A dying embedded Flame (its threads still exiting) can break the call before it
            # can be reaped: give it a moment, then ask the new one.
            if not self.drop_stopped_embedded("this runs on a new one", wait=1.0):
                raise
            return self.client().list_applications()

    def sessions(self) -> list[SessionInfo]:
        """This notebook's sessions as Flame reports them."""
        if self.drop_stopped_embedded("the next cell starts a new one") or self._client is None:
            return []
        mine = set(self.session_ids)
        try:
            listed = self._client.list_sessions()
        except FlameError:
            if self.drop_stopped_embedded("the next cell starts a new one", wait=1.0):
                return []
            raise
        return [
            SessionInfo.of(session, self.labels.get(session.metadata.id, ""))
            for session in listed
            if session.metadata.id in mine
        ]

    def close_sessions(self) -> list[str]:
        """Close this notebook's open sessions; return the ids closed (see :meth:`close_all`)."""
        return self.close_all().closed

    def close_all(self) -> Closing:
        """Close this notebook's open sessions, and say which Flame refused to close.

        A session Flame keeps open (a task runs there) stays in use, with its values in
        the object cache: the running task may still need them.
        """
        outcome = Closing()
        for info in self.sessions():
            if info.state == "Open":
                try:
                    self._client.close_session(info.session_id)  # type: ignore[union-attr]
                except FlameError as exc:
                    if not self.session_gone(info.session_id):
                        outcome.refused[info.session_id] = str(exc).rsplit(": ", 1)[-1]
                        continue
                outcome.closed.append(info.session_id)
            if info.session_id in self._shippers:
                self._delete_objects(info.session_id)
        with self._lock:  # every session but those Flame kept open is opened anew when next needed
            if self._session_id not in outcome.refused:
                self._session_id = None
            self._keyed = {k: v for k, v in self._keyed.items() if v in outcome.refused}
        return outcome

    def shutdown(self) -> None:
        """Close the sessions and stop the embedded Flame, if this notebook started one."""
        with self._lock:
            try:
                if self._embedded is None or self._embedded.running:
                    self.close_sessions()
            except FlameError:
                pass  # Flame is gone or unreachable: nothing there to close, nothing to wait for
            finally:
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if self._cache is not None:
                    self._cache.close()
                self._cache, self._cache_resolved = None, False
                if self._embedded is not None:
                    self._embedded.stop()
                    self._embedded = None


__all__ = ["Connection", "SessionInfo"]
