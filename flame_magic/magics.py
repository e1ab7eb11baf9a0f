"""The ``%%flmrun`` and ``%flame`` magics: options in, results shown."""

from __future__ import annotations

import ast
import atexit
import json
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import publish_display_data
from traitlets import Float, Unicode

from flame_magic import codec
from flame_magic.capture import ShipError, analyse, pack
from flame_magic.client import FlameError
from flame_magic.config import ConfigError, resolve
from flame_magic.errors import CellFailed, CellSyntaxError, remote_error
from flame_magic.protocol import cell
from flame_magic.remote import Connection

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

    application = Unicode("flmrun", help="The Flame application whose processes run the cells.").tag(
        config=True
    )
    timeout = Float(0.0, help="Seconds a cell may run on the runner before it is stopped (0: no limit).").tag(
        config=True
    )
    connect_timeout = Float(10.0, help="Seconds to wait for the Flame session manager.").tag(config=True)

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
            self._connection = Connection(target, self.application, self.connect_timeout)
        elif self._connection.application != self.application:
            self._connection.use_application(self.application)
        return self._connection

    def shutdown(self) -> None:
        """Close this notebook's sessions and stop what it started."""
        if self._connection is not None:
            self._connection.shutdown()
            self._connection = None

    @magic_arguments()
    @argument(
        "--assign",
        metavar="NAMES",
        help="Comma-separated names to bring back into the notebook (default: every name the cell binds).",
    )
    @argument("--no-assign", action="store_true", help="Bring no names back; only show the output.")
    @argument("--timeout", type=float, metavar="SECONDS", help="Stop the cell after this long on the runner.")
    @cell_magic
    def flmrun(self, line: str, cell_source: str) -> Any:
        """Run the cell on a Flame runner instead of the kernel.

        The notebook values the cell reads are sent with it (functions and
        classes defined in the notebook by value, installed modules by
        reference). What it prints and displays shows here; the names it
        binds come back into the notebook; its last expression is the cell's
        output; an exception is raised here with the remote traceback.

        Examples
        --------
        ::

            %%flmrun
            total = sum(x * x for x in data)
            total

            %%flmrun --assign model --timeout 600
            model = train(features, labels)
        """
        args = parse_argstring(self.flmrun, line)
        filename = f"<flmrun-cell-{self.shell.execution_count}>"
        tree = self._parse(cell_source, filename)
        names = analyse(tree)
        try:
            inputs = pack(names.reads, self.shell.user_ns)
        except ShipError as exc:
            raise UsageError(str(exc)) from None
        request = cell.CellRequest(
            header=codec.local_header(),
            source=cell_source,
            filename=filename,
            first_line=FIRST_BODY_LINE,
            inputs=inputs,
            assign=self._names_to_assign(args, names.binds),
            timeout=self.timeout if args.timeout is None else args.timeout,
        )
        try:
            result = self.connection().run(request)
        except ShipError as exc:
            raise UsageError(str(exc)) from None
        except FlameError as exc:
            raise CellFailed(str(exc)) from None
        return self._present(result)

    def _parse(self, source: str, filename: str) -> ast.Module:
        try:
            return ast.parse(source, filename)
        except SyntaxError as exc:
            if self._is_ipython_syntax(source):
                raise UsageError(
                    "%%flmrun cells run plain Python on the runner: magics (%...) and shell escapes "
                    "(!...) are not available there. Move those lines to a local cell."
                ) from None
            error = CellSyntaxError(
                exc.msg, (filename, (exc.lineno or 1) + FIRST_BODY_LINE - 1, exc.offset, exc.text, None, None)
            )
            raise error from None

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

    def _present(self, result: cell.CellResult) -> Any:
        for output in result.outputs:
            if output.HasField("stream"):
                stream = sys.stderr if output.stream.name == "stderr" else sys.stdout
                stream.write(output.stream.text)
                stream.flush()
            else:
                display = output.display
                publish_display_data(json.loads(display.data_json), json.loads(display.metadata_json or "{}"))
        for value in result.assigned:
            try:
                self.shell.user_ns[value.name] = codec.loads(value.pickle)
            except Exception as exc:
                print(
                    f"flmrun: `{value.name}` could not be brought back into the notebook: "
                    f"{type(exc).__name__}: {exc}",
                    file=sys.stderr,
                )
        for missing in result.not_returned:
            print(f"flmrun: `{missing.name}` stays on the runner: {missing.reason}", file=sys.stderr)
        if result.HasField("error"):
            error = result.error
            raise remote_error(error.ename, error.evalue, error.traceback)
        if not result.HasField("result"):
            return None
        if result.HasField("result_pickle"):
            try:
                return codec.loads(result.result_pickle)
            except Exception:
                pass  # e.g. its library is not installed here: show the runner's rendering
        return RemoteRepr(result.result)

    @magic_arguments()
    @argument(
        "action",
        choices=["status", "close"],
        help="status: show the Flame in use and sessions; "
        "close: close this notebook's sessions (runners stop; the next cell starts afresh).",
    )
    @line_magic
    def flame(self, line: str) -> None:
        """Show the Flame this notebook uses, or close its sessions.

        Examples
        --------
        ::

            %flame status
            %flame close
        """
        args = parse_argstring(self.flame, line)
        connection = self.connection()
        if args.action == "close":
            closed = connection.close_sessions()
            print(f"Closed {len(closed)} session(s): {', '.join(closed)}" if closed else "No open sessions.")
            return
        print(f"Flame: {connection.endpoint or '(embedded, not started yet)'} [{connection.target.source}]")
        print(f"Application: {connection.application}")
        sessions = connection.sessions()
        if not sessions:
            print("Sessions: none yet")
        for info in sessions:
            print(
                f"Session {info.session_id} ({info.application}, {info.state}): "
                f"{info.pending} pending, {info.running} running, {info.succeed} succeeded, "
                f"{info.failed} failed, {info.cancelled} cancelled"
            )


def load(ip: Any) -> None:
    """Register the magics once per shell and close sessions when the kernel exits."""
    if "FlameMagics" in ip.magics_manager.registry:
        return
    magics = FlameMagics(ip)
    ip.register_magics(magics)
    atexit.register(magics.shutdown)


def unload(ip: Any) -> None:
    """Close sessions and remove the magics, so that loading again starts clean."""
    magics = ip.magics_manager.registry.pop("FlameMagics", None)
    if magics is None:
        return
    atexit.unregister(magics.shutdown)
    magics.shutdown()
    ip.magics_manager.magics["cell"].pop("flmrun", None)
    ip.magics_manager.magics["line"].pop("flame", None)
