"""What a cell needs from the notebook, and what it gives back.

The cell is analysed statement by statement: a name is *read* from the notebook
when a statement uses it before an earlier statement of the cell surely bound
it, and *bound* when the cell assigns, defines or imports it at top level.
Python's own ``symtable`` decides scopes, so functions, classes, lambdas and
comprehensions that read notebook globals are covered too.
"""

from __future__ import annotations

import ast
import symtable
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flame_magic import codec
from flame_magic.errors import ShipError
from flame_magic.protocol import cell
from flame_magic.transfer import CACHE_HINT, Outgoing, Shipper
from flame_magic.wire import INLINE_BUDGET, MAX_MESSAGE_BYTES

# A statement that completes binds its targets for sure; compound statements
# (if, for, while, try, match) may skip theirs, so they do not count.
_DEFINITE = (
    ast.Assign,
    ast.AnnAssign,
    ast.AugAssign,
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.With,
    ast.AsyncWith,
)

# The notebook's own machinery, which is meaningless on a runner.
NOT_SHIPPED = frozenset(
    {"get_ipython", "exit", "quit", "In", "Out", "_ih", "_oh", "_dh", "__builtin__", "__builtins__"}
)


@dataclass(frozen=True)
class CellNames:
    """Names a cell reads from the notebook and names it binds, each in first-use order."""

    reads: tuple[str, ...]
    binds: tuple[str, ...]


def analyse(tree: ast.Module) -> CellNames:
    """Find the notebook names a parsed cell reads and the names it binds."""
    bound: set[str] = set()
    reads: dict[str, None] = {}
    binds: dict[str, None] = {}
    for statement in tree.body:
        loads, stores = _statement_names(statement)
        for name in loads:
            if name not in bound:
                reads.setdefault(name)
        for name in stores:
            binds.setdefault(name)
        if isinstance(statement, _DEFINITE):
            bound.update(stores)
    return CellNames(reads=tuple(reads), binds=tuple(binds))


def _statement_names(statement: ast.stmt) -> tuple[list[str], list[str]]:
    """Global names one top-level statement loads and binds."""
    table = symtable.symtable(ast.unparse(statement), "<cell>", "exec")
    loads = [s.get_name() for s in table.get_symbols() if s.is_referenced()]
    stores = [s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()]
    # `del x` needs x to exist, and leaves nothing to send back.
    if isinstance(statement, ast.Delete):
        deleted = [t.id for t in statement.targets if isinstance(t, ast.Name)]
        loads += deleted
        stores = [name for name in stores if name not in deleted]
    # symtable does not count `x += 1` as a use of x, but it reads the old x.
    loads += _augmented_targets(statement)
    for child in table.get_children():
        loads += _nested_globals(child)
    return loads, stores


def _augmented_targets(node: ast.AST) -> list[str]:
    """Module-level names updated in place (``x += 1``), outside nested scopes."""
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
        return []
    return [name for child in ast.iter_child_nodes(node) for name in _augmented_targets(child)]


def _nested_globals(table: symtable.SymbolTable) -> list[str]:
    """Globals read inside functions, classes, lambdas and comprehensions."""
    names = [s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()]
    for child in table.get_children():
        names += _nested_globals(child)
    return names


def pack(
    names: Iterable[str],
    namespace: Mapping[str, Any],
    shipper: Shipper | None = None,
    budget: int = INLINE_BUDGET,
) -> list[cell.Value]:
    """Pickle the named notebook values the cell reads (absent names are left out).

    A name the notebook lacks is not sent, so the cell raises NameError on the
    runner exactly as it would locally.

    Parameters
    ----------
    shipper
        The session's way to Flame's object cache: large values (and enough others to keep
        the message within ``budget`` bytes) travel through it, by reference. Without one,
        every value is pickled into the message.
    """
    shipper = shipper or Shipper(None, None)
    shipper.new_request()
    outgoing = []
    for name in names:
        if name in NOT_SHIPPED or name not in namespace:
            continue
        value = namespace[name]
        try:
            outgoing.append(Outgoing(name, shipper.pickle(value)))
        except codec.UnpicklableError as exc:
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise ShipError(
                f"Cannot send `{name}` ({kind}) to the Flame runner: {exc}. Create it inside the "
                "%%flmrun cell instead (open files, connections and locks there), or make it picklable."
            ) from None
    values = shipper.ship_all(outgoing, budget)
    shipper.evict()
    return values


def check_size(request: cell.CellRequest, limit: int, no_cache: bool = False) -> None:
    """Refuse a request over Flame's task limit, naming the largest values.

    Parameters
    ----------
    no_cache
        There is no object cache: the message then says how to configure one.
    """
    size = request.ByteSize()
    if size <= limit:
        return
    largest = sorted(request.inputs, key=lambda v: len(v.pickle), reverse=True)[:3]
    listed = ", ".join(f"`{v.name}` ({format_size(len(v.pickle))})" for v in largest)
    advice = (
        "Load or create large data inside the %%flmrun cell (for example from a file the executors "
        "can read), or send a smaller part"
    )
    if no_cache:
        advice += f"; or {CACHE_HINT}"
    raise ShipError(
        f"This cell would send {format_size(size)} to Flame, over its {format_size(MAX_MESSAGE_BYTES)} "
        f"limit for a task (envelope included). Largest values: {listed}. {advice}."
    )


def format_size(size: int) -> str:
    """Bytes for people: ``512 B``, ``3.4 KiB``, ``12.0 MiB``."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"
