#!/usr/bin/env python3
"""A boot storm: many sync-mode maps fired at one NAS at once, then as many unmaps.

One NAS and five VM containers on the simulated kernel, with and without a
latency model (``sim_latency``, the real kernel's waits).  First a map and
an unmap alone, three times (their medians are the single latencies), then
``--vms`` sync-mode maps at once, spread evenly over the containers, each
from a thread with its own broker connection, as fifty ``rocks start host
vm`` would arrive; then the time until every zvol runs from its container's
local copy; then as many unmaps at once.  Printed per storm: p50, p99 and maximum answer times, the wall
time, and the concurrency factor (VMs x single latency / wall time, where the
single latency is that of one map, or one unmap, alone: 1 means they ran one
after another, the number of VMs that they all overlapped).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Callable, Dict, List, Sequence

import common
from common import NAS, POOL

from imgstorage.messaging import RpcClient
from imgstorage.nas.client import NasClient

CONTAINERS = tuple(f"vm-container-0-{n}" for n in range(1, 6))
SINGLES = 3             # maps and unmaps alone, one after another: their median is the base
MODEL = {"zfs": 0.2, "target": 0.2, "iscsi": 0.5, "dm": 0.05}


def storm(bench: common.BenchCluster, zvols: Sequence[str],
          one: Callable[[NasClient, str], None]) -> Dict[str, object]:
    """Run ``one`` for every zvol at once (each on its own connection); time each and all."""
    times: Dict[str, float] = {}
    errors: Dict[str, str] = {}
    start = threading.Barrier(len(zvols) + 1)

    def worker(zvol: str) -> None:
        with RpcClient(bench.config) as rpc:
            client = NasClient(rpc, NAS, timeout=600)
            client.ping()                      # the connection is open before the start
            start.wait()
            began = time.perf_counter()
            try:
                one(client, zvol)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure
                errors[zvol] = str(exc)
            times[zvol] = time.perf_counter() - began

    threads = [threading.Thread(target=worker, args=(z,)) for z in zvols]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return {"times": times, "errors": errors, "wall": time.perf_counter() - began}


def report(label: str, result: Dict[str, object], single: float) -> None:
    times: List[float] = sorted(result["times"].values())        # type: ignore[union-attr]
    wall: float = result["wall"]                                  # type: ignore[assignment]
    errors: Dict[str, str] = result["errors"]                     # type: ignore[assignment]
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    median = statistics.median(times)
    print(f"{label:<14} n={len(times)}  p50 {common.ms(median)}  p99 {common.ms(p99)}  "
          f"max {common.ms(times[-1])}  wall {wall:7.2f} s  concurrency factor "
          f"{len(times) * single / wall:5.1f}  slowest/median {times[-1] / median:4.1f}"
          f"  failed {len(errors)}")
    for zvol, why in sorted(errors.items())[:5]:
        print(f"    {zvol}: {why}")


def run(vms: int, latency: Dict[str, float], label: str) -> None:
    settings = {node: {"sim_latency": latency} for node in (NAS,) + CONTAINERS} \
        if latency else None
    with common.scratch("storm") as workdir, \
            common.cluster("storm", workdir, containers=CONTAINERS,
                           node_settings=settings) as bench:
        common.header(f"boot storm, {label}: {vms} VMs on {len(CONTAINERS)} containers")

        def map_one(client: NasClient, zvol: str) -> None:
            host = CONTAINERS[int(zvol.rsplit("-", 1)[1]) % len(CONTAINERS)]
            client.map_zvol(zvol, zpool=POOL, remotehost=host, size=1, remotepool=POOL,
                            sync=True)

        def unmap_one(client: NasClient, zvol: str) -> None:
            client.unmap_zvol(zvol)

        maps, unmaps = [], []
        for n in range(SINGLES):
            zvol = f"alone-{n}"
            maps.append(storm(bench, [zvol], map_one)["wall"])
            bench.wait_lifecycle(zvol, ["local"])
            unmaps.append(storm(bench, [zvol], unmap_one)["wall"])
            bench.wait_lifecycle(zvol, ["unmapped"])          # its copy came home
            bench.unmap_and_delete(zvol)
        single: float = statistics.median(maps)                  # type: ignore[arg-type]
        single_unmap: float = statistics.median(unmaps)          # type: ignore[arg-type]
        print(f"{'single map':<14} {common.ms(single)}  (median of {SINGLES})")
        print(f"{'single unmap':<14} {common.ms(single_unmap)}  (median of {SINGLES})")

        zvols = [f"storm-{n}" for n in range(vms)]
        mapped = storm(bench, zvols, map_one)
        report("map storm", mapped, single)
        began = time.perf_counter()
        for zvol in zvols:
            if zvol not in mapped["errors"]:                      # type: ignore[operator]
                bench.wait_lifecycle(zvol, ["local"], timeout=900, interval=0.5)
        print(f"{'all local':<14} {time.perf_counter() - began:7.2f} s after the storm")
        unmapped = storm(bench, zvols, unmap_one)
        report("unmap storm", unmapped, single_unmap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--no-model", action="store_true", help="only without sim_latency")
    args = parser.parse_args()
    run(args.vms, {}, "no latency model")
    if not args.no_model:
        print()
        run(args.vms, MODEL, f"sim_latency {MODEL}")


if __name__ == "__main__":
    main()
