"""A ``%%flmrun`` cell's source as IPython knows it: its number, its tree, its syntax errors.

A cell's syntax error is shown as IPython shows a local cell's (its line in ``Cell In[N]``
and a caret), before anything is sent; lines count as the notebook shows them (the body
starts on the line after ``%%flmrun``).
"""

from __future__ import annotations

import ast
from typing import Any

from IPython.core.error import UsageError

from flame_magic.results import parse

# The cell body starts on the line after `%%flmrun`, and tracebacks should
# count lines the way the notebook shows them.
FIRST_BODY_LINE = 2


def prompt_number(shell: Any) -> int:
    """The number of the cell running now, as its prompt shows it (``In [N]``).

    IPython counts the cell as run before running it: the shell's count is then one more.
    """
    running = getattr(shell.displayhook, "exec_result", None)
    number = getattr(running, "execution_count", None)
    return int(number) if number is not None else int(shell.execution_count)


def parse_cell(shell: Any, source: str, filename: str) -> ast.Module:
    """The cell's tree; a SyntaxError placed in the notebook's cell, or a UsageError for IPython syntax."""
    try:
        return parse(source, filename)
    except SyntaxError as exc:
        if _is_ipython_syntax(shell, source):
            raise UsageError(
                "%%flmrun cells run plain Python on the runner: magics (%...) and shell escapes "
                "(!...) are not available there. Move those lines to a local cell."
            ) from None
        raise _cell_syntax_error(shell, exc, filename, source) from None


def _cell_syntax_error(shell: Any, exc: SyntaxError, filename: str, source: str) -> SyntaxError:
    """The error at its place in the notebook's cell, which tracebacks name ``Cell In[N]``."""
    text = exc.text
    if text is None and exc.lineno:  # the compiler, given a tree, knows no source text
        lines = source.splitlines()
        text = lines[exc.lineno - 1] if exc.lineno <= len(lines) else None
    shift = FIRST_BODY_LINE - 1
    lineno = None if exc.lineno is None else exc.lineno + shift
    end_lineno = None if exc.end_lineno is None else exc.end_lineno + shift
    where = _ipython_cell_file(shell) or filename
    return type(exc)(exc.msg, (where, lineno, exc.offset, text, end_lineno, exc.end_offset))


def _ipython_cell_file(shell: Any) -> str | None:
    """The file name IPython gave the running cell (its tracebacks show it as ``Cell In[N]``)."""
    number = prompt_number(shell)
    names = getattr(shell.compile, "_filename_map", {})
    found = [name for name, count in names.items() if count == number]
    return found[-1] if found else None


def fail_with_syntax_error(shell: Any, exc: SyntaxError) -> bool:
    """Show a syntax error as IPython shows one of a local cell, and fail the cell; False if not a cell.

    IPython shows a SyntaxError raised while a cell runs with the stack that raised it
    (our magic's), ignoring ``_render_traceback_``; a local cell's shows only its line.
    """
    running = getattr(shell.displayhook, "exec_result", None)
    info = getattr(running, "info", None)
    if running is None or not getattr(info, "raw_cell", "").lstrip().startswith("%%flmrun"):
        return False  # called from code, not as the cell: raise as usual
    render = getattr(exc, "_render_traceback_", None)
    if render is not None:  # a remote one: the runner's text
        lines = render()
    else:
        lines = shell.SyntaxTB.structured_traceback(type(exc), exc, [])
    shell._showtraceback(type(exc), exc, lines)
    running.error_in_exec = exc
    return True


def _is_ipython_syntax(shell: Any, source: str) -> bool:
    transformed = shell.transform_cell(source)
    if transformed == source:
        return False
    try:
        ast.parse(transformed)
    except SyntaxError:
        return False
    return True
