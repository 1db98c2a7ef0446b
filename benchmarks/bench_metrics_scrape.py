#!/usr/bin/env python3
"""How long a scrape of a NAS's metrics endpoint takes, with 50 zvols.

One NAS (``metrics_port`` set) and two VM containers on the simulated kernel.
Its zvols' figures are read at each scrape from the NAS's listing, so the
scrape's cost grows with the zvols.  Printed, for ``--zvols`` zvols all
unmapped, then with ``--mapped`` of them mapped in sync mode and running from
their containers' copies (each with a recovery point, a frequency, a next
sync): the wall time of one HTTP scrape from one caller (median, min, max of
``--scrapes``), the size of what it returns, and its number of series; and,
for comparison, one ``list_zvols`` round trip on an open broker connection.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import time
import urllib.request
from typing import List

import common
from common import NAS, POOL

CONTAINERS = ("vm-container-0-1", "vm-container-0-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        return answer.read()


def measure(bench: common.BenchCluster, port: int, scrapes: int, label: str) -> None:
    scrape(port)                              # the first connection and query warm up
    times: List[float] = []
    for _ in range(scrapes):
        began = time.perf_counter()
        body = scrape(port)
        times.append(time.perf_counter() - began)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    listing = []
    for _ in range(scrapes):
        began = time.perf_counter()
        bench.request(NAS, {"action": "list_zvols"})
        listing.append(time.perf_counter() - began)
    print(common.line(f"scrape, {label}", times))
    print(f"{'':<34} {len(body)} bytes, {series} series")
    print(common.line("list_zvols round trip, the same", listing))
    per = common.ratio(statistics.median(times), statistics.median(listing))
    print(f"{'':<34} scrape / listing: {per:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zvols", type=int, default=50)
    parser.add_argument("--mapped", type=int, default=10, help="of them mapped in sync mode")
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    common.header("metrics scrape")
    port = free_port()
    with common.scratch("metrics") as work, \
            common.cluster("metrics", work, containers=CONTAINERS,
                           node_settings={NAS: {"metrics_port": port}}) as bench:
        common.add_unmapped_zvols(bench, "listed", 0, args.zvols - args.mapped)
        measure(bench, port, args.scrapes, f"{args.zvols - args.mapped} zvols")
        mapped = [f"synced-{n:03d}" for n in range(args.mapped)]
        for n, zvol in enumerate(mapped):
            bench.request(NAS, {"action": "map_zvol", "zvol": zvol, "zpool": POOL,
                                "remotehost": CONTAINERS[n % len(CONTAINERS)], "size": 1,
                                "remotepool": POOL, "sync": True})
        for zvol in mapped:
            bench.wait_lifecycle(zvol, ("local",))
        measure(bench, port, args.scrapes,
                f"{args.zvols} zvols, {args.mapped} local")


if __name__ == "__main__":
    main()
