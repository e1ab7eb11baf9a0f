"""The embedded Flame's ``flame.v1.Frontend`` service: gRPC requests onto its session manager."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from flame_magic import protocol
from flame_magic.embedded.errors import FrontendError
from flame_magic.embedded.records import DEFAULT_RESREQ

if TYPE_CHECKING:
    from flame_magic.embedded.session_manager import SessionManager

types = protocol.types
frontend = protocol.frontend
_TERMINAL = protocol.TERMINAL_TASK_STATES

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _unary(
    method: Callable[[Any, _Req], _Resp],
) -> Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]:
    """Run a synchronous handler on the loop and turn FrontendError into a gRPC status."""

    @functools.wraps(method)
    async def handler(self: Any, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return method(self, request)
        except FrontendError as err:
            await context.abort(err.code, err.message)
            raise  # unreachable: abort raises

    return handler


def _ok() -> protocol.types.Result:
    return types.Result(return_code=0)


class FrontendService(protocol.FrontendServicer):
    """``flame.v1.Frontend`` over a :class:`SessionManager`."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager

    @_unary
    def RegisterApplication(self, request: Any) -> protocol.types.Result:
        if not request.HasField("application"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application spec is missing")
        self.m.apps.register(request.name, request.application)
        return _ok()

    @_unary
    def UnregisterApplication(self, request: Any) -> protocol.types.Result:
        self.m.unregister_application(request.name)
        return _ok()

    @_unary
    def UpdateApplication(self, request: Any) -> protocol.types.Result:
        if not request.HasField("application"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "application spec is missing")
        self.m.apps.update(request.name, request.application)
        return _ok()

    @_unary
    def GetApplication(self, request: Any) -> protocol.types.Application:
        return self.m.apps.get(request.name).to_proto()

    @_unary
    def ListApplication(self, request: Any) -> protocol.types.ApplicationList:
        return types.ApplicationList(applications=[a.to_proto() for a in self.m.applications.values()])

    @_unary
    def ListExecutor(self, request: Any) -> protocol.types.ExecutorList:
        executors = []
        for inst in self.m.executors.values():
            ssn = self.m.sessions.get(inst.session_id)
            resreq = ssn.spec.resreq if ssn is not None else DEFAULT_RESREQ
            executors.append(inst.to_proto(self.m.node_name, resreq))
        return types.ExecutorList(executors=executors)

    @_unary
    def ListNodes(self, request: Any) -> protocol.types.NodeList:
        return types.NodeList(nodes=[self.m.node()])

    @_unary
    def GetNode(self, request: Any) -> protocol.frontend.GetNodeResponse:
        if request.name != self.m.node_name:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"node <{request.name}> not found")
        return frontend.GetNodeResponse(node=self.m.node())

    @_unary
    def CreateSession(self, request: Any) -> protocol.types.Session:
        if not request.HasField("session"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "session spec is missing")
        return self.m.create_session(request.session_id, request.session).to_proto()

    @_unary
    def OpenSession(self, request: Any) -> protocol.types.Session:
        spec = request.session if request.HasField("session") else None
        return self.m.open_session(request.session_id, spec).to_proto()

    @_unary
    def CloseSession(self, request: Any) -> protocol.types.Session:
        return self.m.close_session(request.session_id).to_proto()

    @_unary
    def DeleteSession(self, request: Any) -> protocol.types.Session:
        return self.m.delete_session(request.session_id).to_proto()

    @_unary
    def GetSession(self, request: Any) -> protocol.types.Session:
        return self.m.get_session(request.session_id).to_proto()

    @_unary
    def ListSession(self, request: Any) -> protocol.types.SessionList:
        return types.SessionList(sessions=[s.to_proto() for s in self.m.sessions.values()])

    @_unary
    def CreateTask(self, request: Any) -> protocol.types.Task:
        if not request.HasField("task"):
            raise FrontendError(grpc.StatusCode.INVALID_ARGUMENT, "task spec is missing")
        spec = request.task
        data = spec.input if spec.HasField("input") else None
        return self.m.create_task(spec.session_id, data).to_proto(with_events=False)

    @_unary
    def GetTask(self, request: Any) -> protocol.types.Task:
        return self.m.get_task(request.session_id, request.task_id)

    async def WatchTask(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.types.Task]:
        try:
            task = self.m.live_task(request.session_id, request.task_id)
            if task is None:  # it ended: its last state, and the stream ends
                done = self.m.get_task(request.session_id, request.task_id)
                done.status.ClearField("events")
                yield done
                return
        except FrontendError as err:
            await context.abort(err.code, err.message)
        assert task is not None  # abort raises
        # Register before sending the current state, so no change can fall in between.
        queue: asyncio.Queue[protocol.types.Task] = asyncio.Queue()
        task.watchers.append(queue)
        try:
            last = task.state
            yield task.to_proto(with_events=False)
            while last not in _TERMINAL:
                msg = await queue.get()
                if msg.status.state != last:
                    last = msg.status.state
                    yield msg
        finally:
            task.watchers.remove(queue)

    async def ListTask(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[protocol.types.Task]:
        try:
            ssn = self.m.get_session(request.session_id)
        except FrontendError as err:
            await context.abort(err.code, err.message)
        for task in self.m.list_tasks(ssn):
            yield task
