"""The runner's environment, as a cell needs it: the notebook's own modules and installed packages.

A module a cell uses (it imports it, or its inputs' pickles or the code of the functions
it ships name it) is one of:

- **the notebook's own**: its file is not under the standard library or a
  ``site-packages`` folder, and it is not part of an installed distribution, or is part of
  an editable one (``pip install -e``): beside the notebook, in a folder the notebook put
  on ``sys.path``, in the user's project. Its source travels with the cell (the whole
  top-level package, and the notebook's own modules its sources import), once per session
  through Flame's object cache (by content hash), and the runner imports it under its name
  (:mod:`flame_magic_runner.modules`). An edited file has a new hash: the next cell takes
  the new source. Compiled extension modules and data files do not travel.
- **installed**: part of a distribution. It travels by reference, so the runner must have
  it at the same version: the cell carries a :class:`~flame_magic.protocol.cell.Requirement`
  and is refused with one line naming both versions (:func:`problems`) before anything is
  unpickled, by the notebook when the runner's report of its packages (in its first reply)
  already shows the problem, else by the runner.
- the standard library, flame-magic and cloudpickle (checked by the envelope's header):
  nothing to do.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flame_magic.capture import ShipError, format_size
from flame_magic.errors import CellFailed
from flame_magic.protocol import cell

if TYPE_CHECKING:
    from flame_magic.codec import ModulesUsed
    from flame_magic.transfer import Shipper

# Checked by the envelope's header, or the runner itself: never shipped nor required.
_OURS = frozenset({"__main__", "__mp_main__", "builtins", "flame_magic", "flame_magic_runner", "cloudpickle"})
# A local package larger than this does not travel: install it on the executors.
MAX_PACKAGE_BYTES = 8 * 1024 * 1024
MAX_PACKAGE_FILES = 1000
_SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules"})
# Files beside a package's sources that no code reads: not worth a notice that they stay behind.
_NOT_DATA = (".pyc", ".pyo", ".pyi", ".md", ".rst", ".cfg", ".toml", "py.typed")
_NOT_DATA_STEMS = ("README", "LICENSE", "CHANGELOG", "COPYING")

# What to say when the runner's packages do not match (completed with the requirement).
_WAY_OUT = (
    "add `--pip {spec}` to the cell (or `%config FlameMagics.requirements = [{spec!r}]`), "
    "or install it on the executors"
)


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def problems(
    requires: Iterable[cell.Requirement], version_on_runner: Callable[[cell.Requirement], str | None]
) -> str:
    """One line naming the required packages the runner lacks or has at another version ('' if none).

    Parameters
    ----------
    version_on_runner
        The runner's version of a requirement's distribution, None if it lacks it.
    """
    found = []
    for requirement in requires:
        theirs = version_on_runner(requirement)
        spec = f"{requirement.distribution}=={requirement.version}"
        if theirs is None:
            found.append(
                f"the runner lacks {requirement.distribution} ({requirement.version} in the notebook), "
                f"which this cell needs: {_WAY_OUT.format(spec=spec)}"
            )
        elif theirs != requirement.version:
            found.append(
                f"{requirement.distribution} is {requirement.version} in the notebook but {theirs} on the "
                f"runner, and this cell needs it: {_WAY_OUT.format(spec=spec)}"
            )
    if not found:
        return ""
    return f"Not run: {'; '.join(found)}."


# -- where a module comes from ---------------------------------------------------------------


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


@dataclass
class _File:
    stamp: tuple[int, int]  # (mtime_ns, size) when read
    source: bytes
    digest: str
    imports: list[str]
    surely: list[str]  # the imports that run whenever the module is imported


@dataclass
class Travelled:
    """A local package that went to the runner: for ``%flame status``."""

    files: int
    size: int
    digests: tuple[str, ...]
    versions: int = 1


class Environment:
    """The notebook's side: what each cell needs of the runner's environment, attached to it.

    One per connection. It reads the notebook's files afresh for each cell (a file whose
    modification time and size are unchanged is not read again), uploads a source once per
    session, and remembers each session's report of the runner's packages.
    """

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.notify: Callable[[str], None] = notify or (lambda message: None)
        self._locator = Locator()
        self._files: dict[Path, _File] = {}
        self._uploaded: dict[tuple[str, str], cell.Blob] = {}  # (session key prefix, digest) -> blob
        self._told: set[str] = set()
        self._lock = threading.Lock()
        self.travelled: dict[str, Travelled] = {}  # top-level name -> what went, in order
        self.reports: dict[str, dict[str, str]] = {}  # session id -> the runner's packages

    def attach(
        self,
        request: cell.CellRequest,
        tree: ast.AST,
        used: ModulesUsed,
        shipper: Shipper,
        check: bool = True,
    ) -> None:
        """Add to ``request`` the notebook's modules the cell uses, and the packages it needs.

        Parameters
        ----------
        check
            Whether the runner must have the installed packages the cell needs at the
            notebook's versions (False: the cell runs with whatever the runner has).

        Raises
        ------
        ShipError
            If a source cannot be read, or cannot be stored in the object cache.
        """
        with self._lock:
            referenced = [name.partition(".")[0] for name in sorted(used.modules)]
            # Modules the code may import (in functions, try blocks), and names in shipped code
            # that may be modules it imports when called: only the notebook's own travel for those.
            hinted = [name for name in sorted(used.names) if name in sys.modules]
            packages = self._closure([*imported_tops(tree), *referenced, *hinted])
            # What the cell, or the modules that travel with it, surely import must be there.
            needed = [*imported_tops(tree, surely=True), *referenced]
            for package in packages:
                needed += [top for _, path, _ in package.files for top in self._read(path).surely]
            requires: dict[str, cell.Requirement] = {}
            for top in dict.fromkeys(needed) if check else []:
                requirement = self._locator.requirement(top)
                if requirement is not None:
                    requires[requirement.distribution] = requirement
            request.requires.extend(requires.values())
            for package in packages:
                self._add(request, package, shipper)

    def _closure(self, tops: list[str]) -> list[LocalPackage]:
        """The local packages among ``tops``, and the local packages their sources import."""
        found: dict[str, LocalPackage] = {}
        seen: set[str] = set()
        queue = list(tops)
        while queue:
            top = queue.pop(0)
            if top in seen:
                continue
            seen.add(top)
            package = self._locator.local(top)
            if package is None:
                continue
            found[top] = package
            for _, path, _ in package.files:
                queue.extend(self._read(path).imports)
        return list(found.values())

    def _read(self, path: Path) -> _File:
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = self._files.get(path)
            if known is not None and known.stamp == stamp:
                return known
            source = path.read_bytes()
        except OSError as exc:
            raise ShipError(f"Cannot read {path} to send it to the Flame runner: {exc}.") from None
        try:
            tree = ast.parse(source, str(path))
            imports, surely = imported_tops(tree), imported_tops(tree, surely=True)
        except (SyntaxError, ValueError):
            imports = surely = []  # the runner's import shows the error, as a local import would
        found = _File(stamp, source, hashlib.sha256(source).hexdigest()[:40], imports, surely)
        self._files[path] = found
        return found

    def _add(self, request: cell.CellRequest, package: LocalPackage, shipper: Shipper) -> None:
        self._tell(package)
        size = 0
        digests = []
        for name, path, is_package in package.files:
            file = self._read(path)
            module = request.modules.add(
                name=name, digest=file.digest, package=is_package, filename=str(path)
            )
            if shipper.enabled:
                module.blob.CopyFrom(self._upload(shipper, file))
            else:
                module.source = file.source
            size += len(file.source)
            digests.append(file.digest)
        if not package.files:
            return
        known = self.travelled.get(package.name)
        if known is None:
            self.travelled[package.name] = Travelled(len(package.files), size, tuple(digests))
        elif known.digests != tuple(digests):
            known.files, known.size, known.digests = len(package.files), size, tuple(digests)
            known.versions += 1

    def _upload(self, shipper: Shipper, file: _File) -> cell.Blob:
        """The source in the object cache, stored once per session."""
        from flame_magic.cache import CacheError

        assert shipper.cache is not None and shipper.key_prefix is not None
        key = (shipper.key_prefix, file.digest)
        if key not in self._uploaded:
            try:
                ref = shipper.cache.put(f"{shipper.key_prefix}/mod-{file.digest}", memoryview(file.source))
            except CacheError as exc:
                raise ShipError(f"Cannot store a module's source in Flame's object cache: {exc}") from None
            self._uploaded[key] = cell.Blob(size=len(file.source), digest=file.digest, refs=[ref.encode()])
        return self._uploaded[key]

    def _tell(self, package: LocalPackage) -> None:
        """Say once what of a local package cannot travel."""
        if not package.left_out or package.name in self._told:
            return
        self._told.add(package.name)
        if package.too_large:
            self.notify(
                f"`{package.name}` ({len(package.left_out)} files) is too large to travel with cells "
                f"(over {format_size(MAX_PACKAGE_BYTES)} or {MAX_PACKAGE_FILES} files): install it on "
                "the executors."
            )
        elif package.compiled:
            suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
            compiled = ", ".join(p.name for p in package.left_out if p.name.endswith(suffixes))
            self.notify(
                f"`{package.name}` has compiled extension modules ({compiled}), which do not travel with "
                "cells: install it on the executors (`--pip`, or a package of your project)."
            )
        else:
            others = ", ".join(p.name for p in package.left_out[:3])
            more = "..." if len(package.left_out) > 3 else ""
            self.notify(
                f"`{package.name}`'s Python files travel with cells, its other files do not "
                f"({others}{more}): read data from a place the executors share."
            )

    # -- the runner's packages -----------------------------------------------------------------

    def check(self, request: cell.CellRequest, session_id: str) -> None:
        """Refuse the cell now if the session's runner reported packages that do not fit it.

        Raises
        ------
        CellFailed
            Naming each package, both versions, and what to do.
        """
        report = self.reports.get(session_id)
        if report is None:
            return  # the runner checks
        found = problems(request.requires, lambda r: report.get(canonical(r.distribution)))
        if found:
            raise CellFailed(found)

    def saw(self, session_id: str, result: cell.CellResult) -> None:
        """Remember the runner's packages when a result reports them."""
        if len(result.packages):
            self.reports[session_id] = {canonical(p.name): p.version for p in result.packages}

    def status(self) -> list[str]:
        """Lines for ``%flame status``: what travelled."""
        if not self.travelled:
            return []
        parts = []
        for name, went in self.travelled.items():
            edits = f", {went.versions} versions" if went.versions > 1 else ""
            files = f"{went.files} files, " if went.files > 1 else ""
            parts.append(f"{name} ({files}{format_size(went.size)}{edits})")
        return [f"Modules sent with cells: {', '.join(parts)}"]
