"""A cell's exception as data (``RemoteException``): nothing is pickled to show it."""

from __future__ import annotations

import builtins
import traceback

from flame_magic.protocol import cell

from .text import clean, safe_str, type_name


def remote_exception(exc: BaseException, filename: str) -> cell.RemoteException:
    """Describe an exception raised by a cell as Python would print it.

    The runner's own frames are removed, so the traceback starts at the cell's frame
    and shows none of the runner's signal handlers (interrupt, timeout); chained
    exceptions are kept.

    Parameters
    ----------
    exc
        The exception the cell raised.
    filename
        The cell's filename: frames before its first frame are the runner's.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    # No cell frame at all: the source never ran (a SyntaxError), so show no frames.
    exc.__traceback__ = tb
    _drop_runner_frames(exc)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = f"{type_name(exc)}: {safe_str(exc)}\n"
    return cell.RemoteException(
        ename=clean(type_name(exc)),
        evalue=clean(safe_str(exc)),
        traceback=clean(text),
        builtin_bases=_builtin_bases(exc),
    )


# The runner's own modules, by name: also when they travel as source (no files, a private package).
_RUNNER_PACKAGE = __name__.rpartition(".")[0] + "."


def _drop_runner_frames(exc: BaseException) -> None:
    """Unlink the frames of the runner's own files from ``exc``'s traceback and its chain's."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        kept = []
        tb = current.__traceback__
        while tb is not None:
            if not str(tb.tb_frame.f_globals.get("__name__", "")).startswith(_RUNNER_PACKAGE):
                kept.append(tb)
            tb = tb.tb_next
        for entry, following in zip(kept, [*kept[1:], None]):  # noqa: B905 - one longer when kept is empty
            entry.tb_next = following
        current.__traceback__ = kept[0] if kept else None
        pending += [current.__cause__, current.__context__]


def _builtin_bases(exc: BaseException) -> list[str]:
    """The builtin exception classes an exception's class derives from, most derived first."""
    return [
        base.__name__
        for base in type(exc).__mro__[1:]
        if getattr(builtins, base.__name__, None) is base and base not in (BaseException, Exception, object)
    ]


def input_error(name: str, exc: BaseException) -> cell.RemoteException:
    """The error for a notebook value that does not unpickle on the executor."""
    evalue = f"{safe_str(exc)} (while loading the notebook's value {name!r} on the executor)"
    if isinstance(exc, ImportError):
        evalue += " — install it on the executor"
    elif isinstance(exc, AttributeError):
        evalue += " — the executor may have another version of the library that defines it"
    ename = type_name(exc)
    text = f"Could not load the notebook's value {name!r} on the executor.\n{ename}: {evalue}\n"
    return cell.RemoteException(ename=ename, evalue=clean(evalue), traceback=clean(text))
