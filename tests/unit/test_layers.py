"""The layers of ``flame_magic/__init__.py``, kept: no module imports one of a layer above its own.

Every import is read from the sources (``ast``), also those inside functions and under
``TYPE_CHECKING``: a dependency is one wherever it is written. A module missing from the
tables below fails the test, so that each new module is given its layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The notebook side, bottom to top.
WIRE, TRANSPORT, ENGINE, MAGICS = "wire", "transport", "engine", "magics"
NOTEBOOK_LAYERS = [WIRE, TRANSPORT, ENGINE, MAGICS]
NOTEBOOK = {
    # wire: the envelope and Flame's messages, and the errors every layer raises
    "flame_magic": WIRE,  # only the version and the extension hooks (see ALLOWED)
    "flame_magic.protocol": WIRE,
    "flame_magic.codec": WIRE,
    "flame_magic.errors": WIRE,
    "flame_magic.wire": WIRE,  # sizes, keys and timings both sides share
    "flame_magic.objects": WIRE,  # the object cache's keys, references and files
    # transport: reaching Flame, its object cache and its applications
    "flame_magic.client": TRANSPORT,
    "flame_magic.cache": TRANSPORT,
    "flame_magic.shm": TRANSPORT,  # large values through shared memory on one host
    "flame_magic.transfer": TRANSPORT,
    "flame_magic.digests": TRANSPORT,
    "flame_magic.config": TRANSPORT,
    "flame_magic.applications": TRANSPORT,
    "flame_magic.deploy": TRANSPORT,
    "flame_magic.embedded": TRANSPORT,  # a Flame of its own: the package and all its modules
    # engine: sessions, runs, backends; no IPython
    "flame_magic.capture": ENGINE,
    "flame_magic.modules": ENGINE,
    "flame_magic.locator": ENGINE,
    "flame_magic.sessions": ENGINE,
    "flame_magic.runners": ENGINE,
    "flame_magic.backends": ENGINE,
    "flame_magic.stock": ENGINE,
    "flame_magic.remote": ENGINE,
    "flame_magic.runs": ENGINE,
    "flame_magic.live": ENGINE,
    "flame_magic.results": ENGINE,
    "flame_magic.fanout": ENGINE,
    "flame_magic.items": ENGINE,
    "flame_magic.maps": ENGINE,
    "flame_magic.background": ENGINE,
    "flame_magic.debugger": ENGINE,
    "flame_magic.engine": ENGINE,
    "flame_magic.environments": ENGINE,
    # magics: declarations, planning and presentation
    "flame_magic.cells": MAGICS,
    "flame_magic.presentation": MAGICS,
    "flame_magic.progress": MAGICS,
    "flame_magic.magics": MAGICS,
    "flame_magic.prewarm": MAGICS,  # the embedded Flame started as the extension loads
}

# The runner side, bottom to top; below it, the notebook side's wire.
EVALUATION, SERVICE = "evaluation", "service"
RUNNER_LAYERS = [EVALUATION, SERVICE]
RUNNER = {
    "flame_magic_runner": SERVICE,
    "flame_magic_runner.__main__": SERVICE,
    "flame_magic_runner.service": SERVICE,
    "flame_magic_runner.bootstrap": SERVICE,  # the evaluator's entry on flamepy's runner
    "flame_magic_runner.stock": SERVICE,
    "flame_magic_runner.evaluate": EVALUATION,
    "flame_magic_runner.values": EVALUATION,
    "flame_magic_runner.limits": EVALUATION,
    "flame_magic_runner.recording": EVALUATION,
    "flame_magic_runner.exceptions": EVALUATION,
    "flame_magic_runner.timeout": EVALUATION,
    "flame_magic_runner.text": EVALUATION,
    "flame_magic_runner.live": EVALUATION,
    "flame_magic_runner.fdcapture": EVALUATION,
    "flame_magic_runner.debug": EVALUATION,
    "flame_magic_runner.environment": EVALUATION,
    "flame_magic_runner.modules": EVALUATION,
}
# What the runner may use of the notebook side: its wire and transport, and the knowledge of
# modules and packages that the runner's environment check shares with the notebook.
RUNNER_SHARES = {"flame_magic.modules"}

# Imports that break the rule on purpose, and why.
ALLOWED = {
    ("flame_magic", "flame_magic.magics"): "the extension hooks, called by IPython",
    ("flame_magic", "flame_magic.prewarm"): "the extension hook starts the embedded Flame as it loads",
    ("flame_magic.stock", "flame_magic_runner"): "reads the runner's sources, to send them as text",
    ("flame_magic.deploy", "flame_magic_runner"): "reads the runner's sources, to package them",
}

# Below the magics nothing needs IPython: the engine runs in a plain Python.
FRONTEND_PACKAGES = ("IPython", "ipykernel", "traitlets")


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "runner":
        parts[0] = "flame_magic_runner"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for top in ("flame_magic", "runner"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_proto" in path.parts:
                continue  # generated code, imported through flame_magic.protocol
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The absolute module names ``path`` imports (``from a import b``: ``a.b`` when it is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _ours(imported: str, known: set[str]) -> str | None:
    """The module of ours that ``imported`` names (the longest known prefix), if any."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _layer(module: str) -> tuple[str, str] | None:
    """(side, layer) of one of our modules; ``flame_magic.embedded.*`` take the package's."""
    if module in NOTEBOOK:
        return "notebook", NOTEBOOK[module]
    if module.startswith("flame_magic.embedded."):
        return "notebook", NOTEBOOK["flame_magic.embedded"]
    if module in RUNNER:
        return "runner", RUNNER[module]
    return None


