#!/usr/bin/env python3
"""How fast a NAS lists its zvols, with 50 and with 1000 of them.

A NAS daemon is started on the simulated kernel and given 50, then 1000
unmapped zvols, made with the NAS's own calls as its map makes them before
it maps (the zvol, then its row; sparse, so the simulated pool does not
rescan every zvol at each creation).  For each size it prints:

* round trips per second of one ``list_zvols`` RPC on an open connection
  (the whole listing in one reply), and the reply's size in bytes;
* the same listing walked in pages of 200 (``limit``/``after``);
* the wall time of ``rocks list host storagemap`` (a new process: start-up,
  registry, broker connection, the listing, the table).
"""
from __future__ import annotations

import argparse
import time

import common
from common import NAS

from imgstorage import protocol


def walk(bench: common.BenchCluster, limit: int) -> int:
    after, total = None, 0
    while True:
        message = {"action": "list_zvols", "limit": limit}
        if after:
            message["after"] = after
        reply = bench.request(NAS, message)
        total += len(reply["body"])
        if not reply["more"]:
            return total
        after = reply["next"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    args = parser.parse_args()
    common.header("list_zvols: round trips per second")
    with common.scratch("bench-list") as work, common.cluster("list", work) as bench:
        have = 0
        for count in (50, 1000):
            reply, rps = common.listing_rate(bench, "bench-list", have, count, args.seconds)
            have = count
            size = len(protocol.encode(reply))
            paged = common.per_second(lambda: walk(bench, 200), args.seconds)
            started = time.perf_counter()
            lines = bench.rocks("list", "host", "storagemap", NAS).splitlines()
            cli = time.perf_counter() - started
            assert len(lines) == count + 1
            print(f"{count:5d} zvols: {rps:7.1f} round trips/s (one reply of {size} bytes, "
                  f"{size / count:.0f} B/zvol); {paged:6.1f} listings/s in pages of 200; "
                  f"rocks list host storagemap {cli * 1000:.0f} ms")


if __name__ == "__main__":
    main()
