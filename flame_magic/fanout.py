"""Fan-out: one cell run once per item of an iterable, the items in batches, each a Flame task.

The cell's shared inputs are pickled and encoded once; a batch's task input is those bytes
followed by the encoding of each of its items as one ``MapItem`` (protobuf merges
concatenated messages, so the runner reads one CellRequest whose ``items`` are the batch).
The runner runs the cell once per item and returns one CellResult per item in one output.
A batch starts at one item, so that the first results show at once, and grows with the
measured time per item until a task takes about :data:`BATCH_SECONDS`: quick items pay
Flame's cost per task once per batch, slow ones still go one by one.

Flame has no CancelTask, and ``CloseSession`` is refused while any task runs; a runner that
finishes a task is given the next pending one at once, so a session full of pending items
could only be closed once all of them ran. Items are therefore sent as a moving window:
three batches per instance, plus a quarter of a second's worth at the measured rate. The
window keeps every runner busy, and is all that still runs after an interrupt or a failure.

The thread that runs :meth:`MapRun.run` (the one a KeyboardInterrupt reaches) sends items,
several CreateTask calls in flight at once, and reports progress. Watcher threads follow
the tasks in the order they were sent: one watcher, asking Flame about a few tasks at a
time, keeps up with quick items at the least cost (threads only contend for the GIL); when
nothing finishes for a while, a slow item holds its watcher and another one starts, up to
one more than the instances.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from flame_magic.client import FlameClient
from flame_magic.debugger import remote_failure
from flame_magic.errors import CellFailed, FlameError, ShipError, WaitStopped
from flame_magic.items import MapOutcome, Progress, batch_input
from flame_magic.protocol import TERMINAL_TASK_STATES, cell, types
from flame_magic.wire import PAYLOAD_LIMIT

if TYPE_CHECKING:
    from flame_magic.live import LiveChannel

# Items in flight beyond the runners' own: per instance, and the seconds' worth at the
# measured rate (bounded), so that the window refills before a runner goes idle.
AHEAD_PER_INSTANCE = 2
AHEAD_SECONDS = 0.25
MAX_AHEAD = 1024
MAX_WATCHERS = 16
PROGRESS_INTERVAL = 0.2
# Tasks a watcher takes from the queue at once, and asks Flame about together.
WATCH_BATCH = 8
# Seconds without a finished item, while items wait to be watched, before another watcher starts.
STALL_SECONDS = 0.05
# What a batch of items should take on its runner, and the most items in one.
BATCH_SECONDS = 0.05
MAX_BATCH = 512
# A batch's results share one task output: room for this many times the largest item's result.
RESULT_ROOM = 4
# How much larger a batch may be than the largest before it (a noisy rate grows it gradually).
GROWTH = 4
# The batches whose ends measure the rate.
RECENT_BATCHES = 8


class _NotDone:
    """The value of an item that did not finish (interrupted, or the map stopped at a failure)."""

    _instance: _NotDone | None = None

    def __new__(cls) -> _NotDone:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_DONE"

    def __reduce__(self) -> str:
        return "NOT_DONE"


#: Stands in the results for an item that did not finish.
NOT_DONE = _NotDone()


class MapRun:
    """One map: sends the items' tasks, follows them, and gathers their results.

    Parameters
    ----------
    client
        The Flame client.
    session_id
        The session the items run in (its max_instances bounds the parallelism).
    shared
        The encoded CellRequest of the cell, which each batch's task input starts with.
    payloads
        Each item's encoding (see :func:`item_payloads`): a sequence, or an iterator of
        unknown length, read as the window moves (the progress then has no total until it ends).
    instances
        The session's max_instances, to size the window of items in flight.
    result_of
        Turns a finished task into its CellResult; raises CellFailed when there is none.
    value_of
        The item's value from its CellResult (unpickled, or as the runner showed it).
    stop_at_failure
        Stop sending items at the first failure (else failures take their item's place).
    on_progress
        Called on this thread at most every :data:`PROGRESS_INTERVAL` seconds, and at the end.
    show
        Shows one output of an item, on this thread: the items' outputs are shown in input
        order as they come (else they are returned in the outcome).
    live
        The live channel of item ``i`` (see :func:`item_payloads`), or None: what the item at
        the head of the order prints while it runs is shown at once, polled with the progress.
    task_input
        Wraps a batch's CellRequest for the session's runner (see ``Backend.task_input``).
    limit
        The bytes a task input may take (each item alone was checked against it).
    batch_size
        Items per task; None: sized as the map goes (see the module docstring).
    """

    def __init__(
        self,
        client: FlameClient,
        session_id: str,
        shared: bytes,
        payloads: Iterable[bytes],
        instances: int,
        result_of: Callable[[types.Task], cell.CellResult],
        value_of: Callable[[cell.CellResult], Any],
        stop_at_failure: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        show: Callable[[cell.Output], None] | None = None,
        live: Callable[[int], LiveChannel | None] | None = None,
        task_input: Callable[[bytes], bytes] | None = None,
        limit: int = PAYLOAD_LIMIT,
        batch_size: int | None = None,
    ) -> None:
        self.client = client
        self.session_id = session_id
        # Stopping at a failure: a failed item also ends its batch on the runner (protobuf
        # merges the flag into the shared request).
        stop = cell.CellRequest(stop_at_error=True).SerializeToString() if stop_at_failure else b""
        self._shared = shared + stop
        self._task_input = task_input
        self._limit = limit
        self._payloads = iter(payloads)
        self._total: int | None = len(payloads) if isinstance(payloads, Sequence) else None
        self._exhausted = self._total == 0
        self._sent = 0
        self.instances = max(1, instances)
        self._result_of = result_of
        self._value_of = value_of
        self._stop_at_failure = stop_at_failure
        self._on_progress = on_progress
        self._results: list[Any] = [NOT_DONE] * (self._total or 0)
        self._outputs: dict[int, cell.CellResult] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # (index of the batch's first item, its items, its task)
        self._queue: queue.SimpleQueue[tuple[int, int, str] | None] = queue.SimpleQueue()
        self._done = 0
        self._failed = 0
        self._failure: tuple[int, BaseException] | None = None
        self._fatal: BaseException | None = None
        self._started = 0.0
        self._last_done = 0.0
        self._watchers: list[threading.Thread] = []
        self._show = show
        self._live = live
        self._shown = 0  # items before this index have had their outputs shown
        self._sent = 0
        self._head: LiveChannel | None = None  # the channel of item _shown, while it runs
        self._halted = False  # stop() was called: end as if interrupted
        self._ended = False
        # (time, items done) at the last batches' ends: the recent rate sizes the next batches.
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=RECENT_BATCHES)
        self._fixed_batch = batch_size
        self._batch = batch_size or 1  # the largest batch sent
        self._result_bytes = 0  # the largest result of one item

    def run(self) -> MapOutcome:
        """Run every item; return what finished, also when interrupted (then ``interrupted`` is set)."""
        self._started = self._last_done = time.monotonic()
        self._add_watcher()
        interrupted = False
        self._sent = 0
        try:
            self._pump()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._stop.set()
            for _ in self._watchers:
                self._queue.put(None)
        interrupted = interrupted or self._halted
        self._show_in_order(final=True)
        with self._cond:
            outcome = MapOutcome(
                results=list(self._results),
                outputs=[] if self._show is not None else sorted(self._outputs.items()),
                failure=self._failure,
                fatal=self._fatal,
                interrupted=interrupted,
                progress=self._progress(),
            )
            outcome.left_running = max(0, self._sent - self._done)
        if self._on_progress is not None and outcome.progress is not None:
            self._on_progress(outcome.progress)
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        return outcome

    def stop(self) -> None:
        """Stop the map from another thread, as an interrupt would (the items sent may finish)."""
        with self._cond:
            self._halted = True
            self._cond.notify_all()

    def ordered(self) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` in input order as the items finish, while :meth:`run` runs on another
        thread; it ends where the map ended (a failed item's result is its exception)."""
        index = 0
        while True:
            with self._cond:
                while not self._ended and (index >= len(self._results) or self._results[index] is NOT_DONE):
                    self._cond.wait(PROGRESS_INTERVAL)
                if index >= len(self._results) or self._results[index] is NOT_DONE:
                    return
                value = self._results[index]
            yield index, value
            index += 1

    def _pump(self) -> None:
        """Send items as the window allows until all are done or the map must stop."""
        next_report = time.monotonic()
        while True:
            with self._cond:
                while True:
                    if (
                        self._halted
                        or self._fatal is not None
                        or (self._failure is not None and self._stop_at_failure)
                    ):
                        return
                    if self._exhausted and self._done >= self._sent:
                        return
                    size = self._batch_size()
                    room = self._window(size) - (self._sent - self._done)
                    if not self._exhausted and room >= size:
                        break
                    now = time.monotonic()
                    if now >= next_report:
                        break
                    self._cond.wait(min(next_report - now, STALL_SECONDS))
                    self._unstall()
            if not self._exhausted and room >= size:
                burst = self._take(room // size * size)  # whole batches only
                if burst is None:
                    return
                batches = self._batches(burst, size)
                self._batch = max(self._batch, size)
                inputs = [batch_input(self._shared, batch) for batch in batches]
                if self._task_input is not None:
                    inputs = [self._task_input(data) for data in inputs]
                try:
                    tasks = self.client.create_tasks(self.session_id, inputs)
                    for task, batch in zip(tasks, batches, strict=True):
                        self._queue.put((self._sent, len(batch), task.metadata.id))
                        self._sent += len(batch)
                except FlameError as exc:
                    with self._cond:
                        self._fatal = exc
                    return
            now = time.monotonic()
            if now >= next_report:
                next_report = now + PROGRESS_INTERVAL
                self._show_in_order()
                if self._on_progress is not None:
                    self._on_progress(self._progress())

    def _batches(self, items: list[bytes], size: int) -> list[list[bytes]]:
        """``items`` cut in batches of ``size``, each within the task limit."""
        batches: list[list[bytes]] = []
        used = self._limit  # no batch yet
        for item in items:
            if not batches or len(batches[-1]) >= size or used + len(item) > self._limit:
                batches.append([])
                used = len(self._shared)
            batches[-1].append(item)
            used += len(item)
        return batches

    def _batch_size(self) -> int:
        """Items per task: about :data:`BATCH_SECONDS` of a runner's time at the measured rate.

        One until two batches finished; at most :data:`GROWTH` times the largest sent so far,
        and as many as the largest result seen leaves room for in one task output. The
        measured time per item includes Flame's cost per task, which larger batches share:
        batches grow until that cost is small beside the items' own.
        """
        if self._fixed_batch is not None:
            return self._fixed_batch
        with self._cond:
            if len(self._recent) < 2:
                return 1
            (start, before), (end, after) = self._recent[0], self._recent[-1]
            result_bytes = self._result_bytes
        busy = (end - start) * self.instances  # runner-seconds
        per_item = busy / (after - before)
        size = MAX_BATCH if per_item <= 0 else int(BATCH_SECONDS / per_item)
        if result_bytes:
            size = min(size, PAYLOAD_LIMIT // (RESULT_ROOM * result_bytes))
        return max(1, min(size, MAX_BATCH, GROWTH * self._batch))

    def _take(self, room: int) -> list[bytes] | None:
        """Up to ``room`` more payloads, with a place in the results; None if the items' iterator failed."""
        try:
            burst = list(itertools.islice(self._payloads, room))
        except ShipError as exc:
            failure: BaseException = exc
        except Exception as exc:  # the user's own generator
            failure = CellFailed(f"The iterable of --map raised {type(exc).__name__}: {exc}.")
        else:
            with self._cond:
                if len(burst) < room or (self._total is not None and self._sent + len(burst) >= self._total):
                    self._exhausted = True
                    self._total = self._sent + len(burst)
                self._results.extend([NOT_DONE] * (self._sent + len(burst) - len(self._results)))
            return burst
        with self._cond:
            self._fatal = failure
        return None

    def _show_in_order(self, final: bool = False) -> None:
        """Show the outputs of the items finished in turn, and the live output of the next one.

        Only the first unfinished item's channel is polled: one cache call per progress tick,
        however many items run. At the end (``final``) items that did not finish are skipped.
        """
        if self._show is None:
            return
        while self._shown < len(self._results):
            index = self._shown
            with self._cond:
                finished = self._results[index] is not NOT_DONE
                result = self._outputs.pop(index, None)
            if not finished and not final:
                if index < self._sent and self._live is not None:
                    if self._head is None:
                        self._head = self._live(index)
                    if self._head is not None:
                        self._head.poll()
                return
            head, self._head = self._head, None
            streamed = result is not None and result.streamed
            if head is None and streamed and self._live is not None:
                head = self._live(index)
            if head is not None:
                head.finish(streamed=streamed)  # what it streamed, before what came with its result
            for output in result.outputs if result is not None else ():
                self._show(output)
            self._shown += 1

    def _unstall(self) -> None:
        """Add a watcher when tasks wait to be watched and none finished for a while.

        One watcher follows a stream of quick items best (threads only contend for the
        GIL); a slow item holds its watcher, and the items after it need another one.
        """
        if (
            len(self._watchers) < min(MAX_WATCHERS, self.instances + 1)
            and self._queue.qsize() > 0
            and time.monotonic() - self._last_done > STALL_SECONDS
        ):
            self._add_watcher()
            self._last_done = time.monotonic()

    def _add_watcher(self) -> None:
        watcher = threading.Thread(target=self._watch, name=f"flmrun-map-{len(self._watchers)}", daemon=True)
        self._watchers.append(watcher)
        watcher.start()

    def _window(self, size: int) -> int:
        """How many items may be in flight (sent and not finished), in batches of ``size``."""
        elapsed = time.monotonic() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        # At most one more batch per instance: while batches grow, few go at the small size.
        ahead = min(MAX_AHEAD, int(rate * AHEAD_SECONDS), self.instances * size)
        return self.instances * (1 + AHEAD_PER_INSTANCE) * size + ahead

    def _progress(self) -> Progress:
        return Progress(
            done=self._done,
            total=self._total,
            failed=self._failed,
            elapsed=time.monotonic() - self._started,
        )

    def _watch(self) -> None:
        """Follow tasks in the order they were sent, a batch at a time, until told to stop."""
        last = False
        while not last and not self._stop.is_set():
            batch = [self._queue.get()]
            while batch[-1] is not None and len(batch) < WATCH_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is None:
                last = True
                batch.pop()
            jobs = [job for job in batch if job is not None]
            try:
                self._collect(jobs)
            except WaitStopped:
                return
            except FlameError as exc:  # includes SessionStartError, SessionGoneError
                with self._cond:
                    if self._fatal is None:
                        self._fatal = exc
                    self._cond.notify_all()
                return

    def _collect(self, jobs: list[tuple[int, int, str]]) -> None:
        # Behind (several tasks to follow): they have probably finished, and GetTasks made
        # together cost less than watches made one by one. Caught up (one task): watch it.
        found: list[types.Task | None] = [None] * len(jobs)
        if len(jobs) > 1:
            found = list(self.client.get_tasks(self.session_id, [task_id for _, _, task_id in jobs]))
        unfinished = []
        for job, task in zip(jobs, found, strict=True):
            if task is None or task.status.state not in TERMINAL_TASK_STATES:
                unfinished.append(job)
            else:
                self._record(job[0], job[1], task)
        for index, count, task_id in unfinished:
            self._record(index, count, self.client.wait_task(self.session_id, task_id, stop=self._stop))

    def _record(self, first: int, count: int, task: types.Task) -> None:
        """Record a finished batch: each item's outcome in its place.

        Items the runner did not run (the batch stopped at a failure) stay :data:`NOT_DONE`.
        """
        outcomes = self._outcomes(task, count)
        with self._cond:
            now = time.monotonic()
            self._done += count
            self._recent.append((now, self._done))
            self._last_done = now
            for index, (value, error, result) in enumerate(outcomes, first):
                if error is not None:
                    self._failed += 1
                    self._results[index] = error
                    if self._failure is None:
                        self._failure = (index, error)
                else:
                    self._results[index] = value
                if result is not None:
                    self._result_bytes = max(self._result_bytes, result.ByteSize())
                    if len(result.outputs) > 0 or result.streamed:
                        self._outputs[index] = result
            self._cond.notify_all()

    def _outcomes(
        self, task: types.Task, count: int
    ) -> list[tuple[Any, BaseException | None, cell.CellResult | None]]:
        """Each item's value, or its exception, and its CellResult, for the items the runner ran."""
        try:
            batch = self._result_of(task)
        except CellFailed as exc:  # the whole batch: the runner gave no result
            return [(None, exc, None)] * count
        if len(batch.items) == 0:
            lost = CellFailed("The runner returned no result for this item's batch of the map.")
            return [(None, lost, None)] * count
        return [self._outcome(result) for result in batch.items[:count]]

    def _outcome(self, result: cell.CellResult) -> tuple[Any, BaseException | None, cell.CellResult | None]:
        """One item's value, or its exception, and its CellResult."""
        if result.HasField("error"):
            return None, remote_failure(result.error), result
        try:
            return self._value_of(result), None, result
        except Exception as exc:
            return None, exc, result
