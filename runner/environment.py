"""The runner's side of a cell's environment: packages to install, the notebook's modules, versions.

Before a cell's inputs are unpickled (pickles import what they name), :meth:`Environment.prepare`

1. installs the cell's ``pip`` requirements (``%%flmrun --pip``, ``FlameMagics.requirements``)
   with pip into a folder of this process, first on ``sys.path``, once per set;
2. gives the notebook's modules to the importer (:mod:`flame_magic_runner.modules`), fetching
   from Flame's object cache only the sources it does not hold;
3. refuses the cell, with one line, if a package it needs is missing here or at another
   version than the notebook's;
4. reports this process's distributions in its first reply (and after an install), so
   that the notebook can refuse such cells itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Iterable

from flame_magic.cache import CacheError, ObjectRef
from flame_magic.modules import canonical, problems
from flame_magic.protocol import cell
from flame_magic.transfer import DigestMismatch, Shipper

from .modules import Source, installed_importer


class Environment:
    """One runner process's environment for cells (see the module docstring)."""

    def __init__(self) -> None:
        self.importer = installed_importer()
        self._reported = False
        self._report: list[cell.Package] | None = None
        self._installed: set[tuple[str, ...]] = set()
        self._target: str | None = None

    def warm(self) -> None:
        """List this process's distributions (about 0.1 s) before the first cell needs them."""
        if self._report is None:
            self._report = [cell.Package(name=n, version=v) for n, v in sorted(_packages().items())]

    def prepare(self, request: cell.CellRequest, result: cell.CellResult, shipper: Shipper) -> bool:
        """Ready the process for the cell; False, with ``result.refused`` set, if it must not run."""
        refused = self._install(list(request.pip)) or self._receive(request.modules, shipper)
        if not refused:
            refused = problems(request.requires, _version_here)
        if not self._reported:
            self.warm()
            assert self._report is not None
            result.packages.extend(self._report)
            self._reported = True
        if refused:
            result.refused = refused
            return False
        return True

    def _receive(self, modules: Iterable[cell.Module], shipper: Shipper) -> str:
        sources = []
        for module in modules:
            if self.importer.has(module.name, module.digest):
                continue
            if module.HasField("blob"):
                try:
                    # Code: a private copy, checked against the digest the request carries.
                    data = bytes(_fetch(shipper, module.blob))
                    shipper.verify(memoryview(data), module.blob, f"the module {module.name!r}")
                except DigestMismatch as exc:
                    return f"Not run: {exc}"
                except CacheError as exc:
                    return (
                        f"Not run: the source of module {module.name} could not be read from Flame's "
                        f"object cache: {exc}. Run the cell again."
                    )
            else:
                data = module.source
            sources.append(Source(module.name, module.digest, data, module.filename, module.package))
        self.importer.update(sources)
        return ""

    def _install(self, specs: list[str]) -> str:
        key = tuple(sorted(set(specs)))
        if not key or key in self._installed:
            return ""
        if self._target is None:
            self._target = tempfile.mkdtemp(prefix="flame-magic-pip-")
        command = [sys.executable, "-m", "pip", "install", "--target", self._target, "--upgrade"]
        command += ["--no-input", "--disable-pip-version-check", "--quiet", *key]
        try:
            done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except KeyboardInterrupt:  # the cell was interrupted: pip is stopped with it
            return f"Not run: interrupted while installing {' '.join(key)} on the runner."
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            why = lines[-1] if lines else f"pip exited with status {done.returncode}"
            return (
                f"Not run: installing {' '.join(key)} on the runner failed ({why}). Check the names and "
                "versions, and that the executors reach a package index (or give pip a local one: "
                "PIP_FIND_LINKS, PIP_INDEX_URL in the application's environment)."
            )
        self._installed.add(key)
        if self._target not in sys.path:
            sys.path.insert(0, self._target)
        # What was imported before the install is the old version: the next import takes the new one.
        for distribution in importlib.metadata.distributions(path=[self._target]):
            for top in _tops(distribution):
                for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                    del sys.modules[name]
        importlib.invalidate_caches()
        self._reported, self._report = False, None
        return ""


def _fetch(shipper: Shipper, blob: cell.Blob) -> memoryview:
    if shipper.cache is None:
        raise CacheError("no object cache is configured on the runner (FLAME_CACHE_ENDPOINT)")
    data = shipper.cache.read(ObjectRef.decode(blob.refs[0]))
    if data.nbytes != blob.size:
        raise CacheError(f"it holds {data.nbytes} bytes, not the {blob.size} sent")
    return data


def _tops(distribution: importlib.metadata.Distribution) -> set[str]:
    """The top-level modules a distribution installed."""
    tops = set()
    for file in distribution.files or []:
        first = file.parts[0] if file.parts else ""
        if first.endswith(".py"):
            tops.add(first[:-3])
        elif len(file.parts) > 1 and not first.endswith((".dist-info", ".egg-info", ".data")):
            tops.add(first)
    return {top for top in tops if top.isidentifier() and top != "__pycache__"}


def _version_here(requirement: cell.Requirement) -> str | None:
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(requirement.module) is not None
    except (ImportError, ValueError):
        found = False
    # Importable without metadata (a vendored copy): its version cannot be told, so let it be.
    return requirement.version if found else None


def _packages() -> dict[str, str]:
    """This process's distributions (the first of a name on ``sys.path`` wins, as imports do)."""
    found: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"] if distribution.metadata else None
        if name:
            found.setdefault(canonical(name), distribution.version)
    return found
