#!/usr/bin/env python3
"""How long a sync-mode map takes to answer, for a small and a large zvol.

In sync mode the VM boots at once on a dm snapshot over the iSCSI disk and
the copy to the container runs in the background, so the answer to

    rocks add host storagemap nas-0-0 tank VOL compute-0-3 SIZE img_sync=true remotepool=tank

should not depend on the zvol's size.  This script maps fresh zvols of
1 GiB and 64 GiB several times, each way:

* through the CLI (a new ``rocks`` process: interpreter start-up, registry,
  broker connection, the NAS's work, the container's work), and
* as one RPC with imgstorage.messaging.RpcClient on a connection opened
  beforehand (the same message, no process start-up).

After every map it waits until the background copy and the merge are done
(the zvol runs from the container's local copy), so the next measurement
never shares the machine with a copy; then it unmaps (the final pull
brings the copy home), and destroys the zvol.  The volumes are empty sparse
zvols, whose copy carries only a stream header; the time it took is printed
too, apart from the map figures.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Dict, List

import common
from common import CONTAINER, NAS, POOL

SIZES_GB = (1, 64)


def map_cli(bench: common.BenchCluster, zvol: str, size: int) -> float:
    started = time.perf_counter()
    out = bench.rocks("add", "host", "storagemap", NAS, POOL, zvol, CONTAINER, str(size),
                      "img_sync=true", f"remotepool={POOL}")
    elapsed = time.perf_counter() - started
    if "/dev/" not in out:
        raise common.ImgStorageError(f"the map of {zvol} printed no block device: {out!r}")
    return elapsed


def map_rpc(bench: common.BenchCluster, zvol: str, size: int) -> float:
    started = time.perf_counter()
    reply = bench.map_sync(zvol, size)
    elapsed = time.perf_counter() - started
    if not str(reply.get("bdev", "")).startswith("/dev/"):
        raise common.ImgStorageError(f"the map of {zvol} answered no block device: {reply!r}")
    return elapsed


def settle(bench: common.BenchCluster, zvol: str) -> float:
    """Wait for the background copy and merge; return the seconds from now until ``local``."""
    started = time.perf_counter()
    bench.wait_lifecycle(zvol, ["local"], interval=0.1)
    return time.perf_counter() - started


def cli_baseline(bench: common.BenchCluster, reps: int) -> List[float]:
    """A command that only reads the frontend's registry: the CLI's own start-up cost."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        bench.rocks("list", "host")
        times.append(time.perf_counter() - started)
    return times


def rpc_ping(bench: common.BenchCluster, reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        bench.request(NAS, {"action": "ping"})
        times.append(time.perf_counter() - started)
    return times


def copy_figures(bench: common.BenchCluster, zvol: str) -> str:
    """The NAS's own account of the background copy of ``zvol`` (from its log)."""
    for text in reversed(bench.log_lines(NAS)):
        if f"NAS->VM copy of {zvol} done:" in text:
            return text.split("done:", 1)[1].split(";", 1)[0].strip()
    return "not found in the NAS log"


def run(reps: int) -> int:
    maps: Dict[str, Dict[int, List[float]]] = {"cli": {}, "rpc": {}}
    settled: Dict[int, List[float]] = {}
    copies: Dict[int, List[str]] = {}
    with common.scratch("map-latency") as workdir, common.cluster("map", workdir) as bench:
        python_start = cli_baseline(bench, reps)
        ping = rpc_ping(bench, max(reps, 10))
        for rep in range(reps):
            # Interleaved, so a slow moment of the machine hits both sizes alike.
            for size in SIZES_GB:
                for how, fn in (("cli", map_cli), ("rpc", map_rpc)):
                    zvol = f"bench-{how}-{size}g-{rep}-{int(time.time() * 1000) % 100000}"
                    try:
                        maps[how].setdefault(size, []).append(fn(bench, zvol, size))
                        settled.setdefault(size, []).append(settle(bench, zvol))
                        copies.setdefault(size, []).append(copy_figures(bench, zvol))
                    finally:
                        bench.unmap_and_delete(zvol)
        leftovers = [r["zvol"] for r in bench.request(NAS, {"action": "list_zvols"})["body"]]
        local = bench.c.sim("zfs", "list", "--host", CONTAINER)

    common.header("sync-mode map latency (map_zvol with img_sync=true)")
    print(f"NAS {NAS}, container {CONTAINER}, pool {POOL}; {reps} maps per size and way, "
          "each on a fresh zvol")
    print()
    print(common.line("rocks list host (CLI start-up)", python_start))
    print(common.line("RPC ping to the NAS", ping))
    print()
    for how, label in (("cli", "rocks add host storagemap"), ("rpc", "RpcClient map_zvol")):
        for size in SIZES_GB:
            print(common.line(f"{label}, {size} GiB", maps[how][size]))
        med = {size: common.summary(maps[how][size])["median"] for size in SIZES_GB}
        print(f"{'':<34} ratio of medians 64 GiB / 1 GiB: "
              f"{common.ratio(med[64], med[1]):.2f}")
        print()
    for size in SIZES_GB:
        print(common.line(f"answer -> runs locally, {size} GiB", settled[size]))
    for size in SIZES_GB:
        print(f"background copy of an empty {size} GiB zvol (NAS log): {copies[size][0]}")
    print()
    print(f"left on the NAS afterwards: {leftovers or 'nothing'}")
    rest = [ln.split()[0] for ln in local.stdout.decode(errors="replace").splitlines()[1:]
            if ln.strip() and "/" in ln.split()[0]]
    print(f"left on {CONTAINER} afterwards: {rest or 'nothing'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5,
                        help="maps per size and way (default 5)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    try:
        return run(args.reps)
    except (common.ImgStorageError, subprocess.SubprocessError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
