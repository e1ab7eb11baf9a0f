"""What a cell gave, as data: :class:`Result`; and a cell ready to send: :class:`Prepared`.

Values that came back are loaded here (through the object cache when they came by
reference); a remote exception is rebuilt from data (:mod:`flame_magic.errors`), never
unpickled. Presenting any of it is the magics' (:mod:`flame_magic.presentation`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flame_magic import debugger
from flame_magic.errors import DigestMismatch, RemoteError
from flame_magic.protocol import cell
from flame_magic.sessions import SessionKey

#: Sends a request that runs no cell to a session's runner (``Runs.ask``).
Ask = Callable[[str, cell.CellRequest], cell.CellResult]


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
        What it printed and displayed, in order (``cell.Output`` messages), but for what a
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


def load_result(
    raw: cell.CellResult,
    load: Callable[[cell.Value], Any],
    ask: Ask | None = None,
    asked: list[str] | None = None,
    session_id: str | None = None,
) -> Result:
    """A :class:`Result` from the runner's ``CellResult``: values loaded, the error rebuilt.

    Parameters
    ----------
    load
        Loads a value that came back (through the object cache if it came by reference).
    ask, session_id
        Sends a request to a session's runner, and the session: where ``%debug`` can ask
        for a failure's frames later (None: only frames that came with the error).
    asked
        The names asked for by name: those the cell did not bind are ``missing``.
    """
    result = Result(outputs=list(raw.outputs))
    for value in raw.assigned:
        try:
            result.assigned[value.name] = load(value)
        except Exception as exc:
            result.unloadable[value.name] = f"{type(exc).__name__}: {exc}"
    result.not_returned = {missing.name: missing.reason for missing in raw.not_returned}
    if raw.HasField("error"):
        fetch = debugger.fetcher(ask, session_id) if ask is not None and session_id else None
        result.error = debugger.remote_failure(raw.error, fetch)
        return result
    came = {*result.assigned, *result.unloadable, *result.not_returned}
    result.missing = [name for name in asked or () if name not in came]
    result.value = load_value(raw, load)
    return result


def load_value(raw: cell.CellResult, load: Callable[[cell.Value], Any]) -> Any:
    """The cell's last value: unpickled, else as the runner showed it; None if there is none."""
    if not raw.HasField("result") and not raw.HasField("value"):
        return None
    if raw.HasField("value"):
        try:
            return load(raw.value)
        except DigestMismatch:
            raise  # not the runner's rendering either: the cache may have been tampered with
        except Exception as exc:
            if not raw.HasField("result"):  # a map item: the runner made no rendering
                text = f"<value that cannot be loaded here: {type(exc).__name__}: {exc}>"
                return RemoteRepr(cell.MimeBundle(data_json=json.dumps({"text/plain": text})))
            # e.g. its library is not installed here: show the runner's rendering
    return RemoteRepr(raw.result)
