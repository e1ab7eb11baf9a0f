"""The embedded Flame's default applications, and a small server for the two of them we write.

Flame registers three applications at start: ``flmrun`` (flamepy's runner), ``flmexec`` (runs
a script) and ``flmping`` (sleeps and allocates, to try a cluster). The embedded Flame
registers the same names with the same task contracts, run by this machine's Python, and
flame-magic's runner beside them under its own name, ``flame-magic``.

:func:`serve` is the process side of ``flmexec`` and ``flmping``: Flame's ``Instance``
service on the socket in ``FLAME_INSTANCE_ENDPOINT``, handing each task's input to a
function and its return value back as the output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from flame_magic import applications, deploy, protocol

log = logging.getLogger(__name__)

types = protocol.types

FLMRUN_MODULE = "flamepy.runner.runpy"

# Our words for flmexec's contract: a script to run, its output as bytes (JSON numbers).
_SCRIPT_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "language": {"type": "string", "description": "python or shell"},
        "runtime": {"type": "string", "description": "Python version (3.X) or shell (bash, zsh...)"},
        "code": {"type": "string", "description": "the script"},
        "input": {"type": "array", "items": {"type": "integer"}, "description": "bytes on its stdin"},
    },
    "required": ["language", "code"],
}
_SCRIPT_OUTPUT_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"data": {"type": "array", "items": {"type": "integer"}, "description": "its stdout"}},
}


def default_applications(working_directory: str) -> dict[str, protocol.types.ApplicationSpec]:
    """Flame's default applications and flame-magic's runner, as the embedded Flame registers them.

    Parameters
    ----------
    working_directory
        Where flame-magic's runner starts (the notebook's directory); the others get a
        directory per executor, as on Flame.
    """
    python = sys.executable
    return {
        protocol.FLMRUN: types.ApplicationSpec(
            shim=types.Host,
            description="The Flame Runner application for executing customized Python applications "
            "(flamepy's runner, on the embedded Flame's Python).",
            command=python,
            arguments=["-m", FLMRUN_MODULE],
            installer="python",  # sets FLAME_PYTHON_VERSION to this Python's, as Flame's installer
        ),
        "flmexec": types.ApplicationSpec(
            shim=types.Host,
            description="The Flame Executor application, which is used to run scripts.",
            command=python,
            arguments=["-m", "flame_magic.embedded.apps.flmexec"],
            schema=types.ApplicationSchema(
                input=json.dumps(_SCRIPT_SCHEMA), output=json.dumps(_SCRIPT_OUTPUT_SCHEMA)
            ),
        ),
        "flmping": types.ApplicationSpec(
            shim=types.Host,
            description="Flame Ping: sleeps and allocates what each task asks, and says where it ran.",
            command=python,
            arguments=["-m", "flame_magic.embedded.apps.flmping"],
        ),
        applications.DEFAULT_NAME: deploy.runner_spec(python=python, working_directory=working_directory),
    }


class _Service(protocol.InstanceServicer):  # type: ignore[misc]
    """``flame.v1.Instance`` over a function of one task's input."""

    def __init__(self, handle: Callable[[bytes | None], bytes], done: threading.Event) -> None:
        self._handle = handle
        self._done = done

    def OnSessionEnter(self, request: Any, context: Any) -> protocol.types.Result:
        return types.Result(return_code=0)

    def OnTaskInvoke(self, request: Any, context: Any) -> protocol.types.TaskResult:
        data = request.input if request.HasField("input") else None
        try:
            return types.TaskResult(return_code=0, output=self._handle(data))
        except Exception as exc:  # the task fails with the message; the process serves on
            log.info("task %s failed: %s", request.task_id, exc)
            return types.TaskResult(return_code=1, message=f"{type(exc).__name__}: {exc}")

    def OnSessionLeave(self, request: Any, context: Any) -> protocol.types.Result:
        self._done.set()
        return types.Result(return_code=0)


def serve(handle: Callable[[bytes | None], bytes]) -> int:
    """Serve ``handle`` as an application process until the session is left; the exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    endpoint = os.environ.get("FLAME_INSTANCE_ENDPOINT", "")
    path = endpoint.removeprefix("unix://").removeprefix("unix:")
    if not path:
        print("FLAME_INSTANCE_ENDPOINT is not set: this process is started by Flame", file=sys.stderr)
        return 2
    done = threading.Event()
    # One worker: Flame sends one task at a time.
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    protocol.add_InstanceServicer_to_server(_Service(handle, done), server)
    umask = os.umask(0o077)  # the socket is the user's only
    try:
        server.add_insecure_port(f"unix://{path}")
    finally:
        os.umask(umask)
    server.start()
    done.wait()
    server.stop(1).wait()
    return 0
