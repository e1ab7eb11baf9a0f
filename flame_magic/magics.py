"""The ``%%flmrun`` and ``%flame`` magics: options in, results shown.

Like IPython's own display magics, this module declares options, plans (which session,
which items) and presents; the engine (:mod:`flame_magic.engine`) runs, and
:mod:`flame_magic.presentation` shows. Errors become what a user sees in one place,
:func:`user_errors`.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Bool, Float, Int, List, Unicode

from flame_magic import applications, debugger, deploy, shm
from flame_magic.cells import FIRST_BODY_LINE, fail_with_syntax_error, parse_cell, prompt_number
from flame_magic.config import Target, resolve, target_for
from flame_magic.engine import Engine
from flame_magic.errors import CellFailed, FlameError, UsageProblem
from flame_magic.presentation import (
    current_parent,
    note,
    output_to,
    present,
    present_map,
    show_applications,
    show_error,
    show_output,
    show_status,
)
from flame_magic.progress import ProgressDisplay
from flame_magic.protocol import cell
from flame_magic.remote import Connection
from flame_magic.results import Prepared, Result
from flame_magic.sessions import Plan, plan, take_map_option
from flame_magic.wire import EMBEDDED_LIVE_POLL, INTERRUPT_GRACE, LIVE_POLL


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The one place where flame-magic's errors become what a user sees.

    A :class:`~flame_magic.errors.UsageProblem` (options, configuration, a value that
    cannot travel) is IPython's one-line ``UsageError``; a
    :class:`~flame_magic.errors.FlameError` (Flame refused, or cannot be reached) is a
    ``CellFailed``, one line and its notes. A remote error shows the remote traceback itself.
    """
    try:
        yield
    except UsageProblem as exc:
        raise UsageError(str(exc)) from None
    except FlameError as exc:
        raise CellFailed(str(exc)) from None


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
    live_poll_interval = Float(
        0.0,
        help="Seconds between two reads of a running cell's live output (0: automatic, "
        f"{EMBEDDED_LIVE_POLL:g} on the embedded Flame, {LIVE_POLL:g} on a cluster, where each read is a "
        "call to its object cache).",
    ).tag(config=True)
    interrupt_grace = Float(
        INTERRUPT_GRACE,
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
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        """The notebook's engine, made on first use from the configuration, with the settings now."""
        if self._engine is None:
            with user_errors():
                self._engine = self._new_engine(resolve())
        engine = self._engine
        engine.use_application(self.application)
        engine.connection.start_timeout = self.start_timeout
        engine.timeout = self.timeout
        engine.interrupt_grace = self.interrupt_grace
        engine.requirements = list(self.requirements)
        engine.check_packages = self.check_packages
        engine.connection.live_poll = self.live_poll_interval
        return engine

    def connection(self) -> Connection:
        """The engine's Flame connection (sessions, object cache), e.g. for tests and status."""
        return self.engine().connection

    def _new_engine(self, target: Target) -> Engine:
        return Engine(target, self.application, connect_timeout=self.connect_timeout, notify=note)

    def shutdown(self) -> None:
        """Close this notebook's sessions and stop what it started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

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
            with user_errors():
                return self._run_cell(args, cell_source)
        except SyntaxError as exc:
            if not fail_with_syntax_error(self.shell, exc):
                raise
            return None

    def _run_cell(self, args: Any, cell_source: str) -> Any:
        filename = f"<flmrun-cell-{prompt_number(self.shell)}>"
        tree = parse_cell(self.shell, cell_source, filename)
        engine = self.engine()
        where = plan(args, self.shell.user_ns, engine.connection.named, self._default_instances)
        prepared = engine.prepare(
            cell_source,
            self.shell.user_ns,
            tree=tree,
            filename=filename,
            first_line=FIRST_BODY_LINE,
            key=where.key,
            private=where.private,
            item=where.item,
            assign=self._names_to_assign(args),
            timeout=args.timeout,
            pip=args.pip or [],
            send_frames=debugger.frames_with_error(where, self.shell.call_pdb),
            samples=where.items if isinstance(where.items, list) else (),
        )
        if where.item is not None:
            return self._map(where, prepared)
        if where.background is not None:
            return self._background(where.background, prepared)
        result = engine.execute(prepared, show=show_output)
        return present(result, self.shell.user_ns)

    def _default_instances(self) -> int:
        return int(self.map_instances) if self.map_instances > 0 else self.engine().default_instances()

    def _map(self, where: Plan, prepared: Prepared) -> Any:
        """Run a --map cell with a progress display, and present its results."""
        assert where.item is not None and where.items is not None
        progress = ProgressDisplay(self.shell, f"flmrun --map {where.item}={where.source}")

        def show(output: cell.Output) -> None:
            progress.close()  # in a terminal, an item's output starts below the progress line
            show_output(output)

        try:
            outcome = self.engine().run_map(
                prepared,
                where.items,
                return_exceptions=where.return_exceptions,
                show=show,
                on_progress=progress.update,
            )
        finally:
            progress.close()
        return present_map(
            outcome, where.item, where.into, self.shell.user_ns, where.key.instances, where.return_exceptions
        )

    def _background(self, name: str, prepared: Prepared) -> None:
        """Start a --background cell and store its handle in the notebook."""
        parent = current_parent(self.shell)

        def show(output: cell.Output) -> None:
            with output_to(self.shell, parent):  # live output, into the cell that started it
                show_output(output)

        def finish(get: Callable[[], Result]) -> Any:
            with output_to(self.shell, parent):
                try:
                    value = present(get(), self.shell.user_ns)
                except BaseException as exc:
                    show_error(exc)
                    debugger.remember(exc)  # %debug opens it, as for an error a cell raised
                    raise
                if value is not None:
                    display(value)
                return value

        def failed(error: CellFailed) -> None:
            with output_to(self.shell, parent):
                show_error(error)

        label = f"{name} (cell {prompt_number(self.shell)})"
        handle = self.engine().start(
            prepared, name=name, label=label, show=show, finish=finish, failed=failed
        )
        self.shell.user_ns[name] = handle
        print(f"flmrun: running in the background; `{name}.result()` or `await {name}` gives its value.")

    @staticmethod
    def _names_to_assign(args: Any) -> list[str] | None:
        """``--assign a,b`` as names, ``[]`` for ``--no-assign``, None for every name the cell binds."""
        if args.no_assign:
            return []
        if args.assign is None:
            return None
        wanted = [name.strip() for name in args.assign.split(",") if name.strip()]
        for name in wanted:
            if not name.isidentifier():
                raise UsageError(f"--assign takes comma-separated Python names; {name!r} is not one.")
        return wanted

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
    @argument(
        "--name", metavar="NAME", help=f"deploy: application name (default: {applications.DEFAULT_NAME})."
    )
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
        with user_errors():
            if args.action == "connect":
                self._connect(args.target, args.ca_file)
            elif args.action == "deploy":
                self._deploy(args)
            elif args.action == "close":
                self._close(args.target)
            else:
                show_status(self.engine())

    def _close(self, name: str | None = None) -> None:
        engine = self.engine()
        if name is not None:
            closed = engine.close_named(name)
            if closed is None:
                raise UsageError(f"This notebook has no open session named {name!r} (see `%flame status`).")
            session_id, done = closed
            if done:
                print(f"Closed session {name!r} ({session_id}).")
            else:
                print(
                    f"Flame refused to close session {name!r} ({session_id}): a task runs there. It stays "
                    f"open, with its values; run `%flame close {name}` again once it has ended."
                )
            return
        outcome = engine.close_sessions()
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
        engine = self._new_engine(target)
        try:
            endpoint = engine.connect()  # fails here, naming the endpoint, if Flame cannot be reached
        except BaseException:
            engine.close()
            raise
        self.shutdown()
        self._engine = engine
        print(f"Connected to Flame at {endpoint} [{target.source}].")
        show_applications(engine.connection)

    def _deploy(self, args: Any) -> None:
        engine = self.engine()
        connection = engine.connection
        endpoint = engine.connect()
        spec = deploy.choose_spec(
            url=args.url, installed=args.installed, python=args.python, embedded=connection.target.embedded
        )
        if not spec.HasField("url"):
            if deploy.executors_here(endpoint, connection.target.embedded):
                problem = deploy.check_python(spec.command)
                if problem:
                    raise UsageError(problem)
            else:
                note(
                    f"cannot check from here that {spec.command} on the executors imports "
                    "flame_magic_runner; if it cannot, the first cell fails after "
                    f"FlameMagics.start_timeout ({self.start_timeout:g} s)."
                )
        name = args.name or applications.DEFAULT_NAME
        done = engine.deploy(name, spec)
        self.application = name
        command = " ".join([done.spec.command, *done.spec.arguments])
        where = f", installed from {done.spec.url}" if done.spec.url else ""
        print(
            f"Application {name!r} {done.action} on Flame at {endpoint}: `{command}`{where}. "
            f"This notebook now uses it (FlameMagics.application = {name!r})."
        )


def load(ip: Any) -> None:
    """Register the magics once per shell and close sessions when the kernel exits."""
    if "FlameMagics" in ip.magics_manager.registry:
        return
    shm.directory()  # removes the segments of kernels and runners that were killed
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
