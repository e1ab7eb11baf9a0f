"""Fan-out throughput: 1000 trivial items on 2 workers, %%flmrun --map against ipyparallel and Dask.

Usage: python benchmarks/fanout.py [--items N] [--repeat R] [--load] [--json]

1. ``%%flmrun --map x=xs --into out --instances 2`` with a cell that returns ``x``, on the
   embedded Flame, through an in-process IPython shell (progress display included): the
   items go in batches, several per Flame task (see ``flame_magic.fanout``), sent and
   followed through Flame's Frontend protocol.
2. ipyparallel's load-balanced ``view.map_sync`` on a local cluster of 2 engines.
3. Dask's ``client.gather(client.map(..., pure=False))`` on a LocalCluster of 2 worker
   processes with one thread each (``pure=False``: no result is reused between runs).

Each runs alone (the others stopped), after one warm-up map that starts its workers; the
median of ``--repeat`` runs is reported. Target: at least 3000 items/s, at least 5 times
Dask's, and ahead of ipyparallel.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuload import cpu_load, load_label  # noqa: E402


def identity(x: int) -> int:
    return x


def median_rate(items: int, repeat: int, run: Callable[[], object]) -> tuple[float, list[float]]:
    run()  # warm-up: workers started, imports done
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        rates.append(items / (time.perf_counter() - started))
    return statistics.median(rates), rates


def flmrun_rate(items: int, repeat: int, application: str = "") -> tuple[float, list[float]]:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    saved = {key: os.environ.get(key) for key in ("HOME", "FLAME_ENDPOINT")}
    with tempfile.TemporaryDirectory() as home:
        os.environ["HOME"] = home  # no ~/.flame: the embedded Flame
        os.environ.pop("FLAME_ENDPOINT", None)
        shell = InteractiveShell.instance(config=config)
        shell.run_line_magic("load_ext", "flame_magic")
        if application:  # else automatic: flame-magic's runner
            shell.run_line_magic("config", f"FlameMagics.application = {application!r}")
        shell.user_ns["xs"] = list(range(items))

        def run() -> None:
            # The progress line is written (its cost is measured) but not shown.
            with contextlib.redirect_stderr(io.StringIO()):
                result = shell.run_cell("%%flmrun --map x=xs --into out --instances 2\nx", silent=True)
            if not result.success or shell.user_ns["out"] != shell.user_ns["xs"]:
                raise RuntimeError(f"the map failed: {result.error_in_exec or result.error_before_exec}")

        try:
            return median_rate(items, repeat, run)
        finally:
            shell.run_line_magic("unload_ext", "flame_magic")
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_over_map(items: int) -> dict[str, int]:
    """Growth (bytes) of the embedded Flame's and the notebook's resident memory over a map of ``items``."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    with tempfile.TemporaryDirectory() as home:
        os.environ["HOME"] = home
        os.environ.pop("FLAME_ENDPOINT", None)
        shell = InteractiveShell.instance(config=config)
        shell.run_line_magic("load_ext", "flame_magic")
        cell = "%%flmrun --map x=range(n) --into out --instances 2\nx"
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                shell.user_ns["n"] = 2000
                shell.run_cell(cell, silent=True)  # warm-up: runners, pools, caches
                flame = shell.magics_manager.registry["FlameMagics"].connection()._embedded.pid
                before = rss(flame), rss()
                shell.user_ns["n"] = items
                result = shell.run_cell(cell, silent=True)
                shell.user_ns.pop("out", None)
            if not result.success:
                raise RuntimeError(f"the map failed: {result.error_in_exec}")
            return {"flame": rss(flame) - before[0], "notebook": rss() - before[1]}
        finally:
            shell.run_line_magic("unload_ext", "flame_magic")


def ipyparallel_rate(items: int, repeat: int) -> tuple[float, list[float]]:
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=2, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(2, timeout=60)
        view = rc.load_balanced_view()

        def run() -> None:
            if view.map_sync(identity, range(items)) != list(range(items)):
                raise RuntimeError("ipyparallel returned wrong results")

        return median_rate(items, repeat, run)
    finally:
        rc.close()
        cluster.stop_cluster_sync()


def dask_rate(items: int, repeat: int) -> tuple[float, list[float]]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):

        def run() -> None:
            if client.gather(client.map(identity, range(items), pure=False)) != list(range(items)):
                raise RuntimeError("Dask returned wrong results")

        return median_rate(items, repeat, run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory-items", type=int, default=20_000, help="items of the memory figure")
    parser.add_argument("--load", action="store_true", help="beside two CPU-bound processes")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()

    with cpu_load(args.load):
        flmrun, flmrun_runs = flmrun_rate(args.items, args.repeat)
        stock, stock_runs = flmrun_rate(args.items, args.repeat, application="flmrun")
        ipp_rate, ipp_runs = ipyparallel_rate(args.items, args.repeat)
        dask, dask_runs = dask_rate(args.items, args.repeat)
        grown = memory_over_map(args.memory_items)
    print(f"Fan-out, {load_label(args.load)}")

    print(f"{args.items} trivial items on 2 workers, median of {args.repeat} runs (items/s)")
    rows = [
        ("%%flmrun --map (embedded Flame, 2 instances)", flmrun, flmrun_runs),
        ("  the same on Flame's flmrun (flamepy's runner)", stock, stock_runs),
        ("ipyparallel load-balanced map (2 engines)", ipp_rate, ipp_runs),
        ("Dask client.map (2 workers)", dask, dask_runs),
    ]
    for label, rate, runs in rows:
        print(f"  {label:46s} {rate:8.0f}   runs: {', '.join(f'{r:.0f}' for r in runs)}")
    print(f"  ratio %%flmrun / ipyparallel {flmrun / ipp_rate:30.2f}")
    print(f"  ratio %%flmrun / Dask {flmrun / dask:37.2f}")
    met = flmrun >= 3000 and flmrun >= 5 * dask and flmrun > ipp_rate
    print(f"  target >= 3000 items/s, >= 5x Dask, ahead of ipyparallel: {'met' if met else 'MISSED'}")
    per = 100_000 / args.memory_items
    print(f"resident memory over a {args.memory_items}-item map (target: flat, <= 5 MB per 100,000 items)")
    for side in ("flame", "notebook"):
        label = "embedded Flame" if side == "flame" else "notebook"
        scaled = grown[side] * per
        verdict = "met" if scaled <= 5e6 else "MISSED"
        print(f"  {label:16s} {grown[side] / 1e6:+7.2f} MB   ({scaled / 1e6:+.2f} MB per 100,000: {verdict})")
    if args.json:
        figures = {"flmrun": flmrun, "stock": stock, "ipyparallel": ipp_rate, "dask": dask, "memory": grown}
        print(json.dumps({"fanout": figures, "items": args.items, "load": args.load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
