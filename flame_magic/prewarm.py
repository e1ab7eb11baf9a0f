"""The embedded Flame started as the extension loads, so that the first cell does not wait for it.

Without a cluster configured, a notebook's first ``%%flmrun`` cell would start the embedded
Flame, which starts a runner process: two Python interpreters, one after the other. Started
on a thread when the extension loads (``%load_ext`` itself does not wait), they come up while
the user types; the embedded Flame starts its runner ahead of the first session (see
:mod:`flame_magic.embedded.spare`). A cell sent at once waits only for what is left (the
connection's lock). Nothing happens on a cluster: starting a session there would hold an
executor the user did not ask for.
"""

from __future__ import annotations

import threading
from typing import Any


def prewarm(ip: Any) -> threading.Thread | None:
    """Start the embedded Flame and the notebook's default session in the background.

    Returns the thread doing it (None on a cluster, or when already connected). A failure
    there is not reported: the first cell tries again and says what failed.
    """
    magics = ip.magics_manager.registry.get("FlameMagics")
    if magics is None or magics._engine is not None:
        return None
    try:
        engine = magics.engine()
    except Exception:  # a configuration error: the first cell says it
        return None
    connection = engine.connection
    if not connection.target.embedded:
        return None

    def warm() -> None:
        try:
            connection.client()  # the embedded Flame, which starts a runner beside it
            if magics._engine is not engine:
                return  # unloaded, or connected elsewhere, meanwhile
            connection.session()  # the default session, which binds that runner
            import pyarrow.flight  # noqa: F401  (the object cache's client: live output, large values)
        except Exception:
            pass

    thread = threading.Thread(target=warm, name="flmrun-prewarm", daemon=True)
    thread.start()
    return thread
