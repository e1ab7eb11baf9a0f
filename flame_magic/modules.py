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
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flame_magic.capture import format_size
from flame_magic.errors import CellFailed, ShipError
from flame_magic.locator import (
    MAX_PACKAGE_BYTES,
    MAX_PACKAGE_FILES,
    LocalPackage,
    Locator,
    canonical,
    imported_tops,
)
from flame_magic.protocol import cell
from flame_magic.transfer import digest
from flame_magic.wire import module_key

if TYPE_CHECKING:
    from flame_magic.codec import ModulesUsed
    from flame_magic.transfer import Shipper

# What to say when the runner's packages do not match (completed with the requirement).
_WAY_OUT = (
    "add `--pip {spec}` to the cell (or `%config FlameMagics.requirements = [{spec!r}]`), "
    "or install it on the executors"
)


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
        found = _File(stamp, source, digest(memoryview(source)), imports, surely)
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
                ref = shipper.cache.put(module_key(shipper.key_prefix, file.digest), memoryview(file.source))
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
