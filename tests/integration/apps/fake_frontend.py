"""A stand-in Flame session manager reporting every application as disabled.

Flame's Frontend has no call that disables an application (``ApplicationState.Disabled``
exists in the contract, set by the cluster itself), so to see what a notebook shows for one,
this serves ``GetApplication`` and ``ListApplication`` with a disabled application of the
asked name; every other method answers UNIMPLEMENTED. Prints ``FLAME_ENDPOINT=...``.
"""

from __future__ import annotations

import sys
import threading
from concurrent import futures
from typing import Any

import grpc

from flame_magic import protocol

types = protocol.types


def disabled(name: str) -> Any:
    return types.Application(
        metadata=types.Metadata(id=name, name=name),
        spec=types.ApplicationSpec(
            shim=types.Host, command=sys.executable, arguments=["-m", "flame_magic_runner"]
        ),
        status=types.ApplicationStatus(state=types.Disabled),
    )


class Frontend(protocol.FrontendServicer):
    def GetApplication(self, request: Any, context: grpc.ServicerContext) -> Any:
        return disabled(request.name)

    def ListApplication(self, request: Any, context: grpc.ServicerContext) -> Any:
        return types.ApplicationList(applications=[disabled("flmrun")])


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    protocol.add_FrontendServicer_to_server(Frontend(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"FLAME_ENDPOINT=http://127.0.0.1:{port}", flush=True)
    threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
