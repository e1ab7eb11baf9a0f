"""Text for the notebook: valid UTF-8, sizes, and the names and reprs of what a cell made.

Nothing here may raise on a cell's objects: a broken ``__str__`` or ``__repr__`` must not
break the report of a cell.
"""

from __future__ import annotations

from typing import Any


def type_name(exc: BaseException) -> str:
    """The exception's class as Python prints it."""
    kind = type(exc)
    module = getattr(kind, "__module__", None)
    # As Python prints it: builtins and the cell's own classes need no module.
    if module in (None, "builtins", "__main__"):
        return kind.__qualname__
    return f"{module}.{kind.__qualname__}"


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: B036 - a broken __str__ must not break the report
        return f"<{type(exc).__name__}: str() failed>"


def safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except BaseException:  # noqa: B036 - a broken __repr__ must not break the report
        return f"<{type(value).__name__} object: repr() failed>"


def clean(text: str) -> str:
    """``text`` as valid UTF-8 (protobuf refuses lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def human_size(size: int) -> str:
    """``size`` bytes for a reader: "208 bytes", "12.5 KiB", "4.3 MiB"."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"
