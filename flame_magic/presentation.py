"""What a ``%%flmrun`` cell shows: its outputs, its names assigned, its error or its value.

The engine gives results as data (:class:`flame_magic.engine.Result`, ``MapOutcome``);
this module shows them in the notebook, and routes a background cell's output to the cell
that started it. In a Jupyter kernel the output must land in that cell, not in whichever
cell runs then: ipykernel routes output by the *parent* message, which it keeps per thread
(``set_thread_parent``), so the parent is captured at submission and the output presented
under it (:func:`output_to`).
"""

from __future__ import annotations

import contextlib
import json
import reprlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from IPython.display import publish_display_data

from flame_magic import applications, debugger
from flame_magic.engine import Engine
from flame_magic.errors import CellFailed, MapInterrupted, add_note
from flame_magic.fanout import NOT_DONE
from flame_magic.items import MapOutcome
from flame_magic.protocol import cell
from flame_magic.remote import Connection
from flame_magic.results import Result


def note(message: str) -> None:
    """One line for the user, on stderr, as every flmrun note."""
    print(f"flmrun: {message}", file=sys.stderr)


def show_output(output: cell.Output) -> None:
    """One thing the cell printed or displayed, shown here."""
    if output.HasField("stream"):
        stream = sys.stderr if output.stream.name == "stderr" else sys.stdout
        stream.write(output.stream.text)
        stream.flush()
    else:
        bundle = output.display
        publish_display_data(json.loads(bundle.data_json), json.loads(bundle.metadata_json or "{}"))


def show_outputs(outputs: Iterable[cell.Output]) -> None:
    """What the cell printed and displayed, in order."""
    for output in outputs:
        show_output(output)


def show_error(exc: BaseException) -> None:
    """An error shown as IPython would show it, outside a cell (a background cell's)."""
    render = getattr(exc, "_render_traceback_", None)
    lines = render() if render is not None else [f"{type(exc).__name__}: {exc}"]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def present(result: Result, namespace: dict[str, Any]) -> Any:
    """Show what the cell showed, assign what it bound, raise its error or return its value."""
    show_outputs(result.outputs)
    namespace.update(result.assigned)
    for name, why in result.unloadable.items():
        note(f"`{name}` could not be brought back into the notebook: {why}")
    for name, reason in result.not_returned.items():
        note(f"`{name}` stays on the runner: {reason}")
    if result.missing:
        listed = ", ".join(f"`{name}`" for name in result.missing)
        them = "it" if len(result.missing) == 1 else "them"
        note(f"--assign: the cell did not bind {listed}; nothing came back for {them}.")
    if result.error is not None:
        raise result.error
    return result.value


def present_map(
    outcome: MapOutcome,
    item: str,
    into: str | None,
    namespace: dict[str, Any],
    instances: int,
    return_exceptions: bool,
) -> Any:
    """Show a map's outputs and results; raise why it stopped, saying what was kept.

    Parameters
    ----------
    item
        The name the items were bound to (``--map ITEM=...``).
    into
        ``--into NAME``: the notebook variable for the results (else they are the value).
    instances
        The runners asked for, to say when fewer came.
    return_exceptions
        Whether failures took their items' places (then only Flame or an interrupt stops it).
    """
    for _, result in outcome.outputs:
        show_outputs(result.outputs)
    wanted = min(instances, len(outcome.results))
    if outcome.runners is not None and outcome.runners < wanted:
        note(
            f"--map asked Flame for {wanted} runners and got {outcome.runners} (the cluster's other "
            "executors were in use, or the items were done before more started); `%flame status` "
            "shows this notebook's sessions."
        )
    results = outcome.results
    if into is not None:
        namespace[into] = results
    done = sum(1 for value in results if value is not NOT_DONE)
    total = outcome.progress.total if outcome.progress is not None else len(results)
    after = f"after {done} of {total} items" if total is not None else f"after {done} items"
    if into is not None:
        kept = f"`{into}` holds the {done} results that finished (NOT_DONE for the others)."
    else:
        kept = "Use --into NAME to keep the results of the items that finished."
    left = (
        f" {outcome.left_running} items sent to Flame may still finish there, unseen."
        if outcome.left_running
        else ""
    )
    if outcome.fatal is not None:
        raise CellFailed(f"{outcome.fatal} The map stopped {after}. {kept}")
    if outcome.interrupted:
        raise MapInterrupted(f"The map stopped {after}. {kept}{left}", results)
    if outcome.failure is None or return_exceptions:
        return None if into is not None else results
    index, error = outcome.failure
    value = reprlib.Repr()
    value.maxstring = value.maxother = 60
    of = f" of {total}" if total is not None else ""
    named = f"{item}={value.repr(outcome.items[index])}"
    add_note(error, f"Item {index}{of} failed ({named}); the map stopped. {kept}{left}")
    debugger.name_failure(error, f"item {index} of the map ({named})")
    raise error


def current_parent(shell: Any) -> Any:
    """The message of the cell now running (Jupyter), or None outside a kernel."""
    get_parent = getattr(shell, "get_parent", None)
    if get_parent is None or not hasattr(shell, "set_thread_parent"):
        return None
    try:
        return get_parent()
    except Exception:
        return None


@contextlib.contextmanager
def output_to(shell: Any, parent: Any) -> Iterator[None]:
    """Send what this thread prints and displays to the cell of ``parent`` (no-op outside a kernel)."""
    if not parent:
        yield
        return
    tokens = shell.set_thread_parent(parent)
    try:
        yield
    finally:
        # Buffered text is keyed by parent: flush it before the thread forgets it.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        shell.reset_thread_parent(tokens)


def show_status(engine: Engine) -> None:
    """``%flame status``: the Flame in use, its applications, the path, the modules and sessions."""
    connection = engine.connection
    print(f"Flame: {connection.endpoint or '(embedded, not started yet)'} [{connection.target.source}]")
    if connection.endpoint:
        show_applications(connection)
    print(f"Application: {connection.application}")
    if connection.endpoint:
        print(f"Path: {engine.path()}")
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


def show_applications(connection: Connection) -> None:
    """The applications of the Flame in use, and what stops the notebook's from running cells."""
    listed = connection.applications()
    print(f"Applications: {', '.join(applications.describe(a) for a in listed) or 'none'}")
    mine = next((a for a in listed if a.metadata.name == connection.application), None)
    problem = applications.check_application(mine, connection.application, connection.endpoint)
    if problem:
        print(problem)
