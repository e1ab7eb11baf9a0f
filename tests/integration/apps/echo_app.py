"""A tiny Flame application for the embedded Flame's tests.

It serves ``flame.v1.Instance`` on ``$FLAME_INSTANCE_ENDPOINT``, as any Host-shim
application must. Task inputs:

- ``b"die"``: exit at once with status 3 (the executor must notice the death);
- ``b"fail..."``: fail with a message (return_code 1, output ``b"partial"``);
- ``b"sleep:N"``: sleep N seconds, then return JSON with pid and start/end times;
- ``b"wait:PATH"``: wait until ``PATH`` exists (a guard of 60 s against a hang), then return it;
- ``b"meet:DIR:N"``: write ``DIR/<pid>``, wait until ``DIR`` holds N such files (N processes
  running tasks at the same time; a guard of 60 s against a hang), then return JSON with pid,
  start/end times and ``met`` (whether they all came);
- ``b"env"``: return JSON with pid, process group, cwd, environment and argv;
- ``b"pid"``: return the pid;
- ``b"len:..."``: return the length of the input (a small output for a big input);
- ``b"big:N"``: return N bytes;
- anything else: echo it back.

``OnSessionEnter`` refuses when ``common_data == b"refuse"``. Every output that is JSON
carries ``max_concurrent``, the most tasks this process ever ran at once (Flame's
contract: one). If ``$ECHO_APP_MARKERS`` names a directory, the process writes
``<pid>.leave`` there on ``OnSessionLeave``. Like flame-magic's runner, it exits when its
parent (the executor) is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from flame_magic import protocol

types = protocol.types


class EchoInstance(protocol.InstanceServicer):
    """The Instance service of the echo application."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.max_concurrent = 0

    def OnSessionEnter(self, request: Any, context: grpc.ServicerContext) -> protocol.types.Result:
        if request.common_data == b"refuse":
            return types.Result(return_code=7, message="echo_app refuses common_data b'refuse'")
        return types.Result(return_code=0)

    def OnTaskInvoke(self, request: Any, context: grpc.ServicerContext) -> protocol.types.TaskResult:
        with self.lock:
            self.running += 1
            self.max_concurrent = max(self.max_concurrent, self.running)
        try:
            return self._invoke(request.input)
        finally:
            with self.lock:
                self.running -= 1

    def _invoke(self, data: bytes) -> protocol.types.TaskResult:
        if data == b"die":
            print("echo_app: dying on request", flush=True)
            os._exit(3)
        if data.startswith(b"fail"):
            return types.TaskResult(return_code=1, output=b"partial", message=f"echo_app failed on {data!r}")
        if data.startswith(b"sleep:"):
            start = time.time()
            time.sleep(float(data[len(b"sleep:") :]))
            return self._json({"pid": os.getpid(), "start": start, "end": time.time()})
        if data.startswith(b"wait:"):
            path = data[len(b"wait:") :].decode()
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            return types.TaskResult(return_code=0, output=path.encode())
        if data.startswith(b"meet:"):
            start = time.time()
            directory, count = data[len(b"meet:") :].decode().rsplit(":", 1)
            Path(directory, str(os.getpid())).touch()
            deadline = time.monotonic() + 60
            while len(os.listdir(directory)) < int(count) and time.monotonic() < deadline:
                time.sleep(0.01)
            met = len(os.listdir(directory)) >= int(count)
            return self._json({"pid": os.getpid(), "start": start, "end": time.time(), "met": met})
        if data == b"env":
            return self._json(
                {
                    "pid": os.getpid(),
                    "pgid": os.getpgid(0),
                    "sid": os.getsid(0),
                    "cwd": os.getcwd(),
                    "env": dict(os.environ),
                    "argv": sys.argv,
                }
            )
        if data.startswith(b"big:"):
            return types.TaskResult(return_code=0, output=b"z" * int(data[len(b"big:") :]))
        if data.startswith(b"len:"):
            return types.TaskResult(return_code=0, output=str(len(data)).encode())
        if data == b"pid":
            return types.TaskResult(return_code=0, output=str(os.getpid()).encode())
        return types.TaskResult(return_code=0, output=data)

    def _json(self, doc: dict[str, object]) -> protocol.types.TaskResult:
        doc["max_concurrent"] = self.max_concurrent
        return types.TaskResult(return_code=0, output=json.dumps(doc).encode())

    def OnSessionLeave(self, request: Any, context: grpc.ServicerContext) -> protocol.types.Result:
        markers = os.environ.get("ECHO_APP_MARKERS")
        if markers:
            Path(markers, f"{os.getpid()}.leave").write_text("left")
        return types.Result(return_code=0)


def _exit_with_parent() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


def main() -> None:
    """Serve until SIGTERM."""
    endpoint = os.environ["FLAME_INSTANCE_ENDPOINT"]
    print(f"echo_app: pid {os.getpid()} serving on {endpoint}, argv {sys.argv[1:]}", flush=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    protocol.add_InstanceServicer_to_server(EchoInstance(), server)
    server.add_insecure_port(f"unix://{endpoint}")
    server.start()
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
