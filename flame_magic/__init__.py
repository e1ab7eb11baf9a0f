"""flame-magic: run notebook cells on a Flame cluster with ``%%flmrun``.

Load it in IPython or Jupyter with ``%load_ext flame_magic``.
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

    load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """Close this notebook's Flame sessions and remove the magics."""
    from flame_magic.magics import unload

    unload(ip)
