"""flame-magic: run notebook cells on a Flame cluster with ``%%flmrun``.

Load it in IPython or Jupyter with ``%load_ext flame_magic``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


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
