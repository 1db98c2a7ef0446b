#!/usr/bin/env python3
"""Full-copy throughput of the sync mechanism against a plain ``cat`` on the same disk.

One scratch folder holds everything, so every figure is on the same file
system and page cache.  Measured, each several times:

(a) ``cat SRC`` with standard output to a file: N MiB of pseudo-random data
    copied by the operating system's own tool, the floor to compare with;
(b) the stream path of the NAS, in one process: snapshot of a filled sim
    zvol, ``send`` -> transfer.pump -> SocketSink over TCP on 127.0.0.1 ->
    StreamServer -> pump -> ``receive`` on a second simulated host, until the
    sender heard that the receiver committed; with, to show where the time
    goes, the send alone into a sink that keeps nothing, the receive alone of
    the same stream held in memory, and send -> receive without the socket;
(c) unless --no-cluster is given, the NAS->VM phase of a real sync map: NAS and
    container daemons in their own processes; the copy's start and end come
    from the NAS's log lines (the state changes uploading -> merging).

Throughput is the volume's data (N MiB) over the elapsed time, in MB/s
(10^6 bytes per second); the stream carries a little more (record headers).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import common
from common import MiB, NAS, POOL
from imgstorage.drivers.base import ByteSource  # noqa: E402 (common sets the path)
from imgstorage.transfer import CHUNK  # noqa: E402

SEED = 20240501


def bench_cat(workdir: Path, size: int, reps: int) -> Tuple[List[float], bool]:
    src, dst = workdir / "cat-src.bin", workdir / "cat-dst.bin"
    common.write_file(src, size, SEED)
    times = []
    for _ in range(reps):
        dst.unlink(missing_ok=True)
        common.flush_disks()
        with open(dst, "wb") as out:
            started = time.perf_counter()
            subprocess.run(["cat", str(src)], stdout=out, check=True)
            times.append(time.perf_counter() - started)
    same = common.file_digest(src) == common.file_digest(dst)
    src.unlink()
    dst.unlink()
    return times, same


class MemorySource:
    """A stream read beforehand, served again from memory: the receive is all that is timed."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = iter(pieces)

    def read(self, n: int = -1) -> bytes:
        return next(self._pieces, b"")

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def read_stream(source: ByteSource) -> List[bytes]:
    pieces = []
    while True:
        piece = source.read(CHUNK)
        if not piece:
            source.close()
            return pieces
        pieces.append(piece)


def bench_stream(workdir: Path, size: int, reps: int) -> Dict[str, object]:
    root = workdir / "sim"
    nas = common.sim_host(root, NAS)
    container = common.sim_host(root, "compute-0-3")
    nas.create_zvol(POOL, "vol", size)
    common.fill_volume(root, NAS, POOL, "vol", size, SEED)
    nas.snapshot(POOL, "vol", "s1")
    stream_size = nas.send_size(POOL, "vol", "s1")

    pieces = read_stream(nas.send(POOL, "vol", "s1"))
    send_only, receive_only, direct, tcp = [], [], [], []
    for _ in range(reps):
        common.flush_disks()
        sink = common.NullSink()
        started = time.perf_counter()
        common.pump(nas.send(POOL, "vol", "s1"), sink)
        send_only.append(time.perf_counter() - started)

        common.flush_disks()
        started = time.perf_counter()
        common.pump(MemorySource(pieces), container.receive(POOL, "vol"))
        receive_only.append(time.perf_counter() - started)
        container.destroy(POOL, "vol")

        common.flush_disks()
        started = time.perf_counter()
        common.pump(nas.send(POOL, "vol", "s1"), container.receive(POOL, "vol"))
        direct.append(time.perf_counter() - started)
        container.destroy(POOL, "vol")

        common.flush_disks()
        elapsed, sent = common.tcp_transfer(nas, POOL, "vol", "s1", None,
                                            container, POOL, "vol")
        tcp.append(elapsed)
        if sent != stream_size:
            print(f"note: the stream was {sent} bytes, send_size said {stream_size}")
        same = volumes_equal(root, size)
        container.destroy(POOL, "vol")
    return {"stream_size": stream_size, "send_only": send_only, "receive_only": receive_only,
            "direct": direct, "tcp": tcp, "same": same}


