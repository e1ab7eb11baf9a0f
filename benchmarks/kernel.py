"""Where the user sits: %%flmrun through a real Jupyter kernel, against %%px and local cells.

Usage: python benchmarks/kernel.py [--repeat N] [--cells N] [--load] [--json]

Every figure is taken in a real ipykernel driven through ``jupyter_client``, cells sent as
a notebook sends them (``store_history=True``), timed from the execute request to the
kernel's idle status for it (what the user waits for):

1. **Latency**: a trivial cell as a local cell, as ``%%flmrun`` (embedded Flame) and as
   ``%%px`` (ipyparallel, one engine), in the same kernel, interleaved (local, flmrun, px,
   local, ...) so that load and drift touch all three alike. The figure of each magic is its
   median minus the local cell's. Target: ``%%flmrun``'s cost over a local cell at most 1/3
   of ``%%px``'s.
2. **First cell** of a fresh kernel: ``%load_ext flame_magic`` and a ``%%flmrun`` cell sent at
   once (target at most 0.5 s from the load to the cell's end), and the same cell after a 2 s
   pause, as a person types (target at most 50 ms for the cell).
3. **Live output**: a ``%%flmrun`` cell prints a line with its time stamp, sleeps, and
   prints more; the delay from each print to its stream message reaching this client
   (target at most 0.1 s on the embedded Flame, the first line included).
4. **Kernel memory**: the kernel's resident memory over ``--cells`` trivial ``%%flmrun``
   cells, and over as many local cells (target: at most 5 MB of growth for 10,000 cells).

``--load`` runs it all beside two CPU-bound processes (started and stopped here).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuload import cpu_load, load_label  # noqa: E402

TRIVIAL = "x = 1"
FLMRUN = f"%%flmrun --no-assign\n{TRIVIAL}"
PX = f"%%px --block\n{TRIVIAL}"


@contextmanager
def kernel(extra_env: dict[str, str] | None = None) -> Iterator[tuple[Any, Any]]:
    """A fresh ipykernel with no Flame cluster configured (the embedded Flame)."""
    from jupyter_client.manager import start_new_kernel

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, **(extra_env or {})}
        for name in ("FLAME_ENDPOINT", "FLAME_CACHE_ENDPOINT", "FLAME_CACHE_STORAGE"):
            env.pop(name, None)
        manager, client = start_new_kernel(kernel_name="python3", env=env, cwd=home)
        try:
            yield manager, client
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)


def run(client: Any, code: str, timeout: float = 120, on_stream: Any = None) -> float:
    """Execute ``code`` as a notebook does; seconds from the request to the kernel's idle for it."""
    started = time.perf_counter()
    msg_id = client.execute(code, store_history=True)
    while True:
        message = client.get_iopub_msg(timeout=timeout)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "error":
            raise RuntimeError(f"benchmark cell failed: {content['ename']}: {content['evalue']}\n{code}")
        if kind == "stream" and on_stream is not None:
            on_stream(time.time(), content["text"])
        if kind == "status" and content["execution_state"] == "idle":
            elapsed = time.perf_counter() - started
            break
    reply = client.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=timeout)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"benchmark cell failed: {reply['content']}\n{code}")
    return elapsed


def drain(client: Any) -> None:
    while True:
        try:
            client.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            return


def latency(repeat: int) -> dict[str, float]:
    """Medians (ms) of local, %%flmrun and %%px trivial cells, interleaved in one kernel."""
    with kernel() as (_, client):
        run(client, "%load_ext flame_magic")
        run(client, FLMRUN)
        run(
            client,
            "import ipyparallel as ipp\ncluster = ipp.Cluster(n=1, log_level=40)\n"
            "rc = cluster.start_and_connect_sync()\nrc.wait_for_engines(1, timeout=120)\nrc[:].activate()",
            timeout=300,
        )
        samples: dict[str, list[float]] = {"local": [], "flmrun": [], "px": []}
        cells = {"local": TRIVIAL, "flmrun": FLMRUN, "px": PX}
        for round_ in range(repeat + 20):
            for name, code in cells.items():
                elapsed = run(client, code)
                if round_ >= 20:  # warm-up rounds
                    samples[name].append(elapsed)
        run(client, "rc.close()\ncluster.stop_cluster_sync()", timeout=120)
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


def first_cell() -> dict[str, float]:
    """Seconds: load_ext and a cell at once; and the cell alone after a 2 s pause."""
    with kernel() as (_, client):
        started = time.perf_counter()
        load = run(client, "%load_ext flame_magic")
        run(client, "%%flmrun\n1 + 1")
        at_once = time.perf_counter() - started
    with kernel() as (_, client):
        run(client, "%load_ext flame_magic")
        time.sleep(2)  # a person types the cell
        after_pause = run(client, "%%flmrun\n1 + 1")
    return {"load_ext": load, "at_once": at_once, "after_pause": after_pause}


LIVE_CELL = """%%flmrun --no-assign
import time
for i in range({lines}):
    print('line', i, repr(time.time()), flush=True)
    time.sleep({pause})
"""


