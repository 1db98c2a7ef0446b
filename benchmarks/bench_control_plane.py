#!/usr/bin/env python3
"""How fast the control plane answers: listings, map+unmap cycles, the CLI's start.

One NAS and two VM containers on the simulated kernel.  Printed:

* round trips per second of one ``list_zvols`` RPC from one caller on an open
  connection, with 20 and with 50 unmapped zvols on the NAS;
* direct-iSCSI map+unmap cycles per second (``map_zvol`` then ``unmap_zvol``
  of a zvol of its own, over and over) from one caller, then from eight at
  once (each on its own connection, alternating between the containers), and
  the ratio of the two rates: what the NAS and the containers do side by side;
* the wall time of ``rocks list host storagemap nas-0-0`` (a new process:
  start-up, registry, broker connection, the listing, the table) against that
  of ``python3 -c pass``, medians of several runs.

``--model`` runs the cycles with the latency model of bench_boot_storm.py
(``sim_latency``) as well, where they wait on the simulated kernel.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import common
from common import NAS, POOL

from imgstorage.messaging import RpcClient
from imgstorage.nas.client import NasClient

CONTAINERS = ("vm-container-0-1", "vm-container-0-2")
MODEL = {"zfs": 0.2, "target": 0.2, "iscsi": 0.5, "dm": 0.05}


def cycles(bench: common.BenchCluster, callers: int, seconds: float,
           tag: str, least: int = 3) -> Dict[str, float]:
    """Map+unmap cycles per second from ``callers`` threads at once, for ``seconds``
    and until every caller made ``least`` cycles (with the model one takes seconds)."""
    counts: List[int] = [0] * callers
    errors: List[str] = []
    start = threading.Barrier(callers + 1)
    stop = threading.Event()

    def caller(n: int) -> None:
        zvol, host = f"cycle-{tag}-{n}", CONTAINERS[n % len(CONTAINERS)]
        with RpcClient(bench.config) as rpc:
            nas = NasClient(rpc, NAS, timeout=120)
            nas.ping()
            start.wait()
            while not stop.is_set() or counts[n] < least:
                try:
                    nas.map_zvol(zvol, zpool=POOL, remotehost=host, size=1, remotepool=None,
                                 sync=False)
                    nas.unmap_zvol(zvol)
                except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure
                    errors.append(f"{zvol}: {exc}")
                    return
                counts[n] += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    for why in errors[:5]:
        print(f"    failed: {why}")
    return {"rate": sum(counts) / wall, "cycles": sum(counts)}


def wall_times(argv: List[str], runs: int, env: Optional[Dict[str, str]] = None) -> float:
    """The median wall time of running ``argv`` to its end."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=120)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_cycles(seconds: float, latency: Optional[Dict[str, float]], label: str) -> None:
    settings = {node: {"sim_latency": latency} for node in (NAS,) + CONTAINERS} \
        if latency else None
    with common.scratch("control") as work, \
            common.cluster("control", work, containers=CONTAINERS,
                           node_settings=settings) as bench:
        print(f"map+unmap cycles, {label}:")
        one = cycles(bench, 1, seconds, "one")
        eight = cycles(bench, 8, seconds, "eight")
        print(f"  1 caller  {one['rate']:7.2f} cycles/s ({one['cycles']:.0f} in {seconds:g} s)")
        print(f"  8 callers {eight['rate']:7.2f} cycles/s ({eight['cycles']:.0f} in {seconds:g} s)"
              f"  = {common.ratio(eight['rate'], one['rate']):.1f} x one caller")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--runs", type=int, default=7, help="CLI runs per wall time")
    parser.add_argument("--model", action="store_true",
                        help="the cycles with the latency model as well")
    args = parser.parse_args()
    common.header("control plane")
    with common.scratch("control") as work, \
            common.cluster("control", work, containers=CONTAINERS) as bench:
        have = 0
        for count in (20, 50):
            _reply, rps = common.listing_rate(bench, "listed", have, count, args.seconds)
            have = count
            print(f"list_zvols, {count} zvols: {rps:7.1f} round trips/s from one caller")
        rocks = [sys.executable, "-c", "from imgstorage.frontend.cli import main; main()",
                 "list", "host", "storagemap", NAS]
        cli = wall_times(rocks, args.runs, env=bench.c.env())
        bare = wall_times([sys.executable, "-c", "pass"], args.runs)
        print(f"rocks list host storagemap {NAS} ({have} zvols): {cli * 1000:6.0f} ms wall; "
              f"python -c pass: {bare * 1000:4.0f} ms (medians of {args.runs})")
    run_cycles(args.seconds, None, "no latency model")
    if args.model:
        run_cycles(args.seconds, MODEL, f"sim_latency {MODEL}")


if __name__ == "__main__":
    main()
