"""flame-magic's evaluator on Flame's stock ``flmrun`` (flamepy's runner), built there from source.

This file is not imported on the runner. The notebook sends its text, with the sources of
the modules the evaluator needs, as the execution object of the session's
``RunnerContext`` (see :mod:`flame_magic.stock`): flamepy's runner unpickles it by calling
``builtins.eval``, which runs this file and returns a :class:`FlameMagicEvaluator`. No code
object crosses the wire, so a runner of another Python version still loads it and can say
which version it is. It uses only the standard library until the first cell: the probe
works on any runner.

The modules live under a private package name (``ROOT``, which carries a digest of their
sources), served from memory by :class:`SourceFinder`, so they cannot clash with a
flame-magic the runner may have installed, nor with a cell's own imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import threading
from typing import Any

# Packages whose absence changes what a cell shows (never whether it runs).
OPTIONAL = ("IPython", "matplotlib", "matplotlib_inline", "numpy")
DISTRIBUTIONS = ("cloudpickle", "protobuf", "pyarrow", "flamepy", "ipython")


class SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the modules under ``root`` from their source text."""

    def __init__(self, root: str, modules: dict[str, str], packages: list[str]) -> None:
        self.root = root
        self.modules = modules
        self.packages = set(packages)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname in self.packages)

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        name = module.__name__
        # The real file name, so that tracebacks of the runner's own code name the module.
        code = compile(self.modules[name], f"<flame-magic {name[len(self.root) + 1 :]}>", "exec")
        exec(code, module.__dict__)


class FlameMagicEvaluator:
    """The execution object flamepy's runner keeps for the session; tasks call its methods.

    Parameters
    ----------
    root
        The private package the modules are imported under.
    modules
        Module name (under ``root``) -> source.
    packages
        The names in ``modules`` that are packages.
    """

    def __init__(self, root: str, modules: dict[str, str], packages: list[str]) -> None:
        self._root = root
        self._finder = SourceFinder(root, modules, packages)
        self._lock = threading.Lock()
        self._entry: Any = None

    def probe(self) -> bytes:
        """What this runner is: its Python, versions of what matters, optional packages present."""
        versions = {}
        for name in DISTRIBUTIONS:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = ""
        report = {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "python_full": platform.python_version(),
            "executable": sys.executable,
            "host": platform.node(),
            "pid": os.getpid(),
            "versions": versions,
            "missing": [name for name in OPTIONAL if importlib.util.find_spec(name) is None],
            "load_error": "",
        }
        try:
            self._load()
        except Exception as exc:
            report["load_error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(report).encode()

    def run(self, data: bytes) -> bytes:
        """Run one framed cell request; return the framed result (see the runner's ``stock`` module)."""
        return self._load().run(data)  # type: ignore[no-any-return]

    def _load(self) -> Any:
        with self._lock:
            if self._entry is None:
                if self._finder not in sys.meta_path:
                    sys.meta_path.insert(0, self._finder)
                module = importlib.import_module(f"{self._root}.flame_magic_runner.stock")
                self._entry = module.StockEntry()
            return self._entry
