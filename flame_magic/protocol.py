"""Flame's wire contract: the one module that imports the generated protobuf code.

Everything else imports messages, stubs and constants from here, so that the
generated modules stay an implementation detail of ``flame_magic._proto``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flame_magic._proto import cell_pb2 as cell
from flame_magic._proto import frontend_pb2 as frontend
from flame_magic._proto import instance_pb2 as instance
from flame_magic._proto import types_pb2 as types
from flame_magic._proto.frontend_pb2_grpc import (
    FrontendServicer,
    FrontendStub,
    add_FrontendServicer_to_server,
)
from flame_magic._proto.instance_pb2_grpc import (
    InstanceServicer,
    InstanceStub,
    add_InstanceServicer_to_server,
)
from flame_magic.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    # Typed stubs for grpc.aio channels (only in the generated .pyi files).
    from flame_magic._proto.frontend_pb2_grpc import FrontendAsyncStub
    from flame_magic._proto.instance_pb2_grpc import InstanceAsyncStub

__all__ = [
    "cell",
    "frontend",
    "instance",
    "types",
    "FrontendServicer",
    "FrontendStub",
    "FrontendAsyncStub",
    "add_FrontendServicer_to_server",
    "InstanceServicer",
    "InstanceStub",
    "InstanceAsyncStub",
    "add_InstanceServicer_to_server",
    "MAX_MESSAGE_BYTES",
    "EVENT_TASK_FAILED",
    "EVENT_BIND_FAILED",
    "EVENT_SESSION_PAUSED",
    "TERMINAL_TASK_STATES",
    "FLMRUN",
]

# Event codes Flame records on tasks and sessions.
EVENT_TASK_FAILED = 3
EVENT_BIND_FAILED = 1001  # OnSessionEnter failed; the message says why
EVENT_SESSION_PAUSED = 1002  # binding failed too often; tasks stay Pending

TERMINAL_TASK_STATES = frozenset({types.Succeed, types.Failed, types.Cancelled})

# Flame's default application name, which the embedded Flame serves with our runner.
FLMRUN = "flmrun"
