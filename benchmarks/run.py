"""Speed of %%flmrun against ipyparallel, measured in one run on this machine.

Usage: python benchmarks/run.py [--repeat N] [--load] [--json]

1. A warm trivial cell: ``%%flmrun`` on the embedded Flame (flame-magic's runner, then
   Flame's stock ``flmrun``) against ipyparallel's
   ``%%px`` (and ``view.execute``) on a local one-engine cluster, both through the
   same in-process IPython shell. Also, for reference, a bare gRPC round trip and a
   Flame task round trip (CreateTask, then watching it to its end) of the same cell on the
   warm runner, without the magic.
2. The first cell of a fresh Jupyter kernel: ``%load_ext flame_magic`` and a first
   ``%%flmrun`` cell, embedded Flame and runner start included; and the embedded Flame's
   start alone (start to ready).

3. The same warm cells with ``store_history=True``, as a kernel runs a notebook's cells, and a
   local cell beside them: the cost of each magic over the local cell.

Targets: a warm cell at most 1/3 of ipyparallel's time (also its cost over a local cell, with
history); the first cell under 2 s. ``--load`` runs it beside two CPU-bound processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuload import cpu_load, load_label  # noqa: E402

TRIVIAL = "x = 1"


def median_ms(action: Callable[[], object], repeat: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def run_cell(shell, source: str, history: bool = False) -> Callable[[], None]:
    """Run ``source`` as a cell: silent, or as a kernel runs a notebook's cells (stored in history)."""

    def action() -> None:
        result = shell.run_cell(source, silent=not history, store_history=history)
        if not result.success:
            raise RuntimeError(f"benchmark cell failed: {result.error_in_exec or result.error_before_exec}")

    return action


def warm_cells(repeat: int) -> dict[str, float]:
    import ipyparallel as ipp
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "flame_magic")
    flmrun = median_ms(run_cell(shell, f"%%flmrun --no-assign\n{TRIVIAL}"), repeat)
    flmrun_history = median_ms(run_cell(shell, f"%%flmrun --no-assign\n{TRIVIAL}", history=True), repeat)
    local_history = median_ms(run_cell(shell, TRIVIAL, history=True), repeat)
    shell.run_line_magic("config", "FlameMagics.application = 'flmrun'")  # Flame's stock flmrun
    stock = median_ms(run_cell(shell, f"%%flmrun --no-assign\n{TRIVIAL}"), repeat)
    shell.run_line_magic("config", "FlameMagics.application = ''")

    magics = shell.magics_manager.registry["FlameMagics"]
    client = magics.connection().client()
    from flame_magic.protocol import frontend

    request = frontend.GetApplicationRequest(name="flmrun")
    bare = median_ms(lambda: client._stub.GetApplication(request), repeat)
    task = task_round_trip(magics.connection())
    task_ms = median_ms(task, repeat)
    shell.run_line_magic("unload_ext", "flame_magic")

    cluster = ipp.Cluster(n=1, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        view = rc[:]
        view.activate()
        px = median_ms(run_cell(shell, f"%%px --block\n{TRIVIAL}"), repeat)
        px_history = median_ms(run_cell(shell, f"%%px --block\n{TRIVIAL}", history=True), repeat)
        execute = median_ms(lambda: view.execute(TRIVIAL, block=True), repeat)
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    return {
        "flmrun": flmrun,
        "stock": stock,
        "px": px,
        "execute": execute,
        "grpc": bare,
        "task": task_ms,
        "flmrun_history": flmrun_history,
        "px_history": px_history,
        "local_history": local_history,
    }


def task_round_trip(connection) -> Callable[[], None]:
    """CreateTask of a trivial cell on the notebook's warm session, then watch it to its end."""
    from flame_magic import codec
    from flame_magic.protocol import cell, types

    client, session_id = connection.client(), connection.session()
    payload = codec.encode(
        cell.CellRequest(header=codec.local_header(), source=TRIVIAL, filename="<bench>", first_line=1)
    )

    def action() -> None:
        created = client.create_task(session_id, payload)
        if client.wait_task(session_id, created.metadata.id).status.state != types.Succeed:
            raise RuntimeError("benchmark task failed")

    return action


def embedded_start_seconds(repeat: int = 5) -> float:
    """Median time from starting an embedded Flame to its serving requests."""
    from flame_magic.embedded import EmbeddedFlame

    samples = []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(repeat):
            started = time.perf_counter()
            flame = EmbeddedFlame.start(working_directory=workdir)
            samples.append(time.perf_counter() - started)
            flame.stop()
    return statistics.median(samples)


def first_cell_seconds() -> float:
    from jupyter_client.manager import start_new_kernel

    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home}
        env.pop("FLAME_ENDPOINT", None)
        manager, client = start_new_kernel(kernel_name="python3", env=env)
        try:
            started = time.perf_counter()
            reply = client.execute_interactive("%load_ext flame_magic", timeout=60)
            reply = client.execute_interactive("%%flmrun\n1 + 1", timeout=60)
            elapsed = time.perf_counter() - started
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"first cell failed: {reply['content']}")
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--load", action="store_true", help="beside two CPU-bound processes")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()

    with cpu_load(args.load):
        first = first_cell_seconds()
        start = embedded_start_seconds()
        warm = warm_cells(args.repeat)
    print(f"Shell figures, {load_label(args.load)}")
    ratio = warm["flmrun"] / warm["px"]
    print(f"warm trivial cell, median of {args.repeat} (ms)")
    print(f"  %%flmrun (embedded Flame)      {warm['flmrun']:8.3f}")
    print(f"  %%flmrun on Flame's flmrun     {warm['stock']:8.3f}   (flamepy's runner, nothing deployed)")
    print(f"  %%px (ipyparallel, 1 engine)   {warm['px']:8.3f}")
    print(f"  view.execute (ipyparallel)     {warm['execute']:8.3f}")
    print(f"  bare gRPC round trip           {warm['grpc']:8.3f}")
    print(f"  Flame task round trip          {warm['task']:8.3f}   (CreateTask + watch, warm runner)")
    verdict = "met" if ratio <= 1 / 3 else "MISSED"
    print(f"  ratio %%flmrun / %%px           {ratio:8.3f}   (target <= 0.333: {verdict})")
    print(f"  ratio %%flmrun / view.execute   {warm['flmrun'] / warm['execute']:8.3f}")
    print(f"  ratio %%flmrun / bare gRPC      {warm['flmrun'] / warm['grpc']:8.3f}")
    print("first cell of a fresh kernel (load_ext + %%flmrun, Flame and runner start included):")
    print(f"  {first:.2f} s   (target < 2 s: {'met' if first < 2 else 'MISSED'})")
    print(f"embedded Flame start to ready, median of 5: {start * 1000:.0f} ms")
    ours, px = warm["flmrun_history"] - warm["local_history"], warm["px_history"] - warm["local_history"]
    print("warm trivial cell with store_history=True, as a kernel runs cells (ms)")
    print(f"  local cell                     {warm['local_history']:8.3f}")
    print(f"  %%flmrun                       {warm['flmrun_history']:8.3f}   +{ours:.3f} over local")
    print(f"  %%px                           {warm['px_history']:8.3f}   +{px:.3f} over local")
    ratio = ours / px if px > 0 else float("inf")
    verdict = "met" if ratio <= 1 / 3 else "MISSED"
    print(f"  ratio of the costs over local  {ratio:8.3f}   (target <= 0.333: {verdict})")
    if args.json:
        print(json.dumps({"run": {**warm, "first": first, "start": start}, "load": args.load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