SOURCES = _sources()


def test_every_module_has_a_layer() -> None:
    missing = [name for name in SOURCES if _layer(name) is None]
    assert not missing, f"give these modules a layer in tests/unit/test_layers.py: {missing}"


def _violation(importer: str, imported: str) -> str | None:
    if (importer, imported) in ALLOWED or importer == imported:
        return None
    side, layer = _layer(importer) or ("?", "?")
    other = _layer(imported)
    if other is None:
        return None
    other_side, other_layer = other
    if side == "notebook":
        if other_side == "runner":
            return "the notebook side imports the runner"
        if NOTEBOOK_LAYERS.index(other_layer) > NOTEBOOK_LAYERS.index(layer):
            return f"{layer} imports {other_layer}"
        return None
    if other_side == "notebook":
        if other_layer in (WIRE, TRANSPORT) or imported in RUNNER_SHARES:
            return None
        return f"the runner imports the notebook's {other_layer}"
    if RUNNER_LAYERS.index(other_layer) > RUNNER_LAYERS.index(layer):
        return f"{layer} imports {other_layer}"
    return None


@pytest.mark.parametrize("importer", sorted(SOURCES))
def test_no_module_imports_one_of_a_layer_above(importer: str) -> None:
    known = set(SOURCES)
    wrong = []
    for imported in sorted(_imports(importer, SOURCES[importer])):
        module = _ours(imported, known)
        why = _violation(importer, module) if module is not None else None
        if why:
            wrong.append(f"{importer} -> {module}: {why}")
    assert not wrong, wrong


@pytest.mark.parametrize(
    "importer",
    sorted(n for n in SOURCES if _layer(n) in {("notebook", layer) for layer in (WIRE, TRANSPORT, ENGINE)}),
)
def test_nothing_below_the_magics_imports_ipython(importer: str) -> None:
    frontend = [
        name for name in _imports(importer, SOURCES[importer]) if name.split(".")[0] in FRONTEND_PACKAGES
    ]
    assert not frontend, f"{importer} imports {frontend}: only the magics layer may"


def test_the_rule_catches_an_upward_import() -> None:
    assert _violation("flame_magic.client", "flame_magic.engine") == "transport imports engine"
    assert _violation("flame_magic.engine", "flame_magic.magics") == "engine imports magics"
    assert (
        _violation("flame_magic_runner.evaluate", "flame_magic_runner.service")
        == "evaluation imports service"
    )
    assert (
        _violation("flame_magic_runner.evaluate", "flame_magic.remote")
        == "the runner imports the notebook's engine"
    )
    assert _violation("flame_magic.magics", "flame_magic.engine") is None
