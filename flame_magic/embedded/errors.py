"""The embedded Flame's own errors, apart from the notebook's (:mod:`flame_magic.errors`).

These are the server's: a :class:`FrontendError` becomes the gRPC status a Flame client
sees, as Flame's session manager answers. The notebook never catches them; it sees the
status, as :class:`flame_magic.errors.FlameError`.
"""

from __future__ import annotations

import grpc


class FrontendError(Exception):
    """A Frontend request failed; becomes a gRPC status with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
