"""``flmping`` on the embedded Flame: each task sleeps and allocates what it asks, then says so.

Task input (JSON, every field optional): ``{"duration": milliseconds, "memory": bytes}``.
Task output (JSON): ``{"message": "Completed on <HOST> in <N> milliseconds with <SIZE> memory"}``,
Flame's own flmping's answer.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from flame_magic.embedded.apps import serve


def ping(data: bytes | None) -> bytes:
    """Run one ping task."""
    request = json.loads(data) if data else {}
    if not isinstance(request, dict):
        raise ValueError('a ping task takes a JSON object: {"duration": MS, "memory": BYTES}')
    start = time.monotonic()
    memory = bytearray(int(request.get("memory") or 0))
    if request.get("duration"):
        time.sleep(int(request["duration"]) / 1000)
    elapsed = int((time.monotonic() - start) * 1000)
    message = (
        f"Completed on <{socket.gethostname()}> in <{elapsed}> milliseconds with <{len(memory)} B> memory"
    )
    return json.dumps({"message": message}).encode()


if __name__ == "__main__":
    sys.exit(serve(ping))
