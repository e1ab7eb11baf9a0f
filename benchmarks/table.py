"""Every figure of the benchmarks, quiet and under load, in one table against peers and targets.

Usage: python benchmarks/table.py [--quick]

Runs ``run.py``, ``kernel.py``, ``bigdata.py`` and ``fanout.py`` twice each, quiet and with
``--load`` (two CPU-bound processes beside them, which each script starts and stops), shows
what each printed, then one table: our figure quiet and under load, the peers' (ipyparallel
and Dask, measured in the same run), the target, and whether it is met (under both). ``--quick``
runs fewer repetitions (figures vary more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(script: str, args: list[str], load: bool) -> dict[str, Any]:
    """Run one benchmark script; show what it printed; return its JSON figures."""
    command = [sys.executable, os.path.join(HERE, script), "--json", *args, *(["--load"] if load else [])]
    print(f"$ {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    lines = done.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("{")), flush=True)
    found = [line for line in lines if line.startswith("{")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(found[-1])  # type: ignore[no-any-return]


def rows(quiet: dict[str, Any], loaded: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool]]:
    """(figure, quiet, loaded, peers, target, met) for every figure."""
    out: list[tuple[str, str, str, str, str, bool]] = []

    def both(pick: Any, fmt: str) -> tuple[str, str, Any, Any]:
        q, lo = pick(quiet), pick(loaded)
        return fmt.format(q), fmt.format(lo), q, lo

    r = {k: v["run"] for k, v in (("q", quiet), ("l", loaded))}
    q, lo = r["q"], r["l"]
    out.append(
        (
            "warm trivial cell, IPython shell (ms)",
            f"{q['flmrun']:.2f}",
            f"{lo['flmrun']:.2f}",
            f"%%px {q['px']:.2f} / {lo['px']:.2f}",
            "<= 1/3 of %%px",
            all(x["flmrun"] <= x["px"] / 3 for x in (q, lo)),
        )
    )

    def over(x: dict[str, Any], a: str, b: str, local: str) -> float:
        return float(x[a] - x[local]) / max(float(x[b] - x[local]), 1e-9)

    hq, hl = (
        over(q, "flmrun_history", "px_history", "local_history"),
        over(lo, "flmrun_history", "px_history", "local_history"),
    )
    out.append(
        (
            "the same with store_history=True, minus a local cell (ms)",
            f"+{q['flmrun_history'] - q['local_history']:.2f} (ratio {hq:.2f})",
            f"+{lo['flmrun_history'] - lo['local_history']:.2f} (ratio {hl:.2f})",
            "%%px +{:.2f} / +{:.2f}".format(*(x["px_history"] - x["local_history"] for x in (q, lo))),
            "ratio <= 0.333",
            hq <= 1 / 3 and hl <= 1 / 3,
        )
    )
    k = {key: v["kernel"] for key, v in (("q", quiet), ("l", loaded))}
    lat = {key: k[key]["latency"] for key in k}
    kq, kl = (over(lat[x], "flmrun", "px", "local") for x in ("q", "l"))
    out.append(
        (
            "warm trivial cell through a real kernel, minus a local cell (ms)",
            f"+{lat['q']['flmrun'] - lat['q']['local']:.2f} (ratio {kq:.2f})",
            f"+{lat['l']['flmrun'] - lat['l']['local']:.2f} (ratio {kl:.2f})",
            f"%%px +{lat['q']['px'] - lat['q']['local']:.2f} / +{lat['l']['px'] - lat['l']['local']:.2f}",
            "ratio <= 0.333",
            kq <= 1 / 3 and kl <= 1 / 3,
        )
    )
    first = {key: k[key]["first"] for key in k}
    out.append(
        (
            "first cell: %load_ext + cell at once (s)",
            f"{first['q']['at_once']:.2f}",
            f"{first['l']['at_once']:.2f}",
            "-",
            "<= 0.5 s",
            all(first[x]["at_once"] <= 0.5 for x in first),
        )
    )
    out.append(
        (
            "first cell after %load_ext and a 2 s pause (ms)",
            f"{first['q']['after_pause'] * 1000:.0f}",
            f"{first['l']['after_pause'] * 1000:.0f}",
            "-",
            "<= 50 ms",
            all(first[x]["after_pause"] <= 0.05 for x in first),
        )
    )
    b = {key: v["bigdata"] for key, v in (("q", quiet), ("l", loaded))}
    size = quiet["size"]

    def rate(x: dict[str, Any], name: str, way: str) -> float:
        return float(size / x[name][way] / 1e9)

    for way, label in (("in", "into the cell"), ("back", "back")):
        ours = [rate(b[x], "flmrun", way) for x in ("q", "l")]
        peers = ", ".join(
            f"{p} {rate(b['q'], p, way):.2f} / {rate(b['l'], p, way):.2f}" for p in ("dask", "ipyparallel")
        )
        out.append(
            (
                f"{size // 10**6} MB {label} (GB/s)",
                f"{ours[0]:.2f}",
                f"{ours[1]:.2f}",
                peers,
                ">= 3x Dask",
                all(rate(b[x], "flmrun", way) >= 3 * rate(b[x], "dask", way) for x in ("q", "l")),
            )
        )
    slow = {p: b["l"][p]["back"] / b["q"][p]["back"] for p in ("flmrun", "dask", "ipyparallel")}
    out.append(
        (
            f"{size // 10**6} MB back: time under load / quiet",
            f"{slow['flmrun']:.2f}x",
            "",
            f"dask {slow['dask']:.2f}x, ipyparallel {slow['ipyparallel']:.2f}x",
            "<= Dask's",
            slow["flmrun"] <= slow["dask"],
        )
    )
    peak = {p: (b["q"][p]["local_peak"] / size, b["q"][p]["remote_peak"] / size) for p in b["q"]}
    out.append(
        (
            f"peak memory, {size // 10**6} MB (notebook, remote) x payload, quiet",
            f"{peak['flmrun'][0]:.2f}, {peak['flmrun'][1]:.2f}",
            "",
            ", ".join(f"{p} {peak[p][0]:.2f}, {peak[p][1]:.2f}" for p in ("dask", "ipyparallel")),
            "<= 1.3",
            max(peak["flmrun"]) <= 1.3,
        )
    )
    f = {key: v["fanout"] for key, v in (("q", quiet), ("l", loaded))}
    items = quiet["items"]
    out.append(
        (
            f"{items}-item --map, 2 instances (items/s)",
            f"{f['q']['flmrun']:.0f}",
            f"{f['l']['flmrun']:.0f}",
            ", ".join(f"{p} {f['q'][p]:.0f} / {f['l'][p]:.0f}" for p in ("dask", "ipyparallel")),
            ">= 3000, >= 5x Dask, ahead of ipyparallel",
            all(
                f[x]["flmrun"] >= 3000
                and f[x]["flmrun"] >= 5 * f[x]["dask"]
                and f[x]["flmrun"] > f[x]["ipyparallel"]
                for x in f
            ),
        )
    )
    live = {key: k[key]["live"] for key in k}
    for key, label in (
        ("first", "first live line, cell sent at load"),
        ("first_after_pause", "first live line after a pause"),
        ("later", "later live lines"),
    ):
        out.append(
            (
                f"{label} (ms)",
                f"{live['q'][key] * 1000:.0f}",
                f"{live['l'][key] * 1000:.0f}",
                "-",
                "<= 100 ms",
                all(live[x][key] <= 0.1 for x in live),
            )
        )
    mem = {key: k[key]["memory"] for key in k}
    cells = quiet.get("cells", 10_000)
    out.append(
        (
            f"kernel RSS over {cells} trivial cells (MB)",
            f"{mem['q']['flmrun'] / 1e6:+.2f}",
            f"{mem['l']['flmrun'] / 1e6:+.2f}",
            f"local cells {mem['q']['local'] / 1e6:+.2f} / {mem['l']['local'] / 1e6:+.2f}",
            "<= 5 MB per 10,000",
            all(mem[x]["flmrun"] * 10_000 / cells <= 5e6 for x in mem),
        )
    )
    fm = {key: f[key]["memory"] for key in f}
    per = 100_000 / quiet["memory_items"]
    out.append(
        (
            f"embedded Flame RSS over a {quiet['memory_items']}-item map (MB; notebook beside)",
            f"{fm['q']['flame'] / 1e6:+.2f} ({fm['q']['notebook'] / 1e6:+.2f})",
            f"{fm['l']['flame'] / 1e6:+.2f} ({fm['l']['notebook'] / 1e6:+.2f})",
            "-",
            "flat: <= 5 MB per 100,000",
            all(fm[x]["flame"] * per <= 5e6 for x in fm),
        )
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    quick = args.quick
    plan = [
        ("run.py", ["--repeat", "100" if quick else "300"]),
        ("kernel.py", ["--repeat", "40" if quick else "100", "--cells", "2000" if quick else "10000"]),
        ("bigdata.py", ["--repeat", "5" if quick else "9"]),
        ("fanout.py", ["--repeat", "3" if quick else "5", "--memory-items", "10000" if quick else "20000"]),
    ]
    figures: dict[bool, dict[str, Any]] = {False: {}, True: {}}
    for script, script_args in plan:
        for load in (False, True):
            found = measure(script, script_args, load)
            found.pop("load", None)
            figures[load].update(found)
    cells = 2000 if quick else 10_000
    for load in (False, True):
        figures[load]["cells"] = cells
        figures[load]["memory_items"] = 10_000 if quick else 20_000
    print()
    print("| figure | quiet | under load | peers, same run (quiet / load) | target | met |")
    print("|---|---|---|---|---|---|")
    for name, q, lo, peers, target, met in rows(figures[False], figures[True]):
        print(f"| {name} | {q} | {lo} | {peers} | {target} | {'met' if met else 'MISSED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
