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
import json
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flame_magic import codec, debugger, deploy
from flame_magic.applications import check_application, is_stock_runner
from flame_magic.background import CellFuture, follow
from flame_magic.capture import analyse, pack
from flame_magic.config import Target, resolve
from flame_magic.errors import (
    CellFailed,
    RemoteError,
    RunnerStartTimeout,
    SessionGoneError,
    SessionStartError,
)
from flame_magic.fanout import MapOutcome, MapRun, Progress, item_payloads, iter_item_payloads
from flame_magic.live import LiveChannel
from flame_magic.protocol import cell, types
from flame_magic.remote import AUTOMATIC, Connection
from flame_magic.runners import RunnerCount
from flame_magic.runs import TASK_INPUT_LIMIT, Runs
from flame_magic.sessions import DEFAULT, Closing, SessionKey

Show = Callable[[cell.Output], None]


class RemoteRepr:
    """The last expression's value as the runner showed it (its value did not come back)."""

    def __init__(self, bundle: cell.MimeBundle) -> None:
        self._data = json.loads(bundle.data_json)
        self._metadata = json.loads(bundle.metadata_json or "{}")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self._data, self._metadata

    def __repr__(self) -> str:
        return str(self._data.get("text/plain", "<remote value>"))


@dataclass
class Result:
    """What one cell gave.

    Attributes
    ----------
    value
        Its last expression's value (None when it ends with a statement); a
        :class:`RemoteRepr` when the value cannot be loaded here.
    outputs
        What it printed and displayed, in order (``cell.Output`` messages), apart from what a
        ``show`` function was given while it ran.
    assigned
        The names it bound that came back, with their values.
    error
        Its exception (raised by :meth:`Engine.run`), or None.
    not_returned
        Names that stayed on the runner, with why.
    unloadable
        Names that came back but cannot be loaded here, with why.
    missing
        Names asked for (``assign=[...]``) that the cell did not bind.
    """

    value: Any = None
    outputs: list[cell.Output] = field(default_factory=list)
    assigned: dict[str, Any] = field(default_factory=dict)
    error: RemoteError | None = None
    not_returned: dict[str, str] = field(default_factory=dict)
    unloadable: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        """What the cell printed to standard output (in ``outputs``)."""
        return "".join(
            o.stream.text for o in self.outputs if o.HasField("stream") and o.stream.name == "stdout"
        )

    @property
    def stderr(self) -> str:
        """What the cell printed to standard error (in ``outputs``)."""
        return "".join(
            o.stream.text for o in self.outputs if o.HasField("stream") and o.stream.name == "stderr"
        )


@dataclass
class Prepared:
    """A cell ready to send: its request, and where it runs.

    Attributes
    ----------
    request
        The cell as it travels (inputs packed, large ones already in the object cache).
    key
        The session it runs in.
    session_id
        Its own session, opened for it (a background cell's), or None.
    item
        ``map``: the name each item is bound to.
    asked
        The names asked for by name (``assign=[...]``), or None for every name it binds.
    """

    request: cell.CellRequest
    key: SessionKey
    session_id: str | None = None
    item: str | None = None
    asked: list[str] | None = None


