"""flame-magic: run notebook cells on a Flame cluster with ``%%flmrun``.

Load it in IPython or Jupyter with ``%load_ext flame_magic``; from Python without IPython,
use :class:`flame_magic.engine.Engine`.

The notebook side is four layers; a module imports only from its own layer and those
below it (``tests/unit/test_layers.py`` keeps it so):

wire
    ``protocol`` (Flame's messages and our cell envelope), ``codec`` (pickles and their
    version checks), ``errors`` (every exception, one hierarchy).
transport
    ``client`` (Flame's Frontend), ``cache`` (its object cache), ``transfer`` (large values
    by reference), ``config`` (which Flame), ``applications`` (telling runners apart),
    ``deploy`` (registering ours), ``embedded`` (a Flame of our own).
engine
    ``engine`` (the Python API), ``remote`` (the connection and its sessions), ``runs``
    (one cell's task), ``maps`` and ``fanout`` (a cell over items), ``background``,
    ``results``, ``live``, ``backends`` and ``stock`` (the two kinds of runner), ``sessions``,
    ``runners``, ``capture``, ``modules`` and ``locator``, ``debugger``. Nothing here imports IPython.
magics
    ``magics`` (options), ``cells`` (a cell's source as IPython knows it),
    ``presentation``, ``progress``.

The runner (``flame_magic_runner``) is two layers over the notebook side's wire and
transport: evaluation (``evaluate``, ``live``, ``fdcapture``, ``debug``, ``environment``,
``modules``), which knows nothing of gRPC, then the service (``service``, ``__main__``,
and ``bootstrap``/``stock`` on Flame's stock runner). This module holds only the version
and the extension hooks, which import the magics when IPython loads them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("flame-magic")
except PackageNotFoundError:  # sources without an installed distribution
    __version__ = "0+unknown"


def load_ipython_extension(ip: Any) -> None:
    """Register the ``%%flmrun`` and ``%flame`` magics with the shell."""
    from flame_magic.magics import load
    from flame_magic.prewarm import prewarm

    load(ip)
    prewarm(ip)  # the embedded Flame and a runner start while the user types


def unload_ipython_extension(ip: Any) -> None:
    """Close this notebook's Flame sessions and remove the magics."""
    from flame_magic.magics import unload

    unload(ip)
