"""A Flame application written with flamepy's own service base class (flamepy 0.6.0).

It is launched by the embedded Flame's executor as any Host-shim application, and serves
``flame.v1.Instance`` through flamepy's ``FlameService``/``run``: a peer we did not write.

- ``OnSessionEnter`` raises (flamepy turns that into return code -1 and the message) when
  the session's common data is ``b"refuse"``, or for every session when the application's
  environment sets ``FLAMEPY_SERVICE_REFUSE`` (its value is the message);
- a task whose input starts with ``b"fail"`` raises, which flamepy turns into a failed task
  with the exception's text as its message;
- any other task returns JSON with the input reversed, the session's common data and the pid.
"""

from __future__ import annotations

import json
import os

import flamepy


class EchoService(flamepy.FlameService):
    """Answers tasks from the session's common data and the task input."""

    def __init__(self) -> None:
        self.common: bytes | None = None

    def on_session_enter(self, context: flamepy.SessionContext) -> None:
        self.common = context.common_data()
        if os.environ.get("FLAMEPY_SERVICE_REFUSE"):
            raise RuntimeError(os.environ["FLAMEPY_SERVICE_REFUSE"])
        if self.common == b"refuse":
            raise RuntimeError("flamepy service refuses common_data b'refuse'")

    def on_task_invoke(self, context: flamepy.TaskContext) -> bytes:
        data = context.input or b""
        if data.startswith(b"fail"):
            raise ValueError(f"flamepy service failed on {data!r}")
        reply = {
            "reversed": data[::-1].decode(),
            "common": None if self.common is None else self.common.decode(errors="replace"),
            "pid": os.getpid(),
            "task": context.task_id,
        }
        return json.dumps(reply).encode()

    def on_session_leave(self) -> None:
        pass


if __name__ == "__main__":
    flamepy.run(EchoService())
