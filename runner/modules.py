"""Import the notebook's own modules on the runner, from the sources the notebook sent.

A notebook's helper modules (``mylib.py`` beside it, a folder it put on ``sys.path``, an
editable install of the user's project) are not installed where cells run. The notebook
sends their sources with the cells; :class:`SourceImporter`, first on ``sys.meta_path``,
imports them under their real names, so ``from mylib import f`` in a cell, and pickles
that refer to ``mylib.f``, work as in the notebook.

This module is plain Python (no gRPC, no protobuf, nothing of flame-magic), so any runner
that receives the sources can use it: flame-magic's runner, or an evaluator that travels
to Flame's stock ``flmrun``.

Edits: when a module arrives with another digest than the one the runner holds, every
module the notebook sent is dropped from ``sys.modules``, so the next import (in the cell,
or while unpickling its inputs) runs the new source, and modules that imported each other
do not keep stale references to the old ones.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One module's source as the notebook has it.

    Attributes
    ----------
    name
        Its dotted name (``mylib``, ``mylib.sub``).
    digest
        A hash of ``source``: the same digest means the same module.
    source
        The module's Python source (UTF-8 bytes, or text).
    filename
        Its path in the notebook's file system: tracebacks name it.
    package
        Whether it is a package's ``__init__`` (its submodules are sources of their own).
    """

    name: str
    digest: str
    source: bytes | str
    filename: str
    package: bool = False


class SourceImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder and loader for the modules the notebook sent (see the module docstring)."""

    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}

    # -- what the notebook sent ----------------------------------------------------------

    def has(self, name: str, digest: str) -> bool:
        """Whether the runner holds module ``name`` at ``digest`` already."""
        known = self._sources.get(name)
        return known is not None and known.digest == digest

    def update(self, sources: Iterable[Source]) -> list[str]:
        """Hold these sources; return the names of those that replaced another version.

        After a replacement, the next import of any sent module runs its source afresh.
        """
        replaced = []
        for source in sources:
            known = self._sources.get(source.name)
            if known is not None and known.digest == source.digest:
                continue
            if known is not None or source.name in sys.modules:
                replaced.append(source.name)
            self._sources[source.name] = source
        if replaced:
            self.forget_imported()
        return replaced

    def forget_imported(self) -> None:
        """Drop every sent module from ``sys.modules``: the next import runs the source again."""
        for name in self._sources:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()

    def names(self) -> list[str]:
        """The modules held, sorted."""
        return sorted(self._sources)

    # -- the import protocol -------------------------------------------------------------

    def find_spec(
        self, fullname: str, path: object = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._sources.get(fullname)
        if source is None:
            return None
        spec = importlib.util.spec_from_loader(
            fullname, self, origin=source.filename, is_package=source.package
        )
        if spec is not None:
            spec.has_location = True  # __file__ names the notebook's file, as tracebacks do
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        source = self._sources[module.__name__]
        text = self.get_source(module.__name__) or ""
        # The file may not exist here, or be another one: tracebacks read the sent lines.
        linecache.cache[source.filename] = (len(text), None, text.splitlines(keepends=True), source.filename)
        code = compile(text, source.filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname: str) -> str | None:
        source = self._sources.get(fullname)
        if source is None:
            return None
        if isinstance(source.source, bytes):
            return importlib.util.decode_source(source.source)
        return source.source

    def is_package(self, fullname: str) -> bool:
        source = self._sources.get(fullname)
        return source is not None and source.package


def installed_importer() -> SourceImporter:
    """The process's importer, first on ``sys.meta_path`` (installed on first use)."""
    for finder in sys.meta_path:
        if isinstance(finder, SourceImporter):
            return finder
    importer = SourceImporter()
    sys.meta_path.insert(0, importer)
    return importer
