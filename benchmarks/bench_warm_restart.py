#!/usr/bin/env python3
"""A warm restart (img_keep_local) against a cold start: map answered to VM running locally.

Daemons on the simulated kernel, one NAS and one container, for each round:

1. a fresh 512 MiB zvol on the NAS, filled with pseudo-random data;
2. cold start: a sync-mode map with ``keep_local``; timed from the map's
   answer to the container's switch to its local copy (its log line "merged
   ...; running from the local copy"), which is the whole NAS->VM copy;
3. stop: the unmap, the final pull home, and the container keeps its copy;
4. 1% of the zvol's 128 KiB blocks change on the NAS (the VM ran elsewhere,
   or on the NAS itself, between the two runs);
5. warm start on the same container: timed the same way; the NAS sends only
   what changed since the snapshot both sides kept;
6. stop, and the zvol is removed (its kept copy with it).

Printed: both times (median, min, max), the bytes each copy sent, their
ratios, and whether the container's copy ended equal to the NAS's zvol.
"""
from __future__ import annotations

import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import common
from common import CONTAINER, MiB, NAS, POOL
from imgstorage.drivers.sim.snapshots import VOLBLOCKSIZE
from imgstorage.nas.client import NasClient
from imgstorage.vm.client import VmClient

SEED = 5150


def _lines(bench: common.BenchCluster, node: str, pattern: str) -> List[str]:
    return [line for line in bench.log_lines(node) if re.search(pattern, line)]


def start(bench: common.BenchCluster, zvol: str) -> Dict:
    """Map with keep_local; seconds from the answer to the container's switch, bytes sent."""
    merged = rf"zvol {re.escape(zvol)} merged in .*running from the local copy"
    before = len(_lines(bench, CONTAINER, merged))
    NasClient(bench.rpc, NAS).map_zvol(zvol, zpool=POOL, remotehost=CONTAINER, size=1,
                                       remotepool=POOL, sync=True, keep_local=True,
                                       timeout=120)
    answered = time.time()
    line = common.wait_until(f"{zvol} running locally", lambda: (
        lambda found: found[before] if len(found) > before else None)(
        _lines(bench, CONTAINER, merged)))
    bench.wait_lifecycle(zvol, ["local"])
    local_at = common.log_time(line)
    if local_at is None:
        raise common.ImgStorageError(f"no time in the log line {line!r}")
    done = _lines(bench, NAS, rf"NAS->VM copy of {re.escape(zvol)} done: \d+ bytes")[-1]
    started = _lines(bench, NAS, rf"NAS->VM copy of {re.escape(zvol)} to \S+ started")[-1]
    return {"seconds": local_at - answered,
            "bytes": int(re.search(r"done: (\d+) bytes", done).group(1)),
            "incremental": "incremental from" in started}


def stop(bench: common.BenchCluster, zvol: str) -> None:
    """Unmap; the final pull comes home and the container keeps its copy."""
    NasClient(bench.rpc, NAS).unmap_zvol(zvol, timeout=120)
    bench.wait_lifecycle(zvol, ["unmapped"])
    common.wait_until(f"{zvol} kept on {CONTAINER}", lambda: (VmClient(bench.rpc, CONTAINER).list_dev(
        timeout=30).get(zvol) or {}).get("status") == "kept")


def change_blocks(root: Path, zvol: str, size: int, percent: float, rng: random.Random) -> int:
    nblocks = size // VOLBLOCKSIZE
    count = max(1, round(nblocks * percent / 100.0))
    vol = common.Volume.of(root, NAS, POOL, zvol)
    for block in sorted(rng.sample(range(nblocks), count)):
        vol.write(block * VOLBLOCKSIZE, rng.randbytes(VOLBLOCKSIZE))
    return count


def one_round(bench: common.BenchCluster, size: int, percent: float, rnd: int) -> Dict:
    zvol = f"warm-{rnd}"
    root = bench.sim_root
    nas_zfs = common.sim_host(root, NAS)
    nas_zfs.create_zvol(POOL, zvol, size)
    common.fill_volume(root, NAS, POOL, zvol, size, SEED + rnd)
    common.flush_disks()
    cold = start(bench, zvol)
    stop(bench, zvol)
    changed = change_blocks(root, zvol, size, percent, random.Random(SEED + rnd))
    common.flush_disks()
    warm = start(bench, zvol)
    same = (common.file_digest(common.Volume.of(root, NAS, POOL, zvol).data)
            == common.file_digest(common.Volume.of(root, CONTAINER, POOL, zvol).data))
    stop(bench, zvol)
    NasClient(bench.rpc, NAS).del_zvol(zvol, zpool=POOL, timeout=120)
    return {"cold": cold, "warm": warm, "changed": changed, "same": same}


def run(size_mib: int, percent: float, rounds: int) -> int:
    size = common.round_to_block(size_mib * MiB)
    results: List[Dict] = []
    started = time.perf_counter()
    with common.scratch("warm") as workdir, common.cluster("warm", workdir) as bench:
        for rnd in range(rounds):
            results.append(one_round(bench, size, percent, rnd))
    total = time.perf_counter() - started

    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in results)

    cold_t = [r["cold"]["seconds"] for r in results]
    warm_t = [r["warm"]["seconds"] for r in results]
    common.header("warm restart (img_keep_local) vs cold start")
    print(f"{size / MiB:.0f} MiB zvol of pseudo-random data; {percent:g}% of its "
          f"{size // VOLBLOCKSIZE} blocks changed on the NAS between the runs "
          f"({results[0]['changed']} blocks); {rounds} rounds; one NAS and one container "
          "daemon on the simulated kernel, TCP streams on 127.0.0.1")
    print("timed: from the map's answer to the container's switch to its local copy")
    print()
    print(common.line("cold start (full copy)", cold_t))
    print(common.line("warm restart (incremental)", warm_t))
    print()
    print(f"stream bytes: cold {int(med('cold', 'bytes'))}, warm {int(med('warm', 'bytes'))}")
    print(f"ratio warm / cold: time {common.ratio(med('warm', 'seconds'), med('cold', 'seconds')):.3f}"
          f", bytes {common.ratio(med('warm', 'bytes'), med('cold', 'bytes')):.4f} "
          f"(changed share {percent / 100:.4f})")
    print(f"every warm start was incremental: "
          f"{'yes' if all(r['warm']['incremental'] for r in results) else 'NO'}; "
          f"the container's copy equals the NAS's zvol after it: "
          f"{'yes' if all(r['same'] for r in results) else 'NO'}")
    print(f"(whole benchmark, including filling the volumes and the stops: {total:.1f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return common.sized_main(__doc__, "changed on the NAS", run, argv)


if __name__ == "__main__":
    sys.exit(main())
