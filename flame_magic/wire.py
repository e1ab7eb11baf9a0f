"""flame-magic's wire contract: the facts the notebook and the runner must agree on, written once.

Both sides import this module: the notebook (:mod:`flame_magic`) and the runner
(:mod:`flame_magic_runner`, also when it travels as source to Flame's stock ``flmrun``). It
holds no code of either side, only sizes, object-cache key layouts and timings; the messages
themselves are in ``proto/flame_magic/_proto/cell.proto``, reached through
:mod:`flame_magic.protocol`, and the object cache's own contract (keys, references, object
files) is in :mod:`flame_magic.objects`. A change here that the other side cannot follow
needs a new :data:`flame_magic.codec.PROTOCOL_VERSION`.
"""

from __future__ import annotations

# -- sizes -----------------------------------------------------------------------------------

#: Flame never raises gRPC's default receive limit, so every hop (task input, task output,
#: common_data) must fit in it, Flame's envelope included.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Room left in a task for Flame's own envelope around our bytes (``TaskResult``, ``Task``).
ENVELOPE_MARGIN = 64 * 1024
#: What a ``CellRequest`` or ``CellResult`` may take, encoded.
PAYLOAD_LIMIT = MAX_MESSAGE_BYTES - ENVELOPE_MARGIN
#: A value larger than this (pickle and buffers) travels through the object cache, when there is one.
INLINE_LIMIT = 256 * 1024
#: Bytes of values one message carries inline at most; the rest goes through the object cache.
INLINE_BUDGET = 3 * 1024 * 1024

# -- object-cache keys (``<app>/<session>/<id>``, see flame_magic.objects) -------------------

#: The notebook's objects are ``<prefix>/in-<digest>``, the runner's ``<prefix>/out-<digest>``,
#: so that neither replaces the other's.
NOTEBOOK_SIDE = "in"
RUNNER_SIDE = "out"


def session_prefix(application: str, session_id: str) -> str:
    """``<app>/<session>``: where a session's objects live (deleted with the session)."""
    return f"{application}/{session_id}"


def value_key(prefix: str, side: str, digest: str, part: int | None = None) -> str:
    """The key of a value's blob (or of one part of a blob too large for one object)."""
    return f"{prefix}/{side}-{digest}" + ("" if part is None else f"-{part}")


def module_key(prefix: str, digest: str) -> str:
    """The key of one of the notebook's module sources (once per session, by digest)."""
    return f"{prefix}/mod-{digest}"


def live_output_key(prefix: str, channel: str) -> str:
    """Where the runner appends what a running cell shows (each patch a ``CellResult`` of outputs)."""
    return f"{prefix}/{channel}-out"


def live_control_key(prefix: str, channel: str) -> str:
    """Where the notebook puts an ``Interrupt`` for a running cell."""
    return f"{prefix}/{channel}-ctl"


def item_channel(channel: str, index: int) -> str:
    """The live channel of item ``index`` of a ``--map`` whose cell has ``channel``."""
    return f"{channel}-{index}"


# -- timings (seconds) -----------------------------------------------------------------------

#: How long Flame keeps an idle runner of flame-magic's application (its ``delay_release``):
#: what a runner imported survives a pause between cells.
RELEASE_DELAY = 600
#: How often the runner appends a running cell's output: a line shows in the notebook within
#: this and the notebook's read period.
LIVE_FLUSH = 0.02
#: How often the runner checks for an interrupt (each check is a cache call; a flush with
#: nothing new is not).
LIVE_CONTROL = 0.25
#: How often the notebook reads a running cell's output, by default
#: (``FlameMagics.live_poll_interval``): on a cluster each read is a call to its object cache;
#: the embedded Flame's is on this host.
LIVE_POLL = 0.2
EMBEDDED_LIVE_POLL = 0.05
#: How long an interrupted cell may go on before the runner process exits (the notebook's
#: ``FlameMagics.interrupt_grace`` sends its own).
INTERRUPT_GRACE = 5.0
