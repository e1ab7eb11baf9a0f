"""Where a module a cell uses comes from: the notebook's own files, or an installed distribution.

:class:`Locator` tells them apart (see :mod:`flame_magic.modules` for what each means for a
cell) and, for the notebook's own, finds the files of its whole top-level package;
:func:`imported_tops` reads which modules a source imports.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import site
import sys
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flame_magic.protocol import cell

# Checked by the envelope's header, or the runner itself: never shipped nor required.
_OURS = frozenset({"__main__", "__mp_main__", "builtins", "flame_magic", "flame_magic_runner", "cloudpickle"})
# A local package larger than this does not travel: install it on the executors.
MAX_PACKAGE_BYTES = 8 * 1024 * 1024
MAX_PACKAGE_FILES = 1000
_SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules"})
# Files beside a package's sources that no code reads: not worth a notice that they stay behind.
_NOT_DATA = (".pyc", ".pyo", ".pyi", ".md", ".rst", ".cfg", ".toml", "py.typed")
_NOT_DATA_STEMS = ("README", "LICENSE", "CHANGELOG", "COPYING")


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class LocalPackage:
    """A top-level module or package of the notebook's own, as it is on disk now.

    Attributes
    ----------
    name
        Its top-level name.
    files
        ``(module name, path, is package)`` of each Python source, the package's first.
    left_out
        Files that do not travel: compiled extension modules, data files, or all of them
        when the package is too large.
    """

    name: str
    files: list[tuple[str, Path, bool]] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)
    compiled: bool = False
    too_large: bool = False


class _Places:
    """Where installed code lives: the standard library and every site-packages folder."""

    def __init__(self) -> None:
        roots = set()
        paths = sysconfig.get_paths()
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            if paths.get(key):
                roots.add(os.path.realpath(paths[key]))
        for folder in [*site.getsitepackages(), site.getusersitepackages()]:
            roots.add(os.path.realpath(folder))
        self.roots = tuple(sorted(roots))

    def installed(self, path: str) -> bool:
        real = os.path.realpath(path)
        parts = Path(real).parts
        if "site-packages" in parts or "dist-packages" in parts:
            return True
        return any(real == root or real.startswith(root + os.sep) for root in self.roots)


class Locator:
    """Decides, and remembers, what each top-level module is (see the module docstring)."""

    def __init__(self) -> None:
        self._places = _Places()
        self._distributions: Mapping[str, list[str]] | None = None
        self._editable: dict[str, bool] = {}
        self._versions: dict[str, str | None] = {}
        self._site_folders: dict[str, list[str]] = {}

    def distributions(self, top: str) -> list[str]:
        if self._distributions is None:
            self._distributions = importlib.metadata.packages_distributions()
        return self._distributions.get(top, [])

    def requirement(self, top: str) -> cell.Requirement | None:
        """The installed distribution that provides ``top``, at the notebook's version."""
        if _standard(top):
            return None
        # One name may be installed twice (two folders on sys.path): the first wins, as for imports.
        names = list(dict.fromkeys(self.distributions(top)))
        if len(names) != 1 or self.editable(names[0]) or self._local_where(top) is not None:
            return None  # several (a namespace such as `google`) cannot be told apart
        version = self.version(names[0])
        if version is None or canonical(names[0]) in ("flame-magic", "cloudpickle"):
            return None
        return cell.Requirement(module=top, distribution=names[0], version=version)

    def version(self, distribution: str) -> str | None:
        if distribution not in self._versions:
            try:
                self._versions[distribution] = importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                self._versions[distribution] = None
        return self._versions[distribution]

    def editable(self, distribution: str) -> bool:
        if distribution not in self._editable:
            editable = False
            try:
                text = importlib.metadata.distribution(distribution).read_text("direct_url.json")
                editable = bool(text and json.loads(text).get("dir_info", {}).get("editable"))
            except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError):
                pass
            self._editable[distribution] = editable
        return self._editable[distribution]

    def local(self, top: str) -> LocalPackage | None:
        """``top`` as a local package, if it is the notebook's own code."""
        where = self._local_where(top)
        return None if where is None else _files(top, *where)

    def _local_where(self, top: str) -> tuple[str | None, list[str]] | None:
        """The file and folders of ``top`` if it is the notebook's own code, else None."""
        if _standard(top):
            return None
        origin, locations = _where(top)
        paths = [*locations, *([origin] if origin else [])]
        if not paths:
            return None  # built in, frozen, made at run time, or not found
        if any(self._places.installed(path) for path in paths):
            return None
        # Installed outside site-packages (pip install --target DIR, DIR on sys.path): installed.
        # A local file that shadows an installed name is the notebook's own all the same.
        for name in self.distributions(top):
            if not self.editable(name) and any(_within(path, self._sites(name)) for path in paths):
                return None
        return origin, locations

    def _sites(self, distribution: str) -> list[str]:
        if distribution not in self._site_folders:
            found = importlib.metadata.distributions(name=distribution)
            self._site_folders[distribution] = [os.path.realpath(str(d.locate_file(""))) for d in found]
        return self._site_folders[distribution]


