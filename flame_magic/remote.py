"""A notebook's link to Flame: which Flame, which session, and running one cell there.

This is the engine behind the magics. It knows Flame (through the client), the
envelope (through the codec) and Flame's object cache, through which large values
travel (through the shippers of :mod:`flame_magic.transfer`); it does not present anything.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flame_magic import codec, deploy, environments, protocol
from flame_magic.backends import OWN_RUNNER, Backend, backend_for
from flame_magic.cache import CacheClient, CacheError, ObjectNotFound, ObjectRef
from flame_magic.capture import ShipError, check_size
from flame_magic.client import (
    FlameClient,
    FlameError,
    SessionGoneError,
    SessionStartError,
    failure_message,
    new_session_id,
)
from flame_magic.config import Target, resolve_cache
from flame_magic.deploy import check_application, is_stock_runner
from flame_magic.errors import CellFailed
from flame_magic.modules import Environment
from flame_magic.protocol import MAX_MESSAGE_BYTES, cell, types
from flame_magic.runners import PendingWatch, RunnerStartTimeout, never_reached, runner_lost
from flame_magic.sessions import DEFAULT, Closing, RequestError, SessionKey, fits
from flame_magic.stock import PythonMismatch, ensure_python_copy, python_copy_name
from flame_magic.transfer import Shipper, blobs

#: ``FlameMagics.application`` for "choose": see :func:`automatic_application`.
AUTOMATIC = ""

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
    label: str = ""  # e.g. "named 'train', up to 4 instances"; empty for the default session


class LiveChannel:
    """The notebook's end of a cell's live output and interrupt (see :mod:`flame_magic_runner.live`)."""

    def __init__(
        self, cache: CacheClient, prefix: str, channel: str, show: Callable[[cell.Output], None]
    ) -> None:
        self.cache = cache
        self.channel = channel
        self.out_key = f"{prefix}/{channel}-out"
        self.ctl_key = f"{prefix}/{channel}-ctl"
        self.show = show
        self.version = 0
        self.interrupted = False
        self.polled = False
        self._failed = False

    def poll(self) -> None:
        """Show what the runner appended since the last poll."""
        if self._failed:
            return
        self.polled = True
        try:
            fetched = self.cache.get(self.out_key, have=self.version)
        except ObjectNotFound:
            return  # the runner makes it on its first flush, after a quarter second
        except CacheError:
            self._failed = True  # the runner keeps what it could not send for the result
            return
        if fetched is None:
            return
        self.version = fetched.version
        chunks = ([fetched.base] if fetched.base is not None else []) + [data for _, data in fetched.patches]
        for chunk in chunks:
            for output in cell.CellResult.FromString(bytes(chunk)).outputs:
                self.show(output)

    def interrupt(self, grace: float) -> None:
        """Ask the runner to interrupt the cell, and to exit if it has not stopped after ``grace`` s."""
        self.cache.put(self.ctl_key, json.dumps({"interrupt": True, "grace": grace}).encode())
        self.interrupted = True

    def finish(self, streamed: bool = False) -> None:
        """Show the rest of what was streamed, then remove the channel's objects.

        The runner streams only from a quarter second into the cell, and this side polls
        from a fifth: a cell that ended before the first poll streamed nothing, so a
        quick cell costs no cache call at all. ``streamed`` (the result's flag) says the
        runner wrote to the channel though it was never polled (a --map item's, shown in turn).
        """
        keys = []
        if self.polled or streamed:
            self.poll()
            keys.append(self.out_key)
        if self.interrupted:
            keys.append(self.ctl_key)
        for key in keys:
            try:
                self.cache.delete(key)
            except CacheError:
                pass


def automatic_application(client: FlameClient) -> str:
    """The application automatic selection picks on the Flame behind ``client``.

    flame-magic's runner registered under its own name (:data:`deploy.DEFAULT_NAME`, as
    the embedded Flame and ``%flame deploy`` register it) when the Flame has it, else
    Flame's default ``flmrun``.
    """
    ours = client.get_application(deploy.DEFAULT_NAME)
    if ours is not None and deploy.is_our_runner(ours.spec):
        return deploy.DEFAULT_NAME
    return protocol.FLMRUN


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
    """

    def __init__(self, target: Target, application: str, connect_timeout: float) -> None:
        self.target = target
        #: The application asked for: a name, or AUTOMATIC.
        self.requested = application
        self._application = application or None
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self._embedded: EmbeddedFlame | None = None
        self._client: FlameClient | None = None
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
    def endpoint(self) -> str:
        if self._embedded is not None and not self._embedded.running:
            return ""  # stopped: a new one starts on next use
        return self._client.endpoint if self._client else self.target.endpoint

    def client(self) -> FlameClient:
        """The Frontend client, starting the embedded Flame when no cluster is configured.

        An embedded Flame that stopped (killed, crashed) is replaced by a new one, with a note.
        """
        with self._lock:
            self._drop_stopped_embedded("this runs on a new one")
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

    def _drop_stopped_embedded(self, then: str, wait: float = 0.0) -> bool:
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
            self._drop_stopped_embedded("this runs on a new one")
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
        return self._shipper_for(self.session(key))

    def _shipper_for(self, session_id: str) -> Shipper:
        with self._lock:
            if session_id not in self._shippers:
                application = self._applications.get(session_id, self.application)
                self._shippers[session_id] = Shipper(self.cache(), f"{application}/{session_id}")
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
        prefix = ObjectRef.decode(found[0].refs[0]).key.rsplit("/", 1)[0]
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
            self._drop_stopped_embedded("this runs on a new one")
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

    def pending_watch(self, session_id: str) -> PendingWatch:
        """What to call while a task of ``session_id`` waits (see ``FlameClient.wait_task``)."""
        application = self._applications.get(session_id, self.application)
        timeout = self.start_timeout
        if timeout and session_id in self._installing:  # its first runners wait for Flame's installation
            timeout += environments.INSTALL_SECONDS
        return PendingWatch(
            self.client(),
            session_id,
            application,
            timeout,
            self.describe,
            self.notify,
            lambda: self.release_idle_maps(session_id),
        )

    def release_idle_maps(self, waiting: str) -> list[str]:
        """Close this notebook's idle ``--map`` sessions (kept for the next map), so that a cell
        of ``waiting`` gets their executors; return the ids closed."""
        with self._lock:
            candidates = [
                v for k, v in self._keyed.items() if k.name is None and k.warm == 0 and v != waiting
            ]
        closed = []
        for session_id in candidates:
            try:
                status = self.client().get_session(session_id).status
            except FlameError:
                continue
            if not status.pending and not status.running and self.close_session(session_id):
                closed.append(session_id)
        return closed

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
        name = self._python_copies.get(self.application, self.application)
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
            self._shipper_for(session_id)  # its objects (the evaluator, results) go when it closes
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
            self._abandon(session_id)
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
        except (FlameError, codec.PayloadError) as exc:
            self._abandon(session_id)
            raise FlameError(self.install_failure(session_id, exc) or str(exc)) from None
        for note in notes:
            self.notify(note)
        return session_id

    def install_failure(self, session_id: str, exc: Exception) -> str | None:
        """The one line for ``session_id`` of a ``--pip`` environment that Flame could not install.

        None when ``exc`` is something else (see :func:`environments.install_failed`).
        """
        application = self._applications.get(session_id)
        if not isinstance(exc, SessionStartError) or application is None:
            return None
        return environments.install_failed(self.client(), self.cache(), application, str(exc))

    def backend(self, session_id: str) -> Backend:
        """How this notebook speaks to the runner of ``session_id``."""
        with self._lock:
            return self._backends.get(session_id, OWN_RUNNER)

    def path(self) -> str:
        """Which kind of runner the notebook's cells reach, and why (for ``%flame status``)."""
        client = self.client()
        name = self._python_copies.get(self.application, self.application)
        application = client.get_application(name)
        if application is None or check_application(application, name, client.endpoint):
            return f"none: {name!r} cannot run cells (see above)"
        via = (
            f" through {name!r}, its copy for Python {codec.PYTHON_VERSION}"
            if name != self.application
            else ""
        )
        if is_stock_runner(application.spec):
            cache = "" if self.cache() is not None else " (needs Flame's object cache: none is configured)"
            return (
                f"Flame's flmrun: {self.application!r}{via} is flamepy's runner, which runs flame-magic's "
                f"evaluator sent with each session{cache}; `%flame deploy` registers flame-magic's runner, "
                "the faster path"
            )
        return f"flame-magic's runner: {self.application!r}{via} runs it"

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
            if not self._session_gone(session_id):
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

    def run(
        self,
        request: cell.CellRequest,
        key: SessionKey = DEFAULT,
        show: Callable[[cell.Output], None] | None = None,
        grace: float = 5.0,
    ) -> cell.CellResult:
        """Run one cell as a task of this notebook's session for ``key`` and return its result.

        Values in ``request`` that travel by reference were stored by :meth:`shipper` for the
        same ``key``; the runner is told to send large results back the same way.

        With ``show`` and an object cache, what the cell shows is given to ``show`` while it
        runs (the result then holds only the rest), and a KeyboardInterrupt while waiting
        interrupts the remote cell; if it does not stop within ``grace`` seconds its runner
        is stopped. Without a cache, an interrupt stops waiting and the cell runs on.
        """
        client = self.client()
        if self.cache() is None:  # refused before a session (and a runner) is started for it
            check_size(request, TASK_INPUT_LIMIT, no_cache=True)
        task, session_id = self._run_once(client, request, key, show, grace)
        if runner_lost(task) and never_reached(failure_message(task)):
            # The cell never reached a runner: the session's runner had died before. Once, in a new one.
            shipper = self._shippers.pop(session_id, None)  # its values are this cell's inputs
            self.give_up(session_id, f"Flame: {failure_message(task)}")
            self._close_quietly(session_id)
            fresh = self.session(key)
            if shipper is not None:
                with self._lock:
                    self._shippers.setdefault(fresh, shipper)
            task, session_id = self._run_once(self.client(), request, key, show, grace)
        if runner_lost(task):
            self._close_quietly(session_id)  # cancels what waits there, unless a task still runs
        return self._result(task)

    def _close_quietly(self, session_id: str) -> None:
        try:
            self.client().close_session(session_id)
        except FlameError:
            pass  # another task runs there: the session is closed with the others, later

    def _run_once(
        self,
        client: FlameClient,
        request: cell.CellRequest,
        key: SessionKey,
        show: Callable[[cell.Output], None] | None,
        grace: float,
    ) -> tuple[types.Task, str]:
        """Create the cell's task in the session for ``key`` and wait for it to end."""
        session_id = self.session(key)
        self._allow_cache(request, session_id)
        live = self._live(request, session_id, show)
        check_size(request, TASK_INPUT_LIMIT)
        data = self.task_input(session_id, codec.encode(request))
        try:
            task = client.create_task(session_id, data)
        except FlameError:
            # The embedded Flame dying as this cell started (it says so), or the session closed.
            restarted = self._drop_stopped_embedded("this runs on a new one", wait=1.0)
            if not restarted and not self._session_gone(session_id):
                raise
            self.forget(session_id)  # a fresh one, once
            gone = session_id
            client = self.client()
            session_id = self.session(key)
            self._allow_cache(request, session_id)
            live = self._live(request, session_id, show)
            data = self.task_input(session_id, codec.encode(request))
            if not restarted:
                self.notify(
                    f"Session {gone} was closed or deleted outside this notebook (flmctl, an "
                    f"administrator, or a Flame restart); this cell runs in a new session, {session_id}: "
                    "what earlier cells left on the runner (imports, definitions) is gone."
                )
            task = client.create_task(session_id, data)
        try:
            task = self._wait(client, session_id, task.metadata.id, live, grace)
        except RunnerStartTimeout as exc:
            self._abandon(session_id)
            raise CellFailed(f"{exc}. The session was closed.") from None
        except SessionStartError as exc:
            self._abandon(session_id)
            failed = self.install_failure(session_id, exc)
            if failed is not None:
                raise CellFailed(failed) from None
            raise CellFailed(
                f"{exc}. The session was closed. If {self.application!r} is not flame-magic's runner "
                "with this notebook's flame-magic, Python and cloudpickle versions, run `%flame deploy` "
                "to register one and switch to it; otherwise fix the runner's environment and run the "
                "cell again."
            ) from None
        except SessionGoneError as exc:
            self.forget(session_id)
            raise CellFailed(f"{exc} Run the cell again: a new session starts.") from None
        except FlameError:
            if not self._drop_stopped_embedded("the next cell starts a new one", wait=1.0):
                raise
            raise CellFailed("The cell did not finish: the embedded Flame stopped while it ran.") from None
        return task, session_id

    def _live(
        self, request: cell.CellRequest, session_id: str, show: Callable[[cell.Output], None] | None
    ) -> LiveChannel | None:
        """A channel for the cell's live output and interrupt, when the cache allows one."""
        request.channel = ""
        cache = self.cache()
        if show is None or cache is None or not request.HasField("cache"):
            return None
        live = LiveChannel(cache, request.cache.key_prefix, uuid.uuid4().hex, show)
        request.channel = live.channel
        return live

    def live_channel(
        self, session_id: str, show: Callable[[cell.Output], None], channel: str | None = None
    ) -> LiveChannel | None:
        """A live channel in ``session_id`` (--background, --map items); None without a cache.

        Set its ``channel`` in the request (or item) before :meth:`prepare` encodes it.
        """
        access = self._shipper_for(session_id).access() if self.cache() is not None else None
        if access is None:
            return None
        assert self._cache is not None
        return LiveChannel(self._cache, access.key_prefix, channel or uuid.uuid4().hex, show)

    def _wait(
        self, client: FlameClient, session_id: str, task_id: str, live: LiveChannel | None, grace: float
    ) -> types.Task:
        """Wait for the task, showing its live output; an interrupt is passed on to the runner.

        An interrupt while the task has not started stops the wait at once (see
        :meth:`_cancel_pending`).
        """
        watch = self.pending_watch(session_id)
        if live is None:
            try:
                return client.wait_task(session_id, task_id, pending=watch)
            except KeyboardInterrupt:
                self._cancel_pending(session_id, task_id)
                raise CellFailed(
                    "Interrupted: this notebook stopped waiting, but the remote cell could not be "
                    "interrupted (no object cache to reach its runner) and keeps running there; the "
                    "next cell of this session waits until it ends (Flame closes no session while a "
                    "task runs in it)."
                ) from None
        try:
            while True:
                try:
                    task = client.wait_task(session_id, task_id, tick=live.poll, pending=watch)
                    break
                except KeyboardInterrupt:
                    if live.interrupted:
                        raise  # a second interrupt: stop waiting
                    self._cancel_pending(session_id, task_id)
                    try:
                        live.interrupt(grace)
                    except CacheError as exc:
                        raise CellFailed(
                            f"Interrupted: this notebook stopped waiting, but the remote cell could not "
                            f"be interrupted ({exc}) and keeps running on its runner."
                        ) from None
        finally:
            live.finish()  # the last of the output
        if live.interrupted and task.status.state != types.Succeed and not task.spec.output:
            self.give_up(session_id, "stopped after it ignored an interrupt")
            self._close_quietly(session_id)
            raise CellFailed(
                f"Interrupted: the cell ignored the interrupt for {grace:g} s, so its runner was "
                "stopped; what it held (imports, definitions) is gone: the next cell starts on a "
                "fresh runner."
            )
        return task

    def _cancel_pending(self, session_id: str, task_id: str) -> None:
        """After an interrupt: if the task has not started, stop waiting for it now.

        Flame cannot cancel one task; closing its session cancels it, so the session is
        closed when no other task runs there, and left open (the task then runs later,
        unseen) otherwise. Raises CellFailed saying which; returns when the task runs.
        """
        try:
            if self.client().get_task(session_id, task_id).status.state != types.Pending:
                return
            running = self.client().get_session(session_id).status.running
        except FlameError:
            return
        if not running and self.close_session(session_id):
            raise CellFailed(
                f"Interrupted before the cell started: its session {session_id} was closed, which "
                "cancelled it. The next cell opens a new session."
            )
        raise CellFailed(
            f"Interrupted before the cell started: it stays queued in session {session_id}, behind "
            "a task that runs there, and will run when that ends, unseen (Flame cannot cancel one "
            "task, nor close a session while a task runs in it)."
        )

    def session_shipper(self, session_id: str) -> Shipper:
        """How values reach ``session_id`` (a session opened with :meth:`open_session`)."""
        if self.cache() is None:
            return Shipper(None, None)
        return self._shipper_for(session_id)

    def prepare(self, request: cell.CellRequest, session_id: str) -> bytes:
        """``request`` readied for ``session_id`` (large results through the cache) and encoded.

        Raises
        ------
        ShipError
            If it is over Flame's task limit.
        """
        self._allow_cache(request, session_id)
        check_size(request, TASK_INPUT_LIMIT)
        return codec.encode(request)

    def task_input(self, session_id: str, data: bytes) -> bytes:
        """The task input for an encoded ``CellRequest`` (see :meth:`prepare`) to ``session_id``."""
        return self.backend(session_id).task_input(data)

    def _allow_cache(self, request: cell.CellRequest, session_id: str) -> None:
        """Let the runner put large results in the cache, under the session's key prefix."""
        self.environment.check(request, session_id)
        access = self._shipper_for(session_id).access()
        if access is None:
            request.ClearField("cache")
        else:
            request.cache.CopyFrom(access)

    def ask(self, session_id: str, request: cell.CellRequest) -> cell.CellResult:
        """Send a request that runs no cell (e.g. ``debug_fetch``) to ``session_id``'s runner.

        Unlike :meth:`run`, a session that is gone is not replaced (the answer was on its
        runner), and a Flame this connection no longer uses is not started again.

        Raises
        ------
        FlameError
            If the session is gone or Flame cannot be reached.
        CellFailed
            If the runner gave no answer (it died).
        """
        client = self._client
        if client is None:
            raise FlameError("this notebook no longer uses the Flame that ran the cell")
        task = client.create_task(session_id, self.task_input(session_id, codec.encode(request)))
        return self._result(client.wait_task(session_id, task.metadata.id))

    def result_of(self, task: types.Task) -> cell.CellResult:
        """A finished task's CellResult; CellFailed when the runner gave none (died, cancelled)."""
        return self._result(task)

    def _result(self, task: types.Task) -> cell.CellResult:
        state = task.status.state
        session_id = task.spec.session_id
        backend = self.backend(session_id)
        try:
            data = backend.cell_result(task)
            result = (
                codec.decode(cell.CellResult, data, backend.path, backend.same_cloudpickle) if data else None
            )
        except (codec.PayloadError, FlameError) as exc:
            raise CellFailed(str(exc)) from None
        if result is not None:
            self.environment.saw(session_id, result)
            if result.HasField("refused"):
                raise CellFailed(result.refused)
            return result
        if state == types.Cancelled:
            raise CellFailed(
                "The cell's task was cancelled because its session was closed. Run the cell again: "
                "a new session starts."
            )
        message = failure_message(task) or "no message"
        if not runner_lost(task):
            raise CellFailed(f"Flame could not run the cell: {message}")
        session_id = task.spec.session_id
        self.give_up(session_id, f"Flame: {message}")
        raise CellFailed(
            f"The runner of session {session_id} did not answer (its process died): what it held "
            "(imports, definitions) is gone, and the next cell opens a new session. Flame says: "
            f"{message}"
        )

    def session_gone(self, session_id: str) -> bool:
        """Whether Flame closed or forgot the session (or cannot say)."""
        return self._session_gone(session_id)

    def _session_gone(self, session_id: str) -> bool:
        try:
            return self.client().get_session(session_id).status.state == types.Closed
        except FlameError:
            return True

    def _abandon(self, session_id: str) -> None:
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
            if not self._drop_stopped_embedded("this runs on a new one", wait=1.0):
                raise
            return self.client().list_applications()

    def sessions(self) -> list[SessionInfo]:
        """This notebook's sessions as Flame reports them."""
        if self._drop_stopped_embedded("the next cell starts a new one") or self._client is None:
            return []
        mine = set(self.session_ids)
        infos = []
        try:
            listed = self._client.list_sessions()
        except FlameError:
            if self._drop_stopped_embedded("the next cell starts a new one", wait=1.0):
                return []
            raise
        for session in listed:
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
                        label=self.labels.get(session.metadata.id, ""),
                    )
                )
        return infos

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
                    if not self._session_gone(info.session_id):
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


__all__ = ["Connection", "SessionInfo", "ShipError", "TASK_INPUT_LIMIT"]
