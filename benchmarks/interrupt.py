"""Interrupt latency of %%flmrun cells through a real Jupyter kernel, on the embedded Flame or a cluster.

Usage: python benchmarks/interrupt.py [--repeat 5] [--setup "%flame deploy ..."]

Two cases, each measured from ``interrupt_kernel()`` (Jupyter's Ctrl-C: SIGINT to the
kernel) to the cell's error on IOPub:

- running: a cell that prints and sleeps; the interrupt is sent when its first line is
  seen. The notebook asks the runner through the object cache, the runner interrupts the
  cell, and the task ends in Flame.
- pending: a cell queued behind a background cell of the same session (one runner, busy);
  the interrupt is sent once the cell has waited a second. The wait stops at once and the
  message says that the task stays queued (Flame cannot cancel one task).

Target: at most 0.5 s for each. Without ``FLAME_ENDPOINT`` the kernel uses the embedded
Flame; with it (and ``FLAME_CACHE_ENDPOINT``), that cluster: give ``--setup "%flame deploy
--installed --python PATH --name NAME"`` to run flame-magic's runner there.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel


def _until_idle(client, msg_id: str, on_message, timeout: float = 300) -> None:
    """Read IOPub until the cell ``msg_id`` is idle; ``on_message(None)`` every 20 ms without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = client.get_iopub_msg(timeout=0.02)
        except queue.Empty:
            on_message(None)
            continue
        on_message(message)
        if (
            message["parent_header"].get("msg_id") == msg_id
            and message["msg_type"] == "status"
            and message["content"]["execution_state"] == "idle"
        ):
            return
    raise RuntimeError(f"cell {msg_id} did not end within {timeout} s")


def _run(client, code: str) -> None:
    reply = client.execute_interactive(code, timeout=300)
    if reply["content"]["status"] != "ok":
        content = reply["content"]
        raise RuntimeError(f"{code!r} failed: {content.get('ename')}: {content.get('evalue')}")


def _latency(manager, client, code: str, trigger) -> tuple[float, str]:
    """Seconds from the interrupt (sent when ``trigger(message)`` says so) to the cell's error."""
    msg_id = client.execute(code)
    sent: list[float] = []
    ended: list[tuple[float, str]] = []

    def on_message(message: dict | None) -> None:
        if message is not None and message["parent_header"].get("msg_id") != msg_id:
            return
        if not sent and trigger(message):
            sent.append(time.monotonic())
            manager.interrupt_kernel()
        if message is not None and message["msg_type"] == "error" and not ended:
            ended.append((time.monotonic(), message["content"]["evalue"]))

    _until_idle(client, msg_id, on_message)
    if not sent or not ended:
        raise RuntimeError(f"no interrupt or no error for {code!r}")
    return ended[0][0] - sent[0], ended[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--setup", default="", help="a line run after loading the extension")
    args = parser.parse_args()
    where = os.environ.get("FLAME_ENDPOINT") or "the embedded Flame"
    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ})
    gate = Path(tempfile.mkdtemp(prefix="flmrun-interrupt-")) / "go"
    try:
        _run(client, f"%load_ext flame_magic\n{args.setup}\nGATE = {str(gate)!r}")
        _run(client, "%%flmrun\n'warm'")
        running, pending = [], []
        for _ in range(args.repeat):
            seconds, _ = _latency(
                manager,
                client,
                "%%flmrun\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)",
                lambda m: m is not None and m["msg_type"] == "stream" and "sleeping" in m["content"]["text"],
            )
            running.append(seconds)
        _run(client, "%%flmrun --session busy\n'warm'")
        for _ in range(args.repeat):
            gate.unlink(missing_ok=True)
            _run(
                client,
                "%%flmrun --session busy --background holder\nimport os, time\n"
                "while not os.path.exists(GATE):\n    time.sleep(0.05)",
            )
            started = time.monotonic()
            seconds, text = _latency(
                manager,
                client,
                "%%flmrun --session busy\n'queued'",
                lambda m, started=started: time.monotonic() - started > 1.0,  # noqa: B023
            )
            if "before the cell started" not in text:
                raise RuntimeError(f"unexpected message for a pending cell: {text}")
            pending.append(seconds)
            gate.touch()
            _run(client, "holder.result(timeout=120)")
        _run(client, "%flame close")
    finally:
        gate.touch()
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    for name, samples in (("running cell", running), ("pending cell", pending)):
        print(
            f"{where}: interrupt of a {name}: median {statistics.median(samples):.3f} s, "
            f"max {max(samples):.3f} s over {len(samples)} (target <= 0.5 s)"
        )


if __name__ == "__main__":
    main()