def parse(source: str, filename: str) -> ast.Module:
    """The cell's tree; a SyntaxError also for what only the compiler finds (``return`` at top level)."""
    tree = ast.parse(source, filename)
    compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    return tree


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
        pip requirements installed on the runners before cells run.
    check_packages
        Refuse cells that need a package the runner lacks or has at another version.
    notify
        Called with notes for the user (a session replaced, a Python copy registered...).
    """

    def __init__(
        self,
        target: Target | None = None,
        application: str = AUTOMATIC,
        *,
        connect_timeout: float = 10.0,
        start_timeout: float = 60.0,
        timeout: float = 0.0,
        interrupt_grace: float = 5.0,
        requirements: Sequence[str] = (),
        check_packages: bool = True,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.connection = Connection(
            target if target is not None else resolve(), application, connect_timeout
        )
        self.connection.start_timeout = start_timeout
        if notify is not None:
            self.connection.notify = notify
        self.runs = Runs(self.connection)
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
        instances: int = 2,
        return_exceptions: bool = False,
        timeout: float | None = None,
        pip: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Run ``code`` once per item (bound to ``item_name``) on up to ``instances`` runners.

        Yields each item's last value in input order, as soon as it and those before it
        have finished (a generator of unknown length is read as the map goes). With
        ``return_exceptions`` a failed item's exception takes its place; else the first
        failure is raised, naming its item. Leaving the loop early stops the map.
        """
        listed: list[Any] | Iterator[Any] = list(items) if hasattr(items, "__len__") else iter(items)
        prepared = self.prepare(
            code,
            namespace or {},
            key=SessionKey(instances=max(1, instances), warm=0),
            item=item_name,
            assign=(),
            timeout=timeout,
            pip=pip,
            send_frames=not return_exceptions,
            samples=listed if isinstance(listed, list) else (),
        )
        return self._ordered(prepared, listed, return_exceptions)

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
            pip = [*self.requirements, *pip]
            self.connection.environment.attach(request, tree, used, shipper, pip, check=self.check_packages)
        except BaseException:
            if session_id is not None:
                self.connection.close_session(session_id)
            raise
        return Prepared(request, key, session_id, item, asked if item is None else None)

    def execute(self, prepared: Prepared, show: Show | None = None) -> Result:
        """Run a prepared cell in its session and wait for it (an interrupt reaches the remote cell)."""
        raw, session_id = self.runs.run(prepared.request, prepared.key, show=show, grace=self.interrupt_grace)
        return self.result(raw, prepared.asked, session_id)

    def result(
        self, raw: cell.CellResult, asked: list[str] | None = None, session_id: str | None = None
    ) -> Result:
        """A :class:`Result` from the runner's ``CellResult``: values loaded, the error rebuilt.

        ``session_id``: where ``%debug`` can ask for a failure's frames later.
        """
        result = Result(outputs=list(raw.outputs))
        for value in raw.assigned:
            try:
                result.assigned[value.name] = self.connection.load(value)
            except Exception as exc:
                result.unloadable[value.name] = f"{type(exc).__name__}: {exc}"
        result.not_returned = {missing.name: missing.reason for missing in raw.not_returned}
        if raw.HasField("error"):
            fetch = debugger.fetcher(self.runs.ask, session_id) if session_id else None
            result.error = debugger.remote_failure(raw.error, fetch)
            return result
        came = {*result.assigned, *result.unloadable, *result.not_returned}
        result.missing = [name for name in asked or () if name not in came]
        result.value = self.value_of(raw)
        return result

    def value_of(self, raw: cell.CellResult) -> Any:
        """The cell's last value: unpickled, else as the runner showed it; None if there is none."""
        has_value = raw.HasField("result_pickle") or raw.HasField("result_value")
        if not raw.HasField("result") and not has_value:
            return None
        if has_value:
            try:
                if raw.HasField("result_value"):
                    return self.connection.load(raw.result_value)
                return codec.loads(raw.result_pickle)
            except Exception as exc:
                if not raw.HasField("result"):  # a map item: the runner made no rendering
                    text = f"<value that cannot be loaded here: {type(exc).__name__}: {exc}>"
                    return RemoteRepr(cell.MimeBundle(data_json=json.dumps({"text/plain": text})))
                # e.g. its library is not installed here: show the runner's rendering
        return RemoteRepr(raw.result)

    def run_map(
        self,
        prepared: Prepared,
        items: list[Any] | Iterator[Any],
        *,
        return_exceptions: bool = False,
        show: Show | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        started: Callable[[MapRun], None] | None = None,
    ) -> MapOutcome:
        """Run a prepared cell once per item, in the session of ``prepared.key``.

        A map that stopped (a failure, an interrupt, Flame) closes its session, unless it is
        named; what finished is in the outcome. ``show`` is given the items' outputs in input
        order as they come (else they are in the outcome); ``started`` the run, as it starts.
        """
        assert prepared.item is not None
        if isinstance(items, list) and not items:
            return MapOutcome(results=[])
        connection = self.connection
        seen: list[Any] = items if isinstance(items, list) else []
        session_id = connection.session(prepared.key)
        shared = self.runs.prepare(prepared.request, session_id)
        # With a cache, each item's live output on a channel of its own, shown in input order.
        channel = uuid.uuid4().hex if prepared.request.HasField("cache") and show is not None else ""
        payloads: Iterable[bytes]
        if isinstance(items, list):  # every item is checked before any is sent
            payloads = [
                self.runs.task_input(session_id, payload)
                for payload in item_payloads(shared, prepared.item, items, TASK_INPUT_LIMIT, channel)
            ]
        else:  # read as the map goes; the items seen are kept for the messages
            payloads = (
                self.runs.task_input(session_id, payload)
                for payload in iter_item_payloads(
                    shared, prepared.item, _kept(items, seen), TASK_INPUT_LIMIT, channel
                )
            )
        client = connection.client()
        runners = RunnerCount(client, session_id)
        waiting = self.runs.pending_watch(session_id)

        def progress(done: Progress) -> None:
            if on_progress is not None:
                on_progress(done)
            runners.sample()
            if done.done == 0:
                waiting()  # a map whose runners do not start, or that finds no room, says so

        def live(index: int) -> LiveChannel | None:
            assert show is not None
            return self.runs.live_channel(session_id, show, f"{channel}-{index}")

        run = MapRun(
            client,
            session_id,
            payloads,
            prepared.key.instances,
            result_of=self.runs.result_of,
            value_of=self.value_of,
            stop_at_failure=not return_exceptions,
            on_progress=progress,
            show=show,
            live=live if channel else None,
        )
        if started is not None:
            started(run)
        try:
            outcome = run.run()
        except RunnerStartTimeout as exc:
            connection.close_session(session_id)
            raise CellFailed(f"{exc}. The map's session was closed.") from None
        runners.sample(force=True)
        outcome.items = seen
        outcome.runners = runners.most if runners.known else None
        self._after_map(prepared.key, session_id, outcome, return_exceptions)
        return outcome

    def _after_map(
        self, key: SessionKey, session_id: str, outcome: MapOutcome, return_exceptions: bool
    ) -> None:
        """Close a stopped map's session: it cancels the items sent but not started."""
        failed = outcome.failure is not None and not return_exceptions
        if not (outcome.interrupted or outcome.fatal is not None or failed):
            return
        if key.name is None:
            self.connection.close_session(session_id)  # refused while an item still runs
        fatal = outcome.fatal
        if isinstance(fatal, SessionStartError):
            self.connection.close_session(session_id)  # its runners cannot start: a new one next time
        elif fatal is not None and (
            isinstance(fatal, SessionGoneError) or self.connection.session_gone(session_id)
        ):
            self.connection.forget(session_id)

    def _ordered(
        self, prepared: Prepared, items: list[Any] | Iterator[Any], return_exceptions: bool
    ) -> Iterator[Any]:
        """:meth:`map`'s results, in input order, from a map running on a thread of its own."""
        runs: queue.SimpleQueue[MapRun | None] = queue.SimpleQueue()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["outcome"] = self.run_map(
                    prepared, items, return_exceptions=return_exceptions, started=runs.put
                )
            except BaseException as exc:  # noqa: B036 - raised to the caller
                box["error"] = exc
            finally:
                runs.put(None)

        thread = threading.Thread(target=work, name="flmrun-map", daemon=True)
        thread.start()
        run = runs.get()
        try:
            if run is not None:
                for _, value in run.ordered():
                    if isinstance(value, BaseException) and not return_exceptions:
                        break  # raised below, with its item named
                    yield value
        finally:
            if run is not None:
                run.stop()
            thread.join()
        if "error" in box:
            raise box["error"]
        outcome: MapOutcome = box["outcome"]
        if outcome.fatal is not None:
            raise outcome.fatal
        if outcome.failure is not None and not return_exceptions:
            index, error = outcome.failure
            item = outcome.items[index] if index < len(outcome.items) else "?"
            debugger.name_failure(error, f"item {index} of the map ({prepared.item}={item!r})")
            raise error

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
                return self.result(self.runs.result_of(task), prepared.asked)

            return (finish or _result_or_error)(get)

        def fail(exc: BaseException) -> BaseException:
            error = CellFailed(f"{exc} The background cell `{name}` did not run to its end.")
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


def _kept(items: Iterator[Any], seen: list[Any]) -> Iterator[Any]:
    """``items``, each also appended to ``seen``."""
    for item in items:
        seen.append(item)
        yield item


def _note_modules(item: Any) -> None:
    """Pickle one map item to note the modules it needs (one that does not pickle is reported later)."""
    try:
        codec.dumps(item)
    except codec.UnpicklableError:
        pass


__all__ = ["Engine", "Prepared", "RemoteRepr", "Result", "parse"]
