"""The runner's side of a cell's environment: the notebook's modules, and package versions.

Before a cell's inputs are unpickled (pickles import what they name), :meth:`Environment.prepare`

1. gives the notebook's modules to the importer (:mod:`flame_magic_runner.modules`), fetching
   from Flame's object cache only the sources it does not hold;
2. refuses the cell, with one line, if a package it needs is missing here or at another
   version than the notebook's;
3. reports this process's distributions in its first reply, so that the notebook can refuse
   such cells itself.

Packages asked for with ``--pip`` are not installed here: Flame installed them before this
process started, as its application's package (see :mod:`flame_magic.environments`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Iterable

from flame_magic.cache import CacheError, ObjectRef
from flame_magic.errors import DigestMismatch
from flame_magic.modules import canonical, problems
from flame_magic.protocol import cell
from flame_magic.transfer import Shipper

from .modules import Source, installed_importer


class Environment:
    """One runner process's environment for cells (see the module docstring)."""

    def __init__(self) -> None:
        self.importer = installed_importer()
        self._reported = False
        self._report: list[cell.Package] | None = None

    def warm(self) -> None:
        """List this process's distributions (about 0.1 s) before the first cell needs them."""
        if self._report is None:
            self._report = [cell.Package(name=n, version=v) for n, v in sorted(_packages().items())]

    def prepare(self, request: cell.CellRequest, result: cell.CellResult, shipper: Shipper) -> bool:
        """Ready the process for the cell; False, with ``result.refused`` set, if it must not run."""
        refused = self._receive(request.modules, shipper)
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


def _fetch(shipper: Shipper, blob: cell.Blob) -> memoryview:
    if shipper.cache is None:
        raise CacheError("no object cache is configured on the runner (FLAME_CACHE_ENDPOINT)")
    data = shipper.cache.read(ObjectRef.decode(blob.refs[0]))
    if data.nbytes != blob.size:
        raise CacheError(f"it holds {data.nbytes} bytes, not the {blob.size} sent")
    return data


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