def live(lines: int = 5, pause: float = 0.5) -> dict[str, float]:
    """Seconds from a print on the runner to its stream message here.

    The first line of the first cell of a fresh kernel (sent with ``%load_ext``, and after a
    2 s pause), and the median of the later lines.
    """
    figures: dict[str, float] = {}
    later: list[float] = []
    for name, wait in (("first", 0.0), ("first_after_pause", 2.0)):
        delays: list[float] = []

        def seen(now: float, text: str, delays: list[float] = delays) -> None:
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "line":
                    delays.append(now - float(parts[2]))

        with kernel() as (_, client):
            run(client, "%load_ext flame_magic")
            time.sleep(wait)
            run(client, LIVE_CELL.format(lines=lines, pause=pause), on_stream=seen)
        if len(delays) != lines:
            raise RuntimeError(f"live output: {len(delays)} of {lines} lines arrived")
        figures[name] = delays[0]
        later += delays[1:]
    figures["later"] = statistics.median(later)
    return figures


RSS = "int(open('/proc/self/statm').read().split()[1]) * {page}".format(page=os.sysconf("SC_PAGE_SIZE"))


def rss_of(client: Any) -> int:
    values: list[int] = []
    msg_id = client.execute(f"print({RSS})", store_history=False)
    while True:
        message = client.get_iopub_msg(timeout=60)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        if message["msg_type"] == "stream":
            values.append(int(message["content"]["text"].split()[0]))
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            return values[0]


def memory(cells: int) -> dict[str, float]:
    """Kernel RSS growth (bytes) over ``cells`` trivial %%flmrun cells, and over as many local cells."""
    grown = {}
    for name, code in (("local", TRIVIAL), ("flmrun", FLMRUN)):
        with kernel() as (_, client):
            run(client, "%load_ext flame_magic")
            for _ in range(200):  # warm-up: caches and pools at their working size
                run(client, code)
            before = rss_of(client)
            for _ in range(cells):
                run(client, code)
            grown[name] = rss_of(client) - before
    return grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=100, help="interleaved rounds of the latency figure")
    parser.add_argument("--cells", type=int, default=10_000, help="cells of the kernel-memory figure")
    parser.add_argument("--load", action="store_true", help="beside two CPU-bound processes")
    parser.add_argument("--only", choices=("latency", "first", "live", "memory"), action="append")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    parts = args.only or ["latency", "first", "live", "memory"]
    figures: dict[str, Any] = {}
    with cpu_load(args.load):
        print(f"Jupyter kernel figures, {load_label(args.load)}")
        if "latency" in parts:
            lat = latency(args.repeat)
            ours, px = lat["flmrun"] - lat["local"], lat["px"] - lat["local"]
            figures["latency"] = lat
            print(f"trivial cell through a kernel, median of {args.repeat} interleaved rounds (ms)")
            print(f"  local cell                     {lat['local']:8.2f}")
            print(f"  %%flmrun (embedded Flame)      {lat['flmrun']:8.2f}   +{ours:.2f} over local")
            print(f"  %%px (ipyparallel, 1 engine)   {lat['px']:8.2f}   +{px:.2f} over local")
            ratio = ours / px if px > 0 else float("inf")
            verdict = "met" if ratio <= 1 / 3 else "MISSED"
            print(f"  ratio of the costs over local  {ratio:8.3f}   (target <= 0.333: {verdict})")
        if "first" in parts:
            first = first_cell()
            figures["first"] = first
            print("first cell of a fresh kernel (embedded Flame)")
            print(f"  %load_ext alone                {first['load_ext'] * 1000:8.0f} ms")
            verdict = "met" if first["at_once"] <= 0.5 else "MISSED"
            at_once = first["at_once"]
            print(f"  %load_ext then the cell at once {at_once:7.2f} s    (target <= 0.5 s: {verdict})")
            verdict = "met" if first["after_pause"] <= 0.05 else "MISSED"
            ms = first["after_pause"] * 1000
            print(f"  the cell after a 2 s pause     {ms:8.0f} ms   (target <= 50 ms: {verdict})")
        if "live" in parts:
            seen = live()
            figures["live"] = seen
            print("live output, print on the runner to the stream message (embedded Flame)")
            labels = {
                "first": "first line, cell sent at load",
                "first_after_pause": "first line, after a 2 s pause",
                "later": "later lines",
            }
            for key, label in labels.items():
                verdict = "met" if seen[key] <= 0.1 else "MISSED"
                print(f"  {label:30s} {seen[key] * 1000:8.0f} ms   (target <= 100 ms: {verdict})")
        if "memory" in parts:
            grown = memory(args.cells)
            figures["memory"] = grown
            print(f"kernel resident memory over {args.cells} trivial cells")
            print(f"  local cells                    {grown['local'] / 1e6:+8.2f} MB")
            scaled = grown["flmrun"] * 10_000 / args.cells
            verdict = "met" if scaled <= 5e6 else "MISSED"
            print(
                f"  %%flmrun cells                 {grown['flmrun'] / 1e6:+8.2f} MB   "
                f"({scaled / 1e6:+.2f} MB per 10,000; target <= 5 MB: {verdict})"
            )
    if args.json:
        print(json.dumps({"kernel": figures, "load": args.load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
