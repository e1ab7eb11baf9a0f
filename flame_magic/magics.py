"""The ``%%flmrun`` and ``%flame`` magics: options in, results shown."""

from __future__ import annotations

import ast
import atexit
import dataclasses
import json
import os
import reprlib
import sys
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments, parse_argstring
from IPython.display import display, publish_display_data
from traitlets import Bool, Float, Int, List, Unicode

from flame_magic import codec, debugger, deploy, environments
from flame_magic.background import current_parent, follow, output_to
from flame_magic.capture import ShipError, analyse, pack
from flame_magic.client import FlameError, SessionGoneError, SessionStartError
from flame_magic.config import ConfigError, Target, resolve, target_for
from flame_magic.errors import CellFailed, MapInterrupted, add_note
from flame_magic.fanout import NOT_DONE, MapOutcome, MapRun, Progress, item_payloads, iter_item_payloads
from flame_magic.progress import ProgressDisplay
from flame_magic.protocol import cell
from flame_magic.remote import TASK_INPUT_LIMIT, Connection, LiveChannel
from flame_magic.runners import RunnerCount, RunnerStartTimeout
from flame_magic.sessions import Plan, RequestError, plan, take_map_option

# The cell body starts on the line after `%%flmrun`, and tracebacks should
# count lines the way the notebook shows them.
FIRST_BODY_LINE = 2


class RemoteRepr:
    """The last expression's value as the runner showed it (its value did not come back)."""

    def __init__(self, bundle: cell.MimeBundle) -> None:
        self._data = json.loads(bundle.data_json)
        self._metadata = json.loads(bundle.metadata_json or "{}")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self._data, self._metadata

    def __repr__(self) -> str:
        return str(self._data.get("text/plain", "<remote value>"))


