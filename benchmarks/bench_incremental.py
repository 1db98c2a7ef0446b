#!/usr/bin/env python3
"""An incremental sync home after a small change, against the full copy.

The life of a synced zvol, on two simulated hosts in one process:

1. the NAS's zvol (512 MiB by default) is filled with pseudo-random data,
   snapshotted, and copied in full to the container (send -> TCP ->
   receive, as the NAS->VM copy does): timed, stream bytes counted;
2. the VM changes 1% of the volume's 128 KiB blocks, chosen at random, and
   the container takes a snapshot;
3. the NAS pulls the change home: an incremental stream from the common
   snapshot (send -> TCP -> receive on the NAS): timed, bytes counted.

Printed: both times and stream sizes, their ratios, the rates, and whether
the NAS ended up with exactly the container's bytes.  Several rounds, each
on fresh volumes.
"""
from __future__ import annotations

import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import common
from common import MiB, NAS, POOL
from imgstorage.drivers.sim.snapshots import VOLBLOCKSIZE

CONTAINER = "compute-0-3"
SEED = 4242


def change_blocks(root: Path, host: str, zvol: str, size: int, percent: float,
                  rng: random.Random) -> int:
    """Overwrite ``percent`` % of the volume's blocks (at least one) with new data, as a VM would."""
    nblocks = size // VOLBLOCKSIZE
    count = max(1, round(nblocks * percent / 100.0))
    vol = common.Volume.of(root, host, POOL, zvol)
    for block in sorted(rng.sample(range(nblocks), count)):
        vol.write(block * VOLBLOCKSIZE, rng.randbytes(VOLBLOCKSIZE))
    return count


def one_round(workdir: Path, size: int, percent: float, rnd: int) -> Dict[str, float]:
    root = workdir / f"round-{rnd}"
    nas = common.sim_host(root, NAS)
    container = common.sim_host(root, CONTAINER)
    zvol = "vm-disk"
    rng = random.Random(SEED + rnd)
    nas.create_zvol(POOL, zvol, size)
    common.fill_volume(root, NAS, POOL, zvol, size, SEED + rnd)
    nas.snapshot(POOL, zvol, "sync-1")

    common.flush_disks()
    full_time, full_bytes = common.tcp_transfer(nas, POOL, zvol, "sync-1", None,
                                                container, POOL, zvol)

    changed = change_blocks(root, CONTAINER, zvol, size, percent, rng)
    container.snapshot(POOL, zvol, "sync-2")
    estimate = container.send_size(POOL, zvol, "sync-2", "sync-1")

    common.flush_disks()
    incr_time, incr_bytes = common.tcp_transfer(container, POOL, zvol, "sync-2", "sync-1",
                                                nas, POOL, zvol)
    same = (common.file_digest(common.Volume.of(root, NAS, POOL, zvol).data)
            == common.file_digest(common.Volume.of(root, CONTAINER, POOL, zvol).data))
    shutil.rmtree(root, ignore_errors=True)
    return {"full_time": full_time, "full_bytes": full_bytes, "incr_time": incr_time,
            "incr_bytes": incr_bytes, "estimate": estimate, "changed": changed,
            "same": same}


def run(size_mib: int, percent: float, rounds: int) -> int:
    size = common.round_to_block(size_mib * MiB)
    results: List[Dict[str, float]] = []
    started = time.perf_counter()
    with common.scratch("incremental") as workdir:
        for rnd in range(rounds):
            results.append(one_round(workdir, size, percent, rnd))
    total = time.perf_counter() - started

    def med(key: str) -> float:
        return statistics.median(r[key] for r in results)

    full_t, incr_t = [r["full_time"] for r in results], [r["incr_time"] for r in results]
    common.header("incremental sync home vs full copy")
    print(f"{size / MiB:.0f} MiB zvol of pseudo-random data, {size // VOLBLOCKSIZE} blocks of "
          f"{VOLBLOCKSIZE // 1024} KiB; {percent:g}% changed = {int(med('changed'))} blocks; "
          f"{rounds} rounds, fresh volumes each; send -> TCP 127.0.0.1 -> receive")
    print()
    print(f"{common.line('full copy (NAS->VM)', full_t)}   "
          f"{common.mb_per_s(int(med('full_bytes')), med('full_time')):7.1f} MB/s of stream")
    print(f"{common.line('incremental pull (NAS<-VM)', incr_t)}   "
          f"{common.mb_per_s(int(med('incr_bytes')), med('incr_time')):7.1f} MB/s of stream")
    print()
    print(f"stream bytes: full {int(med('full_bytes'))}, incremental {int(med('incr_bytes'))} "
          f"(send_size estimate {int(med('estimate'))})")
    print(f"ratio incremental / full: time {common.ratio(med('incr_time'), med('full_time')):.4f}, "
          f"bytes {common.ratio(med('incr_bytes'), med('full_bytes')):.4f} "
          f"(changed share {percent / 100:.4f})")
    print(f"NAS holds exactly the container's bytes after the pull: "
          f"{'yes' if all(r['same'] for r in results) else 'NO'}")
    print(f"(whole benchmark, including filling the volumes: {total:.1f} s)")
    return 0


def main() -> int:
    return common.sized_main(__doc__, "the VM changes", run)


if __name__ == "__main__":
    sys.exit(main())
