"""The engine: run cells on Flame from Python, with IPython or without it.

The magics are a thin layer over this module, as ipyparallel's are over its ``View``::

    from flame_magic.engine import Engine

    with Engine() as flame:                      # the configured Flame, else an embedded one
        result = flame.run("total = sum(xs)\\ntotal * 2", {"xs": [1, 2, 3]})
        result.value, result.assigned            # (12, {'total': 6})
        squares = list(flame.map("x * x", "x", range(10), instances=2))
        future = flame.submit("import time\\ntime.sleep(1)\\n42")
        future.result().value                    # 42; also `await future`

:meth:`Engine.run` returns a :class:`Result` and raises the cell's exception (a
:class:`~flame_magic.errors.RemoteError`); the caller's namespace is read, never written
unless ``update=True``. :meth:`Engine.map` yields each item's last value in input order, as
the items finish. :meth:`Engine.submit` returns a :class:`~flame_magic.background.CellFuture`.

Underneath, a cell goes through three steps, which the magics call one by one to show
what happens as it happens: :meth:`Engine.prepare` (what the cell reads, packed; its
modules and packages), then :meth:`Engine.execute`, :meth:`Engine.run_map` or
:meth:`Engine.start`. Both kinds of runner (flame-magic's, Flame's stock ``flmrun``) are
behind :mod:`flame_magic.backends`: nothing here depends on which one a session runs.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from flame_magic import codec, deploy, environments, wire
from flame_magic.applications import check_application, is_stock_runner
from flame_magic.background import CellFuture, follow
from flame_magic.capture import analyse, pack
from flame_magic.client import FlameClient
from flame_magic.config import Target, resolve
from flame_magic.errors import CellFailed, RequestError
from flame_magic.items import MapOutcome, Progress
from flame_magic.maps import Maps
from flame_magic.protocol import cell, types
from flame_magic.remote import AUTOMATIC, Connection
from flame_magic.results import Prepared, RemoteRepr, Result, load_result, load_value, parse
from flame_magic.runs import Runs
from flame_magic.sessions import DEFAULT, Closing, SessionKey
from flame_magic.transfer import release

Show = Callable[[cell.Output], None]


class Engine:
    """Cells run on one Flame: its sessions, their runners, the values that travel.

    Parameters
    ----------
    target
        The Flame to use (:func:`flame_magic.config.target_for`); default: the configured
        one (``FLAME_ENDPOINT``, ``~/.flame/flame.yaml``), else an embedded Flame.
    application
        The application whose runners run the cells; default: flame-magic's runner where
        it is registered, else Flame's ``flmrun``.
    connect_timeout, start_timeout
        Seconds to wait for Flame, and for a new session's runner (0: no limit).
    timeout
        Seconds a cell may run before it is stopped (0: no limit).
    interrupt_grace
        Seconds an interrupted cell may take to stop before its runner is stopped.
    requirements
        Packages installed for every cell's runners (requirements or wheel files; see
        :mod:`flame_magic.environments`), with each call's ``pip``.
    check_packages
        Refuse cells that need a package the runner lacks or has at another version.
    notify
        Called with notes for the user (a session replaced, a Python copy registered...).
    client
        A Frontend client already connected to ``target`` (unit tests give a fake Flame).
    """

    def __init__(
        self,
        target: Target | None = None,
        application: str = AUTOMATIC,
        *,
        connect_timeout: float = 10.0,
        start_timeout: float = 60.0,
        timeout: float = 0.0,
        interrupt_grace: float = wire.INTERRUPT_GRACE,
        requirements: Sequence[str] = (),
        check_packages: bool = True,
        notify: Callable[[str], None] | None = None,
        client: FlameClient | None = None,
    ) -> None:
        target = target if target is not None else resolve()
        self.connection = Connection(target, application, connect_timeout, client)
        self.connection.start_timeout = start_timeout
        if notify is not None:
            self.connection.notify = notify
        self.runs = Runs(self.connection)
        self.maps = Maps(self.connection, self.runs, lambda raw: load_value(raw, self.connection.load))
        self.timeout = timeout
        self.interrupt_grace = interrupt_grace
        self.requirements = list(requirements)
        self.check_packages = check_packages
        self._submitted = 0

    # -- the public API ------------------------------------------------------------------

    def run(
        self,
        code: str,
        namespace: Mapping[str, Any] | None = None,
        assign: Iterable[str] | None = None,
        *,
        update: bool = False,
        timeout: float | None = None,
        pip: Sequence[str] = (),
        show: Show | None = None,
    ) -> Result:
        """Run ``code`` on a runner, with the values it reads from ``namespace``.

        Parameters
        ----------
        assign
            The names to bring back (default: every name the cell binds; ``()``: none).
        update
            Also set the names that came back in ``namespace`` (a dict).
        show
            Given what the cell prints and displays while it runs (then not in ``outputs``).

        Raises
        ------
        RemoteError
            The cell's exception, an instance of its builtin type (``except ValueError``).
        flame_magic.errors.FlameMagicError
            If the cell cannot be sent (``UsageProblem``) or Flame cannot run it (``CellFailed``).
        """
        prepared = self.prepare(code, namespace or {}, assign=assign, timeout=timeout, pip=pip)
        result = self.execute(prepared, show=show)
        if update and isinstance(namespace, dict):
            namespace.update(result.assigned)
        if result.error is not None:
            raise result.error
        return result

    def map(
        self,
        code: str,
        item_name: str,
        items: Iterable[Any],
        namespace: Mapping[str, Any] | None = None,
        *,
        instances: int | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
        pip: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Run ``code`` once per item (bound to ``item_name``) on up to ``instances`` runners
        (default: :meth:`default_instances`).

        Yields each item's last value in input order, as soon as it and those before it
        have finished (a generator of unknown length is read as the map goes). With
        ``return_exceptions`` a failed item's exception takes its place; else the first
        failure is raised, naming its item. Leaving the loop early stops the map.
        """
        listed: list[Any] | Iterator[Any] = list(items) if hasattr(items, "__len__") else iter(items)
        prepared = self.prepare(
            code,
            namespace or {},
            key=SessionKey(instances=max(1, instances or self.default_instances()), warm=0),
            item=item_name,
            assign=(),
            timeout=timeout,
            pip=pip,
            send_frames=not return_exceptions,
            samples=listed if isinstance(listed, list) else (),
        )
        return self.maps.ordered(prepared, listed, return_exceptions)

    def submit(
        self,
        code: str,
        namespace: Mapping[str, Any] | None = None,
        assign: Iterable[str] | None = None,
        *,
        timeout: float | None = None,
        pip: Sequence[str] = (),
    ) -> CellFuture:
        """Start ``code`` in a session of its own and return at once.

        The future's ``result()`` is the cell's :class:`Result`, or raises its exception;
        ``await future`` works too. Values are read from ``namespace`` now.
        """
        prepared = self.prepare(
            code, namespace or {}, private=True, assign=assign, timeout=timeout, pip=pip, send_frames=True
        )
        self._submitted += 1
        return self.start(prepared, name=f"submitted cell {self._submitted}")

    def close(self) -> None:
        """Close the sessions opened here, and stop the embedded Flame if one was started."""
        self.connection.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the steps ---------------------------------------------------------------------

    def prepare(
        self,
        source: str,
        namespace: Mapping[str, Any],
        *,
        tree: ast.Module | None = None,
        filename: str = "<flmrun-cell>",
        first_line: int = 1,
        key: SessionKey = DEFAULT,
        private: bool = False,
        item: str | None = None,
        assign: Iterable[str] | None = None,
        timeout: float | None = None,
        pip: Sequence[str] = (),
        send_frames: bool = False,
        samples: Sequence[Any] = (),
    ) -> Prepared:
        """The cell as it travels: the values it reads packed, its modules and packages attached.

        Large values go to the object cache now, under the session they are for (opened now,
        with a cache; ``private``: a session of the cell's own). ``samples``: map items read
        already, the first of which is pickled to note the modules the items need.

        Raises
        ------
        SyntaxError, flame_magic.errors.UsageProblem, flame_magic.errors.FlameError
            The private session, if opened, is closed again.
        """
        if tree is None:
            tree = parse(source, filename)
        names = analyse(tree)
        key = self._with_requirements(key, environments.parse([*self.requirements, *pip]))
        asked = None if assign is None else list(assign)
        session_id = None
        try:
            if private:
                session_id = self.connection.open_session(key)
                shipper = self.connection.session_shipper(session_id)
            else:
                shipper = self.connection.shipper(key)
            reads = [name for name in names.reads if name != item]
            with codec.record_modules() as used:
                inputs = pack(reads, namespace, shipper)
                if samples:
                    _note_modules(samples[0])
            request = cell.CellRequest(
                header=codec.local_header(),
                source=source,
                filename=filename,
                first_line=first_line,
                inputs=inputs,
                assign=[] if item is not None else (list(names.binds) if asked is None else asked),
                timeout=self.timeout if timeout is None else timeout,
                values_only=item is not None,
                send_frames=send_frames,
            )
            self.connection.environment.attach(request, tree, used, shipper, check=self.check_packages)
            environments.leave_to_pip(request, key.requirements)
        except BaseException:
            if session_id is not None:
                self.connection.close_session(session_id)
            raise
        return Prepared(request, key, session_id, item, asked if item is None else None)

    def _with_requirements(self, key: SessionKey, requirements: tuple[str, ...]) -> SessionKey:
        """The session key for a cell whose runners need ``requirements`` installed.

        Runners with packages installed are sessions of their own (see
        :mod:`flame_magic.environments`); a named session keeps the packages it was opened with.
        """
        if not requirements or key.requirements == requirements:
            return key
        if key.name is not None and self.connection.named(key.name) is not None:
            raise RequestError(
                f"Session {key.name!r} is open with other packages "
                f"({environments.describe(key.requirements) or 'none'}): run "
                f"`%flame close {key.name}` first to open it with these."
            )
        return dataclasses.replace(key, requirements=requirements)

    def execute(self, prepared: Prepared, show: Show | None = None) -> Result:
        """Run a prepared cell in its session and wait for it (an interrupt reaches the remote cell).

        ``show`` is given what the cell shows while it runs; without it, all of it is in the
        result's ``outputs``.
        """
        # What the cell shows while it runs comes through the live channel, which also carries an
        # interrupt: without a ``show``, it is kept for the result.
        streamed: list[cell.Output] = []
        grace = self.interrupt_grace
        try:
            raw, session_id = self.runs.run(
                prepared.request, prepared.key, show=show or streamed.append, grace=grace
            )
            try:
                result = load_result(raw, self.connection.load, self.runs.ask, prepared.asked, session_id)
            finally:
                release([*raw.assigned, *([raw.value] if raw.HasField("value") else [])])
        finally:
            release(prepared.request.inputs)  # the cell has ended: its shared-memory segments go
        result.outputs[:0] = streamed
        return result

    def run_map(
        self,
        prepared: Prepared,
        items: list[Any] | Iterator[Any],
        *,
        return_exceptions: bool = False,
        show: Show | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> MapOutcome:
        """Run a prepared cell once per item; the whole outcome (see :meth:`Maps.run`)."""
        try:
            return self.maps.run(
                prepared, items, return_exceptions=return_exceptions, show=show, on_progress=on_progress
            )
        finally:
            release(prepared.request.inputs)

    def start(
        self,
        prepared: Prepared,
        *,
        name: str,
        label: str | None = None,
        show: Show | None = None,
        finish: Callable[[Callable[[], Result]], Any] | None = None,
        failed: Callable[[CellFailed], None] | None = None,
    ) -> CellFuture:
        """Send a prepared cell and follow it on a thread; return its future at once.

        Parameters
        ----------
        name
            How ``%flame status`` and messages name it.
        label
            How the future names itself (default: ``name``).
        show
            Given what the cell shows while it runs (on the following thread).
        finish
            Called on that thread with a function that returns the cell's :class:`Result`
            (or raises why there is none); what it returns, or raises, is the future's.
            Default: the Result, or its error raised.
        failed
            Given the error when Flame fails while the cell is followed (to show it).
        """
        connection = self.connection
        private = prepared.session_id is not None
        session_id = prepared.session_id or connection.session(prepared.key)
        try:
            live = self.runs.live_channel(session_id, show) if show is not None else None
            prepared.request.channel = live.channel if live is not None else ""
            data = self.runs.task_input(session_id, self.runs.prepare(prepared.request, session_id))
            task = connection.client().create_task(session_id, data)
        except BaseException:
            if private:
                connection.close_session(session_id)
            raise
        if private:
            connection.labels[session_id] = f"background `{name}`"

        def done(task: types.Task) -> Any:
            def get() -> Result:
                release(prepared.request.inputs)
                raw = self.runs.result_of(task)
                try:
                    return load_result(raw, self.connection.load, asked=prepared.asked)
                finally:
                    release([*raw.assigned, *([raw.value] if raw.HasField("value") else [])])

            return (finish or _result_or_error)(get)

        def fail(exc: BaseException) -> BaseException:
            said = connection.install_failure(session_id, exc)
            error = CellFailed(f"{said or exc} The background cell `{name}` did not run to its end.")
            if failed is not None:
                failed(error)
            return error

        return follow(
            connection.client(),
            session_id,
            task.metadata.id,
            label or name,
            done,
            fail,
            (lambda: connection.close_session(session_id)) if private else None,
            live,
            pending=self.runs.pending_watch(session_id),
        )

    # -- its Flame and its sessions ---------------------------------------------------------

    def connect(self) -> str:
        """Reach Flame now (starting the embedded one), and return its endpoint.

        Raises
        ------
        flame_magic.errors.FlameError
            If Flame cannot be reached; the message names the endpoint.
        """
        return self.connection.client().endpoint

    def use_application(self, application: str) -> None:
        """Run the next cells on ``application`` (AUTOMATIC: choose again), in new sessions."""
        if self.connection.requested != application:
            self.connection.use_application(application)

    def close_named(self, name: str) -> tuple[str, bool] | None:
        """Close the named session ``name``: its id and whether Flame closed it (None: no such session).

        Flame refuses while a task runs there; the session then stays in use.
        """
        key = self.connection.named(name)
        if key is None:
            return None
        session_id = self.connection.session(key)
        return session_id, self.connection.close_session(session_id)

    def close_sessions(self) -> Closing:
        """Close every open session (runners stop; the next cell starts afresh)."""
        return self.connection.close_all()

    def deploy(self, name: str, spec: types.ApplicationSpec) -> deploy.Deployed:
        """Register flame-magic's runner as ``name`` and run the next cells on it.

        Flame updates only an application without open sessions: those on it are closed first
        when the spec changes.
        """
        connection = self.connection
        client = connection.client()
        if connection.application == name and deploy.would_change(client, name, spec):
            connection.close_sessions()
        done = deploy.deploy(client, name, spec)
        if connection.application != name:
            connection.use_application(name)
        else:
            connection.requested = name  # the application in use, now by name: its sessions stay
        return done

    def default_instances(self) -> int:
        """Runners for a map that does not say: one per CPU on the embedded Flame, else 4."""
        return (os.cpu_count() or 1) if self.connection.target.embedded else 4

    def path(self) -> str:
        """Which kind of runner the cells reach, and why (for ``%flame status``)."""
        connection = self.connection
        client = connection.client()
        name = connection.runner_application()
        application = client.get_application(name)
        if application is None or check_application(application, name, client.endpoint):
            return f"none: {name!r} cannot run cells (see above)"
        asked = connection.application
        via = f" through {name!r}, its copy for Python {codec.PYTHON_VERSION}" if name != asked else ""
        if is_stock_runner(application.spec):
            cache = (
                "" if connection.cache() is not None else " (needs Flame's object cache: none is configured)"
            )
            return (
                f"Flame's flmrun: {asked!r}{via} is flamepy's runner, which runs flame-magic's "
                f"evaluator sent with each session{cache}; `%flame deploy` registers flame-magic's runner, "
                "the faster path"
            )
        return f"flame-magic's runner: {asked!r}{via} runs it"


def _result_or_error(get: Callable[[], Result]) -> Result:
    result = get()
    if result.error is not None:
        raise result.error
    return result


def _note_modules(item: Any) -> None:
    """Pickle one map item to note the modules it needs (one that does not pickle is reported later)."""
    try:
        codec.dumps(item)
    except codec.UnpicklableError:
        pass


__all__ = ["Engine", "Prepared", "RemoteRepr", "Result", "parse"]