@magics_class
class FlameMagics(Magics):
    """Run cells on a Flame cluster, or on an embedded Flame on this machine."""

    application = Unicode(
        "",
        help="The Flame application whose processes run the cells. Empty (the default): automatic, "
        "flame-magic's runner registered as 'flame-magic' when the Flame has it (the embedded Flame "
        "does), else 'flmrun'.",
    ).tag(config=True)
    timeout = Float(0.0, help="Seconds a cell may run on the runner before it is stopped (0: no limit).").tag(
        config=True
    )
    connect_timeout = Float(10.0, help="Seconds to wait for the Flame session manager.").tag(config=True)
    start_timeout = Float(
        60.0,
        help="Seconds a new session's runner may take to start before its cell fails, naming the "
        "application's command (0: wait for ever). Flame 0.6 reports nothing when a runner process "
        "exits before it serves.",
    ).tag(config=True)
    interrupt_grace = Float(
        5.0,
        help="Seconds an interrupted cell may take to stop before its runner is stopped (and replaced).",
    ).tag(config=True)
    map_instances = Int(
        0,
        help="Runner instances for --map when --instances is not given "
        "(0: one per CPU of this machine on the embedded Flame, 4 on a cluster).",
    ).tag(config=True)

    requirements = List(
        Unicode(),
        help="Packages installed for every cell's runners: requirements or wheel files, e.g. "
        "['pandas==2.2.2', './dist/mylib-0.1-py3-none-any.whl'] (as `%%flmrun --pip`: Flame installs "
        "them as an application's package).",
    ).tag(config=True)
    check_packages = Bool(
        True,
        help="Refuse a cell whose inputs or imports need an installed package that the runner lacks or "
        "has at another version (False: run it with what the runner has).",
    ).tag(config=True)

    shell: Any  # the InteractiveShell (traitlets declares it Optional)

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._connection: Connection | None = None

    def connection(self) -> Connection:
        """The notebook's Flame connection, made on first use from the configuration."""
        if self._connection is None:
            try:
                target = resolve()
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
            self._connection = self._new_connection(target)
        elif self._connection.requested != self.application:
            self._connection.use_application(self.application)
        self._connection.start_timeout = self.start_timeout
        return self._connection

    def _new_connection(self, target: Target) -> Connection:
        connection = Connection(target, self.application, self.connect_timeout)
        connection.notify = lambda message: print(f"flmrun: {message}", file=sys.stderr)
        return connection

    def shutdown(self) -> None:
        """Close this notebook's sessions and stop what it started."""
        if self._connection is not None:
            self._connection.shutdown()
            self._connection = None

    # Named "%flmrun": IPython's usage line adds one "%", and a cell magic has two.
    @magic_arguments(name="%flmrun")
    @argument(
        "--assign",
        metavar="NAMES",
        help="Comma-separated names to bring back into the notebook (default: every name the cell binds).",
    )
    @argument("--no-assign", action="store_true", help="Bring no names back; only show the output.")
    @argument("--timeout", type=float, metavar="SECONDS", help="Stop the cell after this long on the runner.")
    @argument(
        "--pip",
        action="append",
        metavar="REQUIREMENT",
        help="Run the cell on runners with this package installed: a requirement ('pandas==2.2.2') or "
        "a wheel file's path; repeat for several (see also FlameMagics.requirements). Flame installs them "
        "as the package of an application of their own, reused by cells with the same packages.",
    )
    @argument_group("Map over inputs")
    @argument(
        "--map",
        metavar="ITEM=ITERABLE",
        help="Run the cell once per element of ITERABLE (a Python expression evaluated in the notebook: "
        "xs, range(200), a generator...), bound to ITEM, as separate "
        "Flame tasks on up to --instances runners; the results are the cell's last expression per item, "
        "in input order.",
    )
    @argument("--into", metavar="NAME", help="--map: store the list of results in NAME (default: show it).")
    @argument(
        "--return-exceptions",
        action="store_true",
        help="--map: put a failed item's exception in its place instead of stopping at the first failure.",
    )
    @argument_group("Sessions and resources")
    @argument(
        "--session",
        metavar="NAME",
        help="Run in the named session: its runners, and what they imported, stay for later cells "
        "with the same --session (closed by `%%flame close NAME` or with the kernel).",
    )
    @argument("--instances", metavar="N", help="Runners working at once (--map, or a new --session).")
    @argument("--cpu", metavar="N", help="CPUs per runner instance.")
    @argument("--memory", metavar="SIZE", help="Memory per runner instance: bytes, or 512Mi, 2Gi...")
    @argument("--gpu", metavar="N", help="GPUs per runner instance.")
    @argument_group("Background")
    @argument(
        "--background",
        metavar="HANDLE",
        help="Return at once, with a handle in the notebook variable HANDLE (done(), result(), "
        "cancel(), await); the output appears in this cell when the cell finishes.",
    )
    @cell_magic
    def flmrun(self, line: str, cell_source: str) -> Any:
        """Run the cell on a Flame runner instead of the kernel.

        The notebook values the cell reads are sent with it (functions and
        classes defined in the notebook by value, installed modules by
        reference). What it prints and displays shows here; the names it
        binds come back into the notebook; its last expression is the cell's
        output; an exception is raised here with the remote traceback.

        With ``--map ITEM=ITERABLE`` the cell runs once per item, in parallel,
        with a progress display; names it binds are not brought back. By
        default the first failure stops the map and is raised naming the
        item; with ``--into NAME`` the results that finished are kept there
        (``NOT_DONE`` for the others, the exception for a failed item), also
        when the map is interrupted.

        Examples
        --------
        ::

            %%flmrun
            total = sum(x * x for x in data)
            total

            %%flmrun --assign model --timeout 600
            model = train(features, labels)

            %%flmrun --map path=paths --into sizes --instances 8
            len(open(path, "rb").read())

            %%flmrun --session gpu --gpu 1 --memory 16Gi
            import torch

            %%flmrun --background job
            model = train(features, labels)

            %%flmrun --pip "scikit-learn==1.5.2"
            from sklearn.linear_model import LinearRegression
        """
        line, map_spec = take_map_option(line)  # a Python expression, which the option parser would split
        args = parse_argstring(self.flmrun, line)
        if map_spec is not None:
            args.map = map_spec
        try:
            return self._run_cell(args, cell_source)
        except SyntaxError as exc:
            if not self._fail_with_syntax_error(exc):
                raise
            return None

    def _run_cell(self, args: Any, cell_source: str) -> Any:
        filename = f"<flmrun-cell-{self._prompt_number()}>"
        tree = self._parse(cell_source, filename)
        plan = self._plan(args)
        names = analyse(tree)
        connection = self.connection()
        session_id = None
        try:
            if plan.private:
                session_id = connection.open_session(plan.key)
                shipper = connection.session_shipper(session_id)
            else:
                shipper = connection.shipper(plan.key)
            # Large values go to Flame's object cache now, and travel by reference.
            reads = [name for name in names.reads if name != plan.item]
            with codec.record_modules() as used:
                inputs = pack(reads, self.shell.user_ns, shipper)
                if isinstance(plan.items, list) and plan.items:
                    _sample(plan.items[0])  # what the items need, as one of them shows (not read ahead)
        except (ShipError, RequestError) as exc:
            self._close_private(session_id)
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            self._close_private(session_id)
            raise CellFailed(str(exc)) from None
        request = cell.CellRequest(
            header=codec.local_header(),
            source=cell_source,
            filename=filename,
            first_line=FIRST_BODY_LINE,
            inputs=inputs,
            assign=[] if plan.item else self._names_to_assign(args, names.binds),
            timeout=self.timeout if args.timeout is None else args.timeout,
            values_only=plan.item is not None,
            send_frames=debugger.frames_with_error(plan, self.shell.call_pdb),
        )
        try:
            # The notebook's own modules the cell uses travel with it; installed packages are checked.
            connection.environment.attach(request, tree, used, shipper, check=self.check_packages)
            environments.leave_to_pip(request, plan.key.requirements)
        except ShipError as exc:
            self._close_private(session_id)
            raise UsageError(str(exc)) from None
        if plan.item is not None:
            return self._map(plan, request)
        asked = list(request.assign) if args.assign is not None else []
        if plan.background is not None:
            return self._background(plan, request, session_id, asked)
        try:
            result = connection.run(request, plan.key, show=self._show_output, grace=self.interrupt_grace)
        except ShipError as exc:
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            raise CellFailed(str(exc)) from None
        return self._present(result, asked, connection.session(plan.key))

    def _plan(self, args: Any) -> Plan:
        """Check the options of a %%flmrun cell and say where it runs."""
        connection = self.connection()
        try:
            requirements = environments.parse([*self.requirements, *(args.pip or [])])
            where = plan(args, self.shell.user_ns, connection.named, self._default_instances)
        except (RequestError, environments.RequirementError) as exc:
            raise UsageError(str(exc)) from None
        # Runners with packages installed are sessions of their own (see flame_magic.environments).
        if requirements and where.key.requirements != requirements:
            if where.key.name is not None and connection.named(where.key.name) is not None:
                raise UsageError(
                    f"Session {where.key.name!r} is open with other packages "
                    f"({environments.describe(where.key.requirements) or 'none'}): run "
                    f"`%flame close {where.key.name}` first to open it with these."
                )
            where.key = dataclasses.replace(where.key, requirements=requirements)
        return where

    def _default_instances(self) -> int:
        if self.map_instances > 0:
            return int(self.map_instances)
        return (os.cpu_count() or 1) if self.connection().target.embedded else 4

    def _close_private(self, session_id: str | None) -> None:
        if session_id is not None:
            self.connection().close_session(session_id)

    def _map(self, plan: Plan, request: cell.CellRequest) -> Any:
        """Run a --map cell and present its results."""
        assert plan.item is not None and plan.items is not None
        if isinstance(plan.items, list) and not plan.items:
            return self._map_results(plan, MapOutcome(results=[]), None, [])
        connection = self.connection()
        items = plan.items if isinstance(plan.items, list) else []
        try:
            session_id = connection.session(plan.key)
            shared = connection.prepare(request, session_id)
            # With a cache, each item's live output on a channel of its own, shown in input order.
            channel = uuid.uuid4().hex if request.HasField("cache") else ""
            payloads: Iterable[bytes]
            if isinstance(plan.items, list):  # every item is checked before any is sent
                payloads = [
                    connection.task_input(session_id, payload)
                    for payload in item_payloads(shared, plan.item, plan.items, TASK_INPUT_LIMIT, channel)
                ]
            else:  # read as the map goes; the items seen are kept for the messages
                payloads = (
                    connection.task_input(session_id, payload)
                    for payload in iter_item_payloads(
                        shared, plan.item, _kept(plan.items, items), TASK_INPUT_LIMIT, channel
                    )
                )
            client = connection.client()
        except (ShipError, RequestError) as exc:
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            raise CellFailed(str(exc)) from None
        progress = ProgressDisplay(self.shell, f"flmrun --map {plan.item}={plan.source}")
        runners = RunnerCount(client, session_id)
        waiting = connection.pending_watch(session_id)

        def on_progress(done: Progress) -> None:
            progress.update(done)
            runners.sample()
            if done.done == 0:
                waiting()  # a map whose runners do not start, or that finds no room, says so

        def show(output: cell.Output) -> None:
            progress.close()  # in a terminal, an item's output starts below the progress line
            self._show_output(output)

        def live(index: int) -> LiveChannel | None:
            return connection.live_channel(session_id, show, f"{channel}-{index}")

        run = MapRun(
            client,
            session_id,
            payloads,
            plan.key.instances,
            result_of=connection.result_of,
            value_of=self._value_of,
            stop_at_failure=not plan.return_exceptions,
            on_progress=on_progress,
            show=show,
            live=live if channel else None,
        )
        try:
            outcome = run.run()
        except RunnerStartTimeout as exc:
            connection.close_session(session_id)
            raise CellFailed(f"{exc}. The map's session was closed.") from None
        finally:
            progress.close()
        runners.sample(force=True)
        wanted = min(plan.key.instances, len(outcome.results))
        if runners.known and runners.most < wanted:
            print(
                f"flmrun: --map asked Flame for {wanted} runners and got {runners.most} (the cluster's "
                "other executors were in use, or the items were done before more started); "
                "`%flame status` shows this notebook's sessions.",
                file=sys.stderr,
            )
        return self._map_results(plan, outcome, session_id, items)

    def _map_results(self, plan: Plan, outcome: MapOutcome, session_id: str | None, items: list[Any]) -> Any:
        for _, result in outcome.outputs:
            self._show_outputs(result)
        results = outcome.results
        if plan.into is not None:
            self.shell.user_ns[plan.into] = results
        stopped = (
            outcome.interrupted
            or outcome.fatal is not None
            or (outcome.failure is not None and not plan.return_exceptions)
        )
        if not stopped:
            return None if plan.into is not None else results
        connection = self.connection()
        if session_id is not None and plan.key.name is None:
            # Cancels the items sent but not started, unless one still runs (Flame then refuses).
            connection.close_session(session_id)
        done = sum(1 for value in results if value is not NOT_DONE)
        total = outcome.progress.total if outcome.progress is not None else len(results)
        after = f"after {done} of {total} items" if total is not None else f"after {done} items"
        if plan.into is not None:
            kept = f"`{plan.into}` holds the {done} results that finished (NOT_DONE for the others)."
        else:
            kept = "Use --into NAME to keep the results of the items that finished."
        left = (
            f" {outcome.left_running} items sent to Flame may still finish there, unseen."
            if outcome.left_running
            else ""
        )
        if outcome.fatal is not None:
            fatal = outcome.fatal
            if session_id is not None:
                if isinstance(fatal, SessionStartError):
                    connection.close_session(session_id)  # its runners cannot start: a new one next time
                    failed = connection.install_failure(session_id, fatal)
                    if failed is not None:
                        raise CellFailed(failed)
                elif isinstance(fatal, SessionGoneError) or connection.session_gone(session_id):
                    connection.forget(session_id)
            raise CellFailed(f"{fatal} The map stopped {after}. {kept}")
        if outcome.interrupted:
            raise MapInterrupted(f"The map stopped {after}. {kept}{left}", results)
        assert outcome.failure is not None
        index, error = outcome.failure
        value = reprlib.Repr()
        value.maxstring = value.maxother = 60
        of = f" of {total}" if total is not None else ""
        item = f"{plan.item}={value.repr(items[index])}"
        add_note(error, f"Item {index}{of} failed ({item}); the map stopped. {kept}{left}")
        debugger.name_failure(error, f"item {index} of the map ({item})")
        raise error

    def _background(
        self, plan: Plan, request: cell.CellRequest, session_id: str | None, asked: list[str]
    ) -> None:
        """Start a --background cell and store its handle in the notebook."""
        assert plan.background is not None
        connection = self.connection()
        parent = current_parent(self.shell)

        def show(output: cell.Output) -> None:
            with output_to(self.shell, parent):  # live output, into the cell that started it
                self._show_output(output)

        try:
            session_id = session_id or connection.session(plan.key)
            live = connection.live_channel(session_id, show)
            request.channel = live.channel if live is not None else ""
            data = connection.task_input(session_id, connection.prepare(request, session_id))
            task = connection.client().create_task(session_id, data)
        except (ShipError, RequestError) as exc:
            self._close_private(session_id if plan.private else None)
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            self._close_private(session_id if plan.private else None)
            raise CellFailed(str(exc)) from None
        name = plan.background

        def finish(task: Any) -> Any:
            with output_to(self.shell, parent):
                try:
                    value = self._present(connection.result_of(task), asked)
                except BaseException as exc:
                    self._show_error(exc)
                    debugger.remember(exc)  # %debug opens it, as for an error a cell raised
                    raise
                if value is not None:
                    display(value)
                return value

        def fail(exc: BaseException) -> BaseException:
            said = connection.install_failure(session_id, exc) if isinstance(exc, Exception) else None
            error = CellFailed(f"{said or exc} The background cell `{name}` did not run to its end.")
            with output_to(self.shell, parent):
                self._show_error(error)
            return error

        close = (lambda: connection.close_session(session_id)) if plan.private else None
        if plan.private:
            connection.labels[session_id] = f"background `{name}`"
        label = f"{name} (cell {self._prompt_number()})"
        self.shell.user_ns[name] = follow(
            connection.client(),
            session_id,
            task.metadata.id,
            label,
            finish,
            fail,
            close,
            live,
            pending=connection.pending_watch(session_id),
        )
        print(f"flmrun: running in the background; `{name}.result()` or `await {name}` gives its value.")

    @staticmethod
    def _show_error(exc: BaseException) -> None:
        render = getattr(exc, "_render_traceback_", None)
        lines = render() if render is not None else [f"{type(exc).__name__}: {exc}"]
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()

    def _parse(self, source: str, filename: str) -> ast.Module:
        try:
            tree = ast.parse(source, filename)
        except SyntaxError as exc:
            if self._is_ipython_syntax(source):
                raise UsageError(
                    "%%flmrun cells run plain Python on the runner: magics (%...) and shell escapes "
                    "(!...) are not available there. Move those lines to a local cell."
                ) from None
            raise self._cell_syntax_error(exc, filename, source) from None
        try:
            # What only the compiler finds (`return` outside a function...), found before anything is sent.
            compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        except SyntaxError as exc:
            raise self._cell_syntax_error(exc, filename, source) from None
        return tree

    def _cell_syntax_error(self, exc: SyntaxError, filename: str, source: str) -> SyntaxError:
        """The error at its place in the notebook's cell, which tracebacks name ``Cell In[N]``."""
        text = exc.text
        if text is None and exc.lineno:  # the compiler, given a tree, knows no source text
            lines = source.splitlines()
            text = lines[exc.lineno - 1] if exc.lineno <= len(lines) else None
        shift = FIRST_BODY_LINE - 1
        lineno = None if exc.lineno is None else exc.lineno + shift
        end_lineno = None if exc.end_lineno is None else exc.end_lineno + shift
        where = self._ipython_cell_file() or filename
        return type(exc)(exc.msg, (where, lineno, exc.offset, text, end_lineno, exc.end_offset))

    def _ipython_cell_file(self) -> str | None:
        """The file name IPython gave the running cell (its tracebacks show it as ``Cell In[N]``)."""
        number = self._prompt_number()
        names = getattr(self.shell.compile, "_filename_map", {})
        found = [name for name, count in names.items() if count == number]
        return found[-1] if found else None

    def _fail_with_syntax_error(self, exc: SyntaxError) -> bool:
        """Show a syntax error as IPython shows one of a local cell, and fail the cell; False if not a cell.

        IPython shows a SyntaxError raised while a cell runs with the stack that raised it
        (our magic's), ignoring ``_render_traceback_``; a local cell's shows only its line.
        """
        running = getattr(self.shell.displayhook, "exec_result", None)
        info = getattr(running, "info", None)
        if running is None or not getattr(info, "raw_cell", "").lstrip().startswith("%%flmrun"):
            return False  # called from code, not as the cell: raise as usual
        render = getattr(exc, "_render_traceback_", None)
        if render is not None:  # a remote one: the runner's text
            lines = render()
        else:
            lines = self.shell.SyntaxTB.structured_traceback(type(exc), exc, [])
        self.shell._showtraceback(type(exc), exc, lines)
        running.error_in_exec = exc
        return True

    def _is_ipython_syntax(self, source: str) -> bool:
        transformed = self.shell.transform_cell(source)
        if transformed == source:
            return False
        try:
            ast.parse(transformed)
        except SyntaxError:
            return False
        return True

    @staticmethod
    def _names_to_assign(args: Any, binds: tuple[str, ...]) -> list[str]:
        if args.no_assign:
            return []
        if args.assign is None:
            return list(binds)
        wanted = [name.strip() for name in args.assign.split(",") if name.strip()]
        for name in wanted:
            if not name.isidentifier():
                raise UsageError(f"--assign takes comma-separated Python names; {name!r} is not one.")
        return wanted

    def _prompt_number(self) -> int:
        """The number of the cell running now, as its prompt shows it (``In [N]``).

        IPython counts the cell as run before running it: the shell's count is then one more.
        """
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None)
        return int(number) if number is not None else int(self.shell.execution_count)

    def _present(
        self, result: cell.CellResult, asked: list[str] | None = None, session_id: str | None = None
    ) -> Any:
        """Show what the cell showed, assign what it bound, raise its error or return its value.

        Parameters
        ----------
        asked
            The names ``--assign`` asked for: those the cell did not bind are named.
        session_id
            Where ``%debug`` can ask for a failure's frames.
        """
        self._show_outputs(result)
        for value in result.assigned:
            try:
                self.shell.user_ns[value.name] = self.connection().load(value)
            except Exception as exc:
                print(
                    f"flmrun: `{value.name}` could not be brought back into the notebook: "
                    f"{type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
        for missing in result.not_returned:
            print(f"flmrun: `{missing.name}` stays on the runner: {missing.reason}", file=sys.stderr)
        came = {value.name for value in result.assigned} | {missing.name for missing in result.not_returned}
        unbound = [name for name in asked or () if name not in came]
        if unbound and not result.HasField("error"):
            listed = ", ".join(f"`{name}`" for name in unbound)
            print(
                f"flmrun: --assign: the cell did not bind {listed}; nothing came back for "
                f"{'it' if len(unbound) == 1 else 'them'}.",
                file=sys.stderr,
            )
        if result.HasField("error"):
            fetch = debugger.fetcher(self.connection(), session_id) if session_id else None
            raise debugger.remote_failure(result.error, fetch)
        return self._value_of(result)

    @staticmethod
    def _show_outputs(result: cell.CellResult) -> None:
        """What the cell printed and displayed, in order."""
        for output in result.outputs:
            FlameMagics._show_output(output)

    @staticmethod
    def _show_output(output: cell.Output) -> None:
        """One thing the cell printed or displayed, shown here."""
        if output.HasField("stream"):
            stream = sys.stderr if output.stream.name == "stderr" else sys.stdout
            stream.write(output.stream.text)
            stream.flush()
        else:
            bundle = output.display
            publish_display_data(json.loads(bundle.data_json), json.loads(bundle.metadata_json or "{}"))

    def _value_of(self, result: cell.CellResult) -> Any:
        """The cell's last value: unpickled, else as the runner showed it; None if there is none."""
        has_value = result.HasField("result_pickle") or result.HasField("result_value")
        if not result.HasField("result") and not has_value:
            return None
        if has_value:
            try:
                if result.HasField("result_value"):
                    return self.connection().load(result.result_value)
                return codec.loads(result.result_pickle)
            except Exception as exc:
                if not result.HasField("result"):  # a --map item: the runner made no rendering
                    text = f"<value that cannot be loaded here: {type(exc).__name__}: {exc}>"
                    return RemoteRepr(cell.MimeBundle(data_json=json.dumps({"text/plain": text})))
                # e.g. its library is not installed here: show the runner's rendering
        return RemoteRepr(result.result)

    @magic_arguments()
    @argument(
        "action",
        choices=["status", "close", "connect", "deploy"],
        help="status: show the Flame in use, its applications and this notebook's sessions; "
        "close: close this notebook's sessions (runners stop; the next cell starts afresh); "
        "connect: use another Flame; deploy: register flame-magic's runner on Flame and use it.",
    )
    @argument(
        "target",
        nargs="?",
        metavar="ENDPOINT|CONTEXT",
        help="connect: HOST:PORT, http(s)://HOST:PORT, unix:///PATH, or a context of ~/.flame/flame.yaml "
        "(none: back to FLAME_ENDPOINT, the current context, or the embedded Flame); "
        "close: the NAME of a session (%%flmrun --session NAME) to close only it.",
    )
    @argument("--ca-file", metavar="PATH", help="connect: CA certificate for https:// endpoints.")
    @argument("--name", metavar="NAME", help=f"deploy: application name (default: {deploy.DEFAULT_NAME}).")
    @argument(
        "--url",
        metavar="URL",
        help="deploy: file:///DIR/ (a directory every executor reads at the same path: the runner "
        "package is built into it and installed by Flame), or the url of a package built before.",
    )
    @argument("--installed", action="store_true", help="deploy: flame-magic is installed on the executors.")
    @argument("--python", metavar="PATH", help="deploy --installed: the executors' Python (python3.X).")
    @line_magic
    def flame(self, line: str) -> None:
        """Show or choose the Flame this notebook uses, close its sessions, or deploy the runner.

        Examples
        --------
        ::

            %flame status
            %flame close
            %flame close train
            %flame connect https://flame.example.org:8080 --ca-file /etc/flame/ca.crt
            %flame connect production
            %flame connect
            %flame deploy --url file:///shared/flame/packages/
            %flame deploy --installed --python /opt/venv/bin/python
        """
        args = parse_argstring(self.flame, line)
        misplaced = {
            "connect": bool((args.target and args.action != "close") or args.ca_file),
            "deploy": bool(args.name or args.url or args.installed or args.python),
        }
        for action, given in misplaced.items():
            if given and args.action != action:
                raise UsageError(f"`%flame {args.action}` takes none of the options of `%flame {action}`.")
        try:
            if args.action == "connect":
                self._connect(args.target, args.ca_file)
            elif args.action == "deploy":
                self._deploy(args)
            elif args.action == "close":
                self._close(args.target)
            else:
                self._status()
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            raise CellFailed(str(exc)) from None

    def _close(self, name: str | None = None) -> None:
        if name is not None:
            connection = self.connection()
            key = connection.named(name)
            if key is None:
                raise UsageError(f"This notebook has no open session named {name!r} (see `%flame status`).")
            session_id = connection.session(key)
            if connection.close_session(session_id):
                print(f"Closed session {name!r} ({session_id}).")
            else:
                print(
                    f"Flame refused to close session {name!r} ({session_id}): a task runs there. It stays "
                    f"open, with its values; run `%flame close {name}` again once it has ended."
                )
            return
        outcome = self.connection().close_all()
        if outcome.closed:
            print(f"Closed {len(outcome.closed)} session(s): {', '.join(outcome.closed)}.")
        for session_id, reason in outcome.refused.items():
            print(
                f"Flame refused to close session {session_id} ({reason}): a task runs there. It stays "
                "open, with its values in the object cache; run `%flame close` again once it has ended."
            )
        if not outcome.closed and not outcome.refused:
            print("No open sessions.")

    def _connect(self, name: str | None, ca_file: str | None) -> None:
        target = target_for(name, ca_file) if name else resolve()
        connection = self._new_connection(target)
        try:
            connection.client()  # fails here, naming the endpoint, if Flame cannot be reached
        except BaseException:
            connection.shutdown()
            raise
        if self._connection is not None:
            self._connection.shutdown()
        self._connection = connection
        print(f"Connected to Flame at {connection.endpoint} [{target.source}].")
        self._show_applications(connection)

    def _deploy(self, args: Any) -> None:
        connection = self.connection()
        client = connection.client()
        name = args.name or deploy.DEFAULT_NAME
        try:
            spec = deploy.choose_spec(
                url=args.url,
                installed=args.installed,
                python=args.python,
                embedded=connection.target.embedded,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not spec.HasField("url"):
            if deploy.executors_here(client.endpoint, connection.target.embedded):
                problem = deploy.check_python(spec.command)
                if problem:
                    raise UsageError(problem)
            else:
                print(
                    f"flmrun: cannot check from here that {spec.command} on the executors imports "
                    "flame_magic_runner; if it cannot, the first cell fails after "
                    f"FlameMagics.start_timeout ({self.start_timeout:g} s).",
                    file=sys.stderr,
                )
        if connection.application == name and deploy.would_change(client, name, spec):
            connection.close_sessions()  # Flame updates only an application without open sessions
        done = deploy.deploy(client, name, spec)
        self.application = name
        if connection.application != name:
            connection.use_application(name)
        else:
            connection.requested = name  # the application in use, now by name: its sessions stay
        command = " ".join([done.spec.command, *done.spec.arguments])
        where = f", installed from {done.spec.url}" if done.spec.url else ""
        print(
            f"Application {name!r} {done.action} on Flame at {client.endpoint}: `{command}`{where}. "
            f"This notebook now uses it (FlameMagics.application = {name!r})."
        )

    def _status(self) -> None:
        connection = self.connection()
        print(f"Flame: {connection.endpoint or '(embedded, not started yet)'} [{connection.target.source}]")
        if connection.endpoint:
            self._show_applications(connection)
        print(f"Application: {connection.application}")
        if connection.endpoint:
            print(f"Path: {connection.path()}")
        for line in connection.environment.status():
            print(line)
        sessions = connection.sessions()
        if not sessions:
            print("Sessions: none yet")
        for info in sessions:
            label = f" [{info.label}]" if info.label else ""
            print(
                f"Session {info.session_id}{label} ({info.application}, {info.state}): "
                f"{info.pending} pending, {info.running} running, {info.succeed} succeeded, "
                f"{info.failed} failed, {info.cancelled} cancelled"
            )

    @staticmethod
    def _show_applications(connection: Connection) -> None:
        applications = connection.applications()
        print(f"Applications: {', '.join(deploy.describe(a) for a in applications) or 'none'}")
        mine = next((a for a in applications if a.metadata.name == connection.application), None)
        problem = deploy.check_application(mine, connection.application, connection.endpoint)
        if problem:
            print(problem)


def _kept(items: Iterator[Any], seen: list[Any]) -> Iterator[Any]:
    """``items``, each also appended to ``seen``."""
    for item in items:
        seen.append(item)
        yield item


def _sample(item: Any) -> None:
    """Pickle one --map item to note the modules it needs (one that does not pickle is reported later)."""
    try:
        codec.dumps(item)
    except codec.UnpicklableError:
        pass


def load(ip: Any) -> None:
    """Register the magics once per shell and close sessions when the kernel exits."""
    if "FlameMagics" in ip.magics_manager.registry:
        return
    magics = FlameMagics(ip)
    ip.register_magics(magics)
    debugger.install(ip)
    atexit.register(magics.shutdown)


def unload(ip: Any) -> None:
    """Close sessions and remove the magics, so that loading again starts clean."""
    magics = ip.magics_manager.registry.pop("FlameMagics", None)
    if magics is None:
        return
    atexit.unregister(magics.shutdown)
    magics.shutdown()
    debugger.uninstall(ip)
    ip.magics_manager.magics["cell"].pop("flmrun", None)
    ip.magics_manager.magics["line"].pop("flame", None)