def volumes_equal(root: Path, size: int) -> bool:
    paths = [common.Volume.of(root, host, POOL, "vol").data for host in (NAS, "compute-0-3")]
    return common.file_digest(paths[0]) == common.file_digest(paths[1])


def bench_cluster(workdir: Path, size: int, reps: int) -> Dict[str, List[float]]:
    """The NAS->VM copy of real sync maps, timed from the NAS daemon's own log lines."""
    out: Dict[str, List[float]] = {"copy": [], "to_local": []}
    with common.cluster("copy", workdir / "cluster") as bench:
        root = bench.sim_root
        nas = common.simzfs.SimZfs(root, NAS)
        for rep in range(reps):
            zvol = f"bench-copy-{rep}"
            nas.create_zvol(POOL, zvol, size)
            common.fill_volume(root, NAS, POOL, zvol, size, SEED + rep)
            common.flush_disks()
            try:
                answered = time.time()
                bench.map_sync(zvol, 1)              # an existing zvol keeps its own size
                bench.wait_lifecycle(zvol, ["local"], interval=0.2)
                out["to_local"].append(time.time() - answered)
                out["copy"].append(copy_seconds(bench, zvol))
            finally:
                bench.unmap_and_delete(zvol)
    return out


def copy_seconds(bench: common.BenchCluster, zvol: str) -> float:
    start = end = None
    for text in bench.log_lines(NAS):
        if f"NAS->VM copy of {zvol} to " in text and "started" in text:
            start = common.log_time(text)
        elif f"NAS->VM copy of {zvol} done:" in text:
            end = common.log_time(text)
    if start is None or end is None:
        raise common.ImgStorageError(f"the NAS log has no start and end of the copy of {zvol}")
    return end - start


def best(values: List[float]) -> float:
    return min(values)


def run(size_mib: int, reps: int, with_cluster: bool) -> int:
    size = common.round_to_block(size_mib * MiB)
    cluster_times: Optional[Dict[str, List[float]]] = None
    with common.scratch("copy") as workdir:
        cat_times, cat_same = bench_cat(workdir, size, reps)
        stream = bench_stream(workdir, size, reps)
        if with_cluster:
            cluster_times = bench_cluster(workdir, size, max(1, min(reps, 3)))

    common.header("full copy throughput: sync stream vs cat")
    print(f"{size / MiB:.0f} MiB of pseudo-random data; {reps} runs each; MB/s = 10^6 B/s of "
          "volume data, from the median time (best run in brackets)")
    print(f"stream size {stream['stream_size']} bytes "
          f"({stream['stream_size'] / size:.4f} x the data)")
    print()
    rows = [("(a) cat src > dst", cat_times),
            ("(b) send only (into nothing)", stream["send_only"]),
            ("(b) receive only (from memory)", stream["receive_only"]),
            ("(b) send -> receive, no socket", stream["direct"]),
            ("(b) send -> TCP -> receive", stream["tcp"])]
    if cluster_times:
        rows.append(("(c) NAS->VM copy in a cluster", cluster_times["copy"]))
    medians = {}
    for label, times in rows:
        med = statistics.median(times)
        medians[label] = med
        print(f"{common.line(label, times)}   {common.mb_per_s(size, med):7.1f} MB/s "
              f"[{common.mb_per_s(size, best(times)):7.1f}]")
    if cluster_times:
        print(common.line("(c) map answered -> runs locally", cluster_times["to_local"]))
    print()
    cat_med = medians["(a) cat src > dst"]
    for label, _ in rows[1:]:
        print(f"time ratio {label[4:]:<32} / cat: {common.ratio(medians[label], cat_med):6.2f}"
              f"   (throughput {common.ratio(cat_med, medians[label]):.3f} x cat's)")
    print()
    print(f"cat copy identical: {'yes' if cat_same else 'NO'}; "
          f"received zvol identical to the sent one: {'yes' if stream['same'] else 'NO'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="data to copy (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--no-cluster", dest="cluster", action="store_false",
                        help="skip (c), the NAS->VM phase of real sync maps (daemons, broker)")
    args = parser.parse_args()
    if args.size_mib < 1 or args.reps < 1:
        parser.error("--size-mib and --reps must be at least 1")
    try:
        return run(args.size_mib, args.reps, args.cluster)
    except (common.ImgStorageError, subprocess.SubprocessError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
