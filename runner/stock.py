"""Cells on Flame's stock ``flmrun``: the runner's half, loaded by :mod:`flame_magic_runner.bootstrap`.

flamepy's runner calls :meth:`StockEntry.run` on a gRPC worker thread with the task's
framed ``CellRequest`` and stores the framed ``CellResult`` it returns in the object cache.
The request's header is checked before any of its values is unpickled; the runner's
cloudpickle may differ from the notebook's (the cluster chose it), its Python may not.
Signals reach only the main thread, which flamepy keeps: the timeout, the interrupt and
the hard stop use asynchronous exceptions and a watchdog thread instead (see
:mod:`flame_magic_runner.evaluate` and :mod:`flame_magic_runner.live`).
"""

from __future__ import annotations

import threading

from flame_magic import codec
from flame_magic.protocol import cell

from . import evaluate

_NOT_OURS = (
    " flame-magic's evaluator on Flame's flmrun only runs cells sent by %%flmrun from a notebook "
    "with the same flame-magic version."
)


class StockEntry:
    """Decodes, evaluates and encodes cells for flamepy's runner, one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        evaluate.prepare()

    def run(self, data: bytes) -> bytes:
        """Run one framed ``CellRequest``; return the framed ``CellResult``.

        Raises
        ------
        ValueError
            If ``data`` is not a compatible request (flamepy fails the task with the message).
        """
        try:
            request = codec.decode(
                cell.CellRequest, codec.unframe(data, "the notebook"), "the notebook", same_cloudpickle=False
            )
        except codec.PayloadError as exc:
            raise ValueError(f"{str(exc).rstrip('.')}.{_NOT_OURS}") from None
        with self._lock:
            try:
                result = evaluate.evaluate(request)
            except BaseException as exc:  # noqa: B036 - an interrupt that arrived after the cell ended
                result = cell.CellResult(header=codec.local_header())
                result.error.CopyFrom(evaluate.remote_exception(exc, request.filename or "<flmrun cell>"))
        return codec.frame(codec.encode(result))
