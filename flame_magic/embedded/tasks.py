"""Tasks of the embedded Flame, kept out of its memory: inputs, outputs and finished tasks on disk.

Flame keeps tasks in its store, not in the session manager's memory; so does this, in the
embedded Flame's private (0700) state directory, one directory per session and files only
the user can read (0600), for pickles are code. A task's input goes to disk as the task is
created; a task that ended is written whole (input, output, events) and leaves memory, so
that ``GetTask`` and ``ListTask`` still return it while a 100,000-task map keeps the
embedded Flame's memory flat. Only tasks pending or running stay in memory, without their
input. The files go with their session (deleted, or evicted) and with the state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from flame_magic import protocol
from flame_magic.embedded.records import now_ms

types = protocol.types

# Task ids are "1", "2", ...: file names from them cannot leave the session's directory.
_INPUT = "{}.in"
_DONE = "{}.task"


class TaskStore:
    """Task files under ``root``, one directory per session (see the module's docstring).

    Paths are plain strings: pathlib interns every name it parses, which would keep two
    strings per task in memory for good.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sessions: set[str] = set()

    def _dir(self, session_id: str) -> str:
        # Session ids are free-form client strings: hex-encoded, they are safe file names.
        path = os.path.join(self.root, session_id.encode().hex())
        if session_id not in self._sessions:
            os.makedirs(path, mode=0o700, exist_ok=True)
            self._sessions.add(session_id)
        return path

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    @staticmethod
    def _read(path: str) -> bytes:
        with open(path, "rb") as file:
            return file.read()

    def put_input(self, session_id: str, task_id: str, data: bytes) -> None:
        self._write(os.path.join(self._dir(session_id), _INPUT.format(task_id)), data)

    def input(self, session_id: str, task_id: str) -> bytes:
        return self._read(os.path.join(self._dir(session_id), _INPUT.format(task_id)))

    def put_done(self, task: protocol.types.Task) -> None:
        """Keep a finished task (with its events); its separate input file goes."""
        directory = self._dir(task.spec.session_id)
        self._write(os.path.join(directory, _DONE.format(task.metadata.id)), task.SerializeToString())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, _INPUT.format(task.metadata.id)))

    def done(self, session_id: str, task_id: str) -> protocol.types.Task | None:
        """A finished task as it was kept, or None."""
        if not task_id.isdigit():
            return None
        try:
            data = self._read(os.path.join(self._dir(session_id), _DONE.format(task_id)))
        except FileNotFoundError:
            return None
        return types.Task.FromString(data)

    def drop(self, session_id: str) -> None:
        """Remove a session's files (it was deleted or evicted)."""
        shutil.rmtree(os.path.join(self.root, session_id.encode().hex()), ignore_errors=True)
        self._sessions.discard(session_id)


@dataclass(eq=False)
class TaskRecord:
    """A pending or running task and the queues of the WatchTask streams following it.

    Its input is on disk (``has_input``), read when the task runs and when it is shown.
    """

    id: str
    session_id: str
    store: TaskStore
    has_input: bool
    state: protocol.types.TaskState = types.Pending
    output: bytes | None = None  # only between its end and its going to disk
    creation_time: int = field(default_factory=now_ms)
    completion_time: int | None = None
    events: list[protocol.types.Event] = field(default_factory=list)
    watchers: list[asyncio.Queue[protocol.types.Task]] = field(default_factory=list)

    @property
    def input(self) -> bytes | None:
        return self.store.input(self.session_id, self.id) if self.has_input else None

    def to_proto(self, with_events: bool) -> protocol.types.Task:
        """As a message; events only for GetTask, as Flame (streams never carry them)."""
        return types.Task(
            metadata=types.Metadata(id=self.id, name=self.id),
            spec=types.TaskSpec(session_id=self.session_id, input=self.input, output=self.output),
            status=types.TaskStatus(
                state=self.state,
                creation_time=self.creation_time,
                completion_time=self.completion_time,
                events=self.events if with_events else None,
            ),
        )
