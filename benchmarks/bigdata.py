"""Big data through %%flmrun against ipyparallel and Dask, measured in one run on this machine.

Usage: python benchmarks/bigdata.py [--size-mb 100] [--repeat 9] [--load] [--json] [--only flmrun,dask]

A float64 numpy array of ``--size-mb`` MB goes into a remote process and a result of the
same size comes back:

- ``%%flmrun`` on the embedded Flame, through the real IPython shell: a cell that reads the
  notebook's array (``data.nbytes``), and a cell whose last expression is an array the
  runner holds (``big``), which comes back as the cell's value. The embedded Flame's
  runner is on this host, so both go through shared memory (``/dev/shm`` segments, see
  ``flame_magic/shm.py``); ``FLAME_MAGIC_SHM=0`` measures the object cache instead. The
  array changes before every run, so nothing is deduplicated; a last run sends it
  unchanged (through the cache, no upload; through shared memory it is written again).
- ipyparallel (one engine): ``view.push`` and ``view.pull``.
- Dask distributed (one worker process): ``client.scatter`` and ``client.gather``.

Each contender runs in a fresh process of its own, so that peak memory (``ru_maxrss``)
belongs to it alone. Times are medians after warm-up runs. Peak memory is the process's
high-water mark over the whole measurement, minus what it used before the payload
existed, as a multiple of the payload: the notebook (or client) side, and the remote
process (runner, engine, worker).

Targets (issue 18, goal 3): each way at least 3x Dask's rate in the same run, and peak
memory at most 1.3x the payload on each side (``--size-mb 1000 --only flmrun`` for 1 GB).

A note on this machine: it is a virtual machine whose host backs guest memory on first
touch and takes freed memory back after a few seconds (free page reporting). Memory that
was not used recently costs about 2 ms per MB on first touch, for every contender alike,
so single runs vary; the medians are of runs close together, as a busy notebook's are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuload import cpu_load, load_label  # noqa: E402

MB = 1000 * 1000


def median_seconds(action: Callable[[int], object], repeat: int, warmup: int) -> float:
    samples = []
    for i in range(warmup + repeat):
        started = time.perf_counter()
        action(i)
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def remote_maxrss() -> int:
    import resource as r

    return r.getrusage(r.RUSAGE_SELF).ru_maxrss * 1024


# -- contenders, each run in its own process -------------------------------------------------


def run_flmrun(size: int, repeat: int, warmup: int, application: str = "") -> dict[str, Any]:
    import numpy as np
    from IPython.core.interactiveshell import InteractiveShell

    os.environ["HOME"] = tempfile.mkdtemp()  # no cluster configured: the embedded Flame
    for name in ("FLAME_ENDPOINT", "FLAME_CACHE_ENDPOINT", "FLAME_CACHE_STORAGE"):
        os.environ.pop(name, None)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "flame_magic")
    if application:  # else automatic: flame-magic's runner, which the embedded Flame registers
        shell.run_line_magic("config", f"FlameMagics.application = {application!r}")

    def cell(source: str) -> Any:
        line, body = source.split("\n", 1)
        # The magic itself, as a notebook cell runs it (its value is the cell's value).
        return shell.run_cell_magic("flmrun", line.removeprefix("%%flmrun").strip(), body)

    cell("%%flmrun --no-assign\nimport numpy as np, resource")
    runner_before = cell("%%flmrun\nresource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024")
    notebook_before = maxrss_bytes()
    data = np.random.default_rng(1).random(size // 8)
    shell.user_ns["data"] = data

    def send(i: int) -> None:
        data[0] = i  # a new value each time: nothing is deduplicated
        assert cell("%%flmrun\ndata.nbytes") == data.nbytes

    cell(f"%%flmrun --no-assign\nbig = np.ones({size // 8})")

    def fetch(i: int) -> None:
        value = cell(f"%%flmrun\nbig[0] = {i}\nbig")
        assert value.shape == (size // 8,) and value[0] == i

    into = median_seconds(send, repeat, warmup)
    back = median_seconds(fetch, repeat, warmup)
    shipper = shell.magics_manager.registry["FlameMagics"].connection().shipper()
    uploads, segments = shipper.uploads, shipper.segments
    dedupe = median_seconds(lambda i: cell("%%flmrun\ndata.nbytes"), repeat, 1)
    assert shipper.uploads == uploads, "an unchanged value was uploaded again"
    trivial = median_seconds(lambda i: cell("%%flmrun --no-assign\nx = 1"), repeat, 3)
    runner_peak = cell("%%flmrun\nresource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024")
    notebook_peak = maxrss_bytes()
    shell.run_line_magic("unload_ext", "flame_magic")
    return {
        "in": into,
        "back": back,
        "dedupe": dedupe,
        "trivial": trivial,
        "local_peak": notebook_peak - notebook_before,
        "remote_peak": runner_peak - runner_before,
        "uploads": uploads,
        "segments": segments,
    }


def run_ipyparallel(size: int, repeat: int, warmup: int) -> dict[str, Any]:
    import ipyparallel as ipp
    import numpy as np

    cluster = ipp.Cluster(n=1, log_level=40)
    rc = cluster.start_and_connect_sync()
    try:
        rc.wait_for_engines(1, timeout=60)
        view = rc[0]
        remote_before = view.apply_sync(remote_maxrss)
        local_before = maxrss_bytes()
        data = np.random.default_rng(1).random(size // 8)

        def push(i: int) -> None:
            data[0] = i
            view.push({"data": data}, block=True)

        def pull(i: int) -> None:
            value = view.pull("data", block=True)
            assert value.shape == data.shape

        into = median_seconds(push, repeat, warmup)
        back = median_seconds(pull, repeat, warmup)
        remote_peak = view.apply_sync(remote_maxrss)
        local_peak = maxrss_bytes()
    finally:
        rc.close()
        cluster.stop_cluster_sync()
    return {
        "in": into,
        "back": back,
        "local_peak": local_peak - local_before,
        "remote_peak": remote_peak - remote_before,
    }


def run_dask(size: int, repeat: int, warmup: int) -> dict[str, Any]:
    import numpy as np
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        (worker,) = client.scheduler_info()["workers"]
        remote_before = client.run(remote_maxrss)[worker]
        local_before = maxrss_bytes()
        data = np.random.default_rng(1).random(size // 8)
        futures: list[Any] = []

        def scatter(i: int) -> None:
            data[0] = i
            futures[:] = [client.scatter(data)]  # returns once the worker holds it

        def gather(i: int) -> None:
            value = client.gather(futures[0])
            assert value.shape == data.shape

        into = median_seconds(scatter, repeat, warmup)
        back = median_seconds(gather, repeat, warmup)
        remote_peak = client.run(remote_maxrss)[worker]
        local_peak = maxrss_bytes()
    return {
        "in": into,
        "back": back,
        "local_peak": local_peak - local_before,
        "remote_peak": remote_peak - remote_before,
    }


def run_stock(size: int, repeat: int, warmup: int) -> dict[str, Any]:
    """The same cells on Flame's stock flmrun (flamepy's runner, the embedded Flame's flmrun)."""
    return run_flmrun(size, repeat, warmup, application="flmrun")