def _standard(top: str) -> bool:
    """The standard library, and what the envelope's header checks: never sent nor required."""
    return top in _OURS or top in sys.stdlib_module_names or top in sys.builtin_module_names


def _within(path: str, folders: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(real.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)


def _where(top: str) -> tuple[str | None, list[str]]:
    """A top-level module's file and package folders (found without running it when not imported)."""
    module = sys.modules.get(top)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None, []
    if spec is None:
        return None, []
    origin = spec.origin if spec.has_location else None
    return origin, list(spec.submodule_search_locations or [])


def _files(top: str, origin: str | None, locations: list[str]) -> LocalPackage:
    found = LocalPackage(top)
    if origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        found.compiled = True
        found.left_out.append(Path(origin))
        return found
    if not locations:  # a single-file module
        if origin is not None and origin.endswith(".py"):
            found.files.append((top, Path(origin), False))
        return found
    if origin is not None:
        found.files.append((top, Path(origin), True))
    size = 0
    for location in locations:
        root = Path(location)
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d.isidentifier() and d not in _SKIPPED_DIRS)
            relative = Path(folder).relative_to(root).parts
            for name in sorted(names):
                path = Path(folder) / name
                if name.endswith(".py") and Path(name).stem.isidentifier():
                    stem = Path(name).stem
                    if not relative and stem == "__init__":
                        continue  # the package itself, added first
                    package = stem == "__init__"
                    module = ".".join([top, *relative, *([] if package else [stem])])
                    found.files.append((module, path, package))
                    size += path.stat().st_size
                elif name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                    found.compiled = True
                    found.left_out.append(path)
                elif not (name.endswith(_NOT_DATA) or name.startswith((".", *_NOT_DATA_STEMS))):
                    found.left_out.append(path)
    if size > MAX_PACKAGE_BYTES or len(found.files) > MAX_PACKAGE_FILES:
        found.too_large = True
        found.left_out = [path for _, path, _ in found.files]
        found.files = []
    return found


def imported_tops(tree: ast.AST, *, surely: bool = False) -> list[str]:
    """The top-level modules that the absolute imports in ``tree`` name, in order.

    Parameters
    ----------
    surely
        Only imports that run whenever the code runs: not those in functions (which may
        never be called) nor in ``try`` blocks (which may have a fallback).
    """
    tops: dict[str, None] = {}
    skip = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.Try, *_TRY_STAR)
    pending = [tree]
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                tops.setdefault(alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.setdefault(node.module.partition(".")[0])
        if surely and isinstance(node, skip):
            continue
        pending.extend(ast.iter_child_nodes(node))
    return list(tops)


_TRY_STAR: tuple[type, ...] = (ast.TryStar,) if hasattr(ast, "TryStar") else ()


# -- the notebook's side ----------------------------------------------------------------------
