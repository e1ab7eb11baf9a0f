"""What the embedded Flame keeps of applications and sessions, and Flame's checks on their specs."""

from __future__ import annotations

import json
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from flame_magic import protocol
from flame_magic.embedded.errors import FrontendError

if TYPE_CHECKING:
    from flame_magic.embedded.executor import Instance
    from flame_magic.embedded.tasks import TaskRecord

types = protocol.types

# Flame's defaults (common/src/apis/types.rs, session_manager/src/apiserver/frontend.rs).
DEFAULT_DELAY_RELEASE = 60  # seconds an idle instance is kept
REPORTED_MAX_INSTANCES = 1_000_000  # what Flame reports for an application without a limit
DEFAULT_RESREQ = types.ResourceRequirement(cpu=1, memory=1024**3, gpu=0)


def node_cpus() -> int:
    """This node's CPUs, as reported (``FLAME_EMBEDDED_CPUS`` overrides, e.g. to test a small cluster)."""
    given = os.environ.get("FLAME_EMBEDDED_CPUS", "")
    return int(given) if given.isdigit() and int(given) > 0 else (os.cpu_count() or 1)


def now_ms() -> int:
    """Current time in Unix milliseconds, Flame's unit for every timestamp."""
    return int(time.time() * 1000)


def event(code: int, message: str) -> protocol.types.Event:
    return types.Event(code=code, message=message, creation_time=now_ms())


@dataclass(eq=False)
class ApplicationRecord:
    """A registered application."""

    name: str
    spec: protocol.types.ApplicationSpec
    state: protocol.types.ApplicationState = types.Enabled
    creation_time: int = field(default_factory=now_ms)

    def to_proto(self) -> protocol.types.Application:
        """As Flame reports it (unset max_instances and delay_release filled in)."""
        spec = types.ApplicationSpec()
        spec.CopyFrom(self.spec)
        # Flame fills these two in when they are unset, and reports them.
        if not spec.HasField("max_instances"):
            spec.max_instances = REPORTED_MAX_INSTANCES
        if not spec.HasField("delay_release"):
            spec.delay_release = DEFAULT_DELAY_RELEASE
        return types.Application(
            metadata=types.Metadata(id=self.name, name=self.name),
            spec=spec,
            status=types.ApplicationStatus(state=self.state, creation_time=self.creation_time),
        )


@dataclass(eq=False)
class SessionRecord:
    """A session, its tasks, its pending queue and its instances."""

    id: str
    spec: protocol.types.SessionSpec
    state: protocol.types.SessionState = types.Open
    creation_time: int = field(default_factory=now_ms)
    completion_time: int | None = None
    events: list[protocol.types.Event] = field(default_factory=list)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)  # pending or running: ended ones are on disk
    next_task_id: int = 1
    counts: list[int] = field(default_factory=lambda: [0] * len(types.TaskState.values()))
    pending: deque[TaskRecord] = field(default_factory=deque)
    instances: list[Instance] = field(default_factory=list)  # binding or bound, not leaving
    bind_failures: int = 0
    paused: bool = False
    shim_noted: bool = False  # the session event saying no executor has its shim was added

    def to_proto(self) -> protocol.types.Session:
        """As a message, with exact per-state task counts and the session events."""
        c = self.counts
        return types.Session(
            metadata=types.Metadata(id=self.id, name=self.id),
            spec=self.spec,
            status=types.SessionStatus(
                state=self.state,
                creation_time=self.creation_time,
                completion_time=self.completion_time,
                pending=c[types.Pending],
                running=c[types.Running],
                succeed=c[types.Succeed],
                failed=c[types.Failed],
                cancelled=c[types.Cancelled],
                events=self.events,
            ),
        )


def validate_application(name: str, spec: protocol.types.ApplicationSpec) -> None:
    """Flame's checks at registration: a name, an absolute working directory, valid schemas.

    Like Flame 0.6, it accepts applications without a command, with a url, and of any shim:
    what cannot run is found when a session binds (or, for a shim no executor has, never).
    """
    if not name:
        raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application name is empty")
    wd = spec.working_directory
    if wd and not os.path.isabs(wd):
        raise FrontendError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"working_directory must be an absolute path, got: {wd}",
        )
    if spec.HasField("schema"):
        for part in ("input", "output", "common_data"):
            if spec.schema.HasField(part):
                try:
                    json.loads(getattr(spec.schema, part))
                except ValueError as err:
                    raise FrontendError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"invalid {part} schema: {err}"
                    ) from None


def normalised_session_spec(spec: protocol.types.SessionSpec) -> protocol.types.SessionSpec:
    """The spec as Flame keeps it: ``batch_size`` at least 1, min/max instances in whole batches."""
    out = types.SessionSpec()
    out.CopyFrom(spec)
    out.batch_size = max(1, spec.batch_size)
    if not out.HasField("resreq"):
        out.resreq.CopyFrom(DEFAULT_RESREQ)
    batch = out.batch_size
    if batch > 1:
        if out.min_instances % batch:
            raise FrontendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_instances ({out.min_instances}) must be 0 or a multiple of batch_size ({batch})",
            )
        if out.HasField("max_instances") and out.max_instances % batch:
            raise FrontendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_instances ({out.max_instances}) must be a multiple of batch_size ({batch})",
            )
    return out


def spec_mismatch(ssn: SessionRecord, spec: protocol.types.SessionSpec) -> str | None:
    have = ssn.spec

    def opt_max(s: protocol.types.SessionSpec) -> int | None:
        return s.max_instances if s.HasField("max_instances") else None

    checks = [
        ("application", have.application, spec.application),
        ("resreq", have.resreq, spec.resreq),
        ("min_instances", have.min_instances, spec.min_instances),
        ("max_instances", opt_max(have), opt_max(spec)),
        ("batch_size", have.batch_size, spec.batch_size),
        ("priority", have.priority, spec.priority),
    ]
    for name, expected, got in checks:
        if expected != got:
            show = (lambda r: str(r).replace("\n", " ").strip() or "{}") if name == "resreq" else repr
            return (
                f"session <{ssn.id}> spec mismatch: {name} differs "
                f"(expected {show(expected)}, got {show(got)})"
            )
    return None


def node_message(name: str) -> protocol.types.Node:
    """This machine as Flame's only node, named ``name``."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    capacity = types.ResourceRequirement(cpu=node_cpus(), memory=memory, gpu=0)
    return types.Node(
        metadata=types.Metadata(id=name, name=name),
        spec=types.NodeSpec(hostname=name),
        status=types.NodeStatus(
            state=types.Ready,
            capacity=capacity,
            allocatable=capacity,
            info=types.NodeInfo(arch=platform.machine(), os=platform.system().lower()),
            last_heartbeat_time=now_ms(),
        ),
    )
