"""A cell mapped over items, in batches of items per task of one session; results in input order.

:class:`Maps` sends a prepared cell's items through :class:`flame_magic.fanout.MapRun`
(the window of tasks and their watchers), watches for runners that do not start, and
closes a map's session when the map stopped. :meth:`Maps.run` gives the whole outcome
(the magics present it); :meth:`Maps.ordered` yields the results as they come (the
engine's ``map``).
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flame_magic import debugger
from flame_magic.errors import CellFailed, RunnerStartTimeout, SessionGoneError, SessionStartError
from flame_magic.fanout import MapRun
from flame_magic.items import MapOutcome, Progress, item_payloads, iter_item_payloads
from flame_magic.live import LiveChannel
from flame_magic.protocol import cell
from flame_magic.remote import Connection
from flame_magic.results import Prepared
from flame_magic.runners import RunnerCount
from flame_magic.runs import TASK_INPUT_LIMIT, Runs
from flame_magic.sessions import SessionKey
from flame_magic.wire import item_channel

Show = Callable[[cell.Output], None]


class Maps:
    """Maps in ``connection``'s sessions; ``value_of`` gives an item's value from its result."""

    def __init__(
        self, connection: Connection, runs: Runs, value_of: Callable[[cell.CellResult], Any]
    ) -> None:
        self.connection = connection
        self.runs = runs
        self.value_of = value_of

    def run(
        self,
        prepared: Prepared,
        items: list[Any] | Iterator[Any],
        *,
        return_exceptions: bool = False,
        show: Show | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        started: Callable[[MapRun], None] | None = None,
    ) -> MapOutcome:
        """Run a prepared cell once per item, in the session of ``prepared.key``.

        A map that stopped (a failure, an interrupt, Flame) closes its session, unless it is
        named; what finished is in the outcome. ``show`` is given the items' outputs in input
        order as they come (else they are in the outcome); ``started`` the run, as it starts.
        """
        assert prepared.item is not None
        if isinstance(items, list) and not items:
            return MapOutcome(results=[])
        connection = self.connection
        seen: list[Any] = items if isinstance(items, list) else []
        session_id = connection.session(prepared.key)
        shared = self.runs.prepare(prepared.request, session_id)
        # With a cache, each item's live output on a channel of its own, shown in input order.
        channel = uuid.uuid4().hex if prepared.request.HasField("cache") and show is not None else ""
        payloads: Iterable[bytes]
        if isinstance(items, list):  # every item is checked before any is sent
            payloads = item_payloads(shared, prepared.item, items, TASK_INPUT_LIMIT, channel)
        else:  # read as the map goes; the items seen are kept for the messages
            payloads = iter_item_payloads(
                shared, prepared.item, _kept(items, seen), TASK_INPUT_LIMIT, channel
            )
        client = connection.client()
        runners = RunnerCount(client, session_id)
        waiting = self.runs.pending_watch(session_id)

        def progress(done: Progress) -> None:
            if on_progress is not None:
                on_progress(done)
            runners.sample()
            if done.done == 0:
                waiting()  # a map whose runners do not start, or that finds no room, says so

        def live(index: int) -> LiveChannel | None:
            assert show is not None
            return self.runs.live_channel(session_id, show, item_channel(channel, index))

        run = MapRun(
            client,
            session_id,
            shared,
            payloads,
            prepared.key.instances,
            result_of=self.runs.result_of,
            value_of=self.value_of,
            stop_at_failure=not return_exceptions,
            on_progress=progress,
            show=show,
            live=live if channel else None,
            task_input=lambda data: self.runs.task_input(session_id, data),
            limit=TASK_INPUT_LIMIT,
        )
        if started is not None:
            started(run)
        try:
            outcome = run.run()
        except RunnerStartTimeout as exc:
            connection.close_session(session_id)
            raise CellFailed(f"{exc}. The map's session was closed.") from None
        runners.sample(force=True)
        outcome.items = seen
        outcome.runners = runners.most if runners.known else None
        self._after(prepared.key, session_id, outcome, return_exceptions)
        return outcome

    def _after(self, key: SessionKey, session_id: str, outcome: MapOutcome, return_exceptions: bool) -> None:
        """Close a stopped map's session: it cancels the items sent but not started."""
        failed = outcome.failure is not None and not return_exceptions
        if not (outcome.interrupted or outcome.fatal is not None or failed):
            return
        if key.name is None:
            self.connection.close_session(session_id)  # refused while an item still runs
        fatal = outcome.fatal
        if isinstance(fatal, SessionStartError):
            self.connection.close_session(session_id)  # its runners cannot start: a new one next time
            said = self.connection.install_failure(session_id, fatal)
            if said is not None:
                outcome.fatal = SessionStartError(said)
        elif fatal is not None and (
            isinstance(fatal, SessionGoneError) or self.connection.session_gone(session_id)
        ):
            self.connection.forget(session_id)

    def ordered(
        self, prepared: Prepared, items: list[Any] | Iterator[Any], return_exceptions: bool
    ) -> Iterator[Any]:
        """Start the map on a thread of its own now; its results in input order, as they come.

        Leaving the loop early stops the map (the items sent may still finish on Flame).
        """
        runs: queue.SimpleQueue[MapRun | None] = queue.SimpleQueue()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["outcome"] = self.run(
                    prepared, items, return_exceptions=return_exceptions, started=runs.put
                )
            except BaseException as exc:  # noqa: B036 - raised to the caller
                box["error"] = exc
            finally:
                runs.put(None)

        thread = threading.Thread(target=work, name="flmrun-map", daemon=True)
        thread.start()
        return self._results(prepared, runs, thread, box, return_exceptions)

    @staticmethod
    def _results(
        prepared: Prepared,
        runs: queue.SimpleQueue[MapRun | None],
        thread: threading.Thread,
        box: dict[str, Any],
        return_exceptions: bool,
    ) -> Iterator[Any]:
        run = runs.get()
        try:
            if run is not None:
                for _, value in run.ordered():
                    if isinstance(value, BaseException) and not return_exceptions:
                        break  # raised below, with its item named
                    yield value
        finally:
            if run is not None:
                run.stop()
            thread.join()
        if "error" in box:
            raise box["error"]
        outcome: MapOutcome = box["outcome"]
        if outcome.fatal is not None:
            raise outcome.fatal
        if outcome.failure is not None and not return_exceptions:
            index, error = outcome.failure
            item = outcome.items[index] if index < len(outcome.items) else "?"
            debugger.name_failure(error, f"item {index} of the map ({prepared.item}={item!r})")
            raise error


def _kept(items: Iterator[Any], seen: list[Any]) -> Iterator[Any]:
    """``items``, each also appended to ``seen``."""
    for item in items:
        seen.append(item)
        yield item