CONTENDERS = {"flmrun": run_flmrun, "stock": run_stock, "ipyparallel": run_ipyparallel, "dask": run_dask}


def measure(name: str, size: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Run one contender in a fresh interpreter and return what it measured."""
    command = [sys.executable, __file__, "--one", name, "--size-mb", str(size // MB)]
    command += ["--repeat", str(repeat), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--one", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help="beside two CPU-bound processes")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="contenders, comma-separated")
    args = parser.parse_args()
    size = args.size_mb * MB
    if args.one:
        print(json.dumps(CONTENDERS[args.one](size, args.repeat, args.warmup)))
        return 0

    with cpu_load(args.load):
        names = [name for name in CONTENDERS if name in args.only.split(",")]
        results = {name: measure(name, size, args.repeat, args.warmup) for name in names}
    ours = results["flmrun"]
    print(f"Large values, {load_label(args.load)}")

    def rate(seconds: float) -> str:
        return f"{size / seconds / 1e9:6.2f} GB/s ({seconds * 1000:6.1f} ms)"

    print(f"{args.size_mb} MB float64 array, median of {args.repeat} runs after {args.warmup} warm-up runs")
    labels = {
        "flmrun": ("%%flmrun cell reads it", "%%flmrun cell returns it"),
        "stock": ("  same, on Flame's flmrun", "  same, on Flame's flmrun"),
        "ipyparallel": ("ipyparallel push", "ipyparallel pull"),
        "dask": ("Dask scatter", "Dask gather"),
    }
    for direction, index in (("in", 0), ("back", 1)):
        print(f"{'into the remote process' if direction == 'in' else 'back to the notebook'}:")
        for name, result in results.items():
            print(f"  {labels[name][index]:28s} {rate(result[direction])}")
        for peer in [p for p in ("ipyparallel", "dask") if p in results]:
            ratio = results[peer][direction] / ours[direction]
            print(f"  %%flmrun's rate / {peer:11s}     {ratio:6.2f}x")
        if "dask" in results:
            ok = results["dask"][direction] >= 3 * ours[direction]
            print(f"  target >= 3x Dask's rate: {'met' if ok else 'MISSED'}")
    way = f"{ours['uploads']} cache uploads"
    if ours["segments"]:
        way = f"shared memory, {ours['segments']} segments"
    print(f"%%flmrun's values went through {way}")
    again = "written again" if ours["segments"] else "deduplicated: no upload"
    print(f"%%flmrun, the same array again ({again})   {ours['dedupe'] * 1000:6.1f} ms")
    print(f"%%flmrun, a trivial cell for comparison                   {ours['trivial'] * 1000:6.1f} ms")
    if "stock" in results:
        stock = results["stock"]
        again, trivial = stock["dedupe"] * 1000, stock["trivial"] * 1000
        print(f"  the same on Flame's flmrun: again {again:6.1f} ms, trivial {trivial:6.1f} ms")
    print("peak memory over the run, as a multiple of the payload (target <= 1.3):")
    for name, result in results.items():
        local, remote = result["local_peak"] / size, result["remote_peak"] / size
        print(f"  {name:12s} notebook side {local:5.2f}x   remote process {remote:5.2f}x")
    if args.json:
        print(json.dumps({"bigdata": results, "size": size, "load": args.load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
