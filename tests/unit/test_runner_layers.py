"""The runner's layers: wire -> evaluation -> service, and nothing imports upwards.

Read from the sources (imports anywhere in a module, also inside functions), so that a
lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "runner"
# The service side: Flame's Instance service, the process, and the entries on flamepy's runner.
SERVICE = {"service", "__main__", "stock", "bootstrap"}
EVALUATION = {p.stem for p in RUNNER.glob("*.py")} - SERVICE - {"__init__"}


def imports(name: str) -> set[str]:
    """The modules ``runner/<name>.py`` imports: absolute names, and runner modules by their stem."""
    found = set()
    for node in ast.walk(ast.parse((RUNNER / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from . import x
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module and node.module.startswith("flame_magic_runner."):
                found.add(node.module.removeprefix("flame_magic_runner."))
            elif node.module:
                found.add(node.module)
    return found


def test_the_layers_cover_the_runner():
    assert {"evaluate", "values", "limits", "live"} <= EVALUATION
    assert len(EVALUATION) >= 10


@pytest.mark.parametrize("name", sorted(EVALUATION))
def test_the_evaluation_knows_nothing_of_grpc_nor_of_the_service(name):
    used = imports(name)
    assert not {m for m in used if m == "grpc" or m.startswith("grpc.")}, f"{name} imports gRPC"
    assert not used & SERVICE, f"{name} imports the service side: {used & SERVICE}"


def test_the_instance_service_knows_nothing_of_how_cells_are_evaluated():
    assert not imports("service") & EVALUATION
