"""What the benchmark scripts share: figures, scratch folders, simulated hosts, clusters.

Everything here cleans up after itself: scratch folders are removed, a
cluster's daemons are stopped and its broker virtual host is deleted, even
when a benchmark is interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from imgstorage.config import Config, from_dict  # noqa: E402
from imgstorage.drivers.sim import zfs as simzfs  # noqa: E402
from imgstorage.drivers.sim.snapshots import VOLBLOCKSIZE, Volume  # noqa: E402
from imgstorage.errors import ImgStorageError  # noqa: E402
from imgstorage.messaging import RpcClient  # noqa: E402
from imgstorage.simcluster import SimCluster, broker_url, broker_vhost  # noqa: E402
from imgstorage.transfer import SocketSink, StreamServer, pump  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
MB = 1000 * 1000
POOL = "tank"
NAS = "nas-0-0"
CONTAINER = "compute-0-3"
FILL_CHUNK = 8 * MiB


# ------------------------------------------------------------------ figures
def summary(values: Sequence[float]) -> Dict[str, float]:
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def line(label: str, values: Sequence[float]) -> str:
    s = summary(values)
    return (f"{label:<34} median {ms(s['median'])}   min {ms(s['min'])}   "
            f"max {ms(s['max'])}   (n={s['n']})")


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else float("inf")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def header(title: str) -> None:
    print(title)
    print("=" * len(title))


def flush_disks() -> None:
    """Write back dirty pages, so one measurement does not pay for the previous one's writes."""
    os.sync()


# ----------------------------------------------------------- scratch space
@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh folder (under $IMGSTORAGE_BENCH_TMP, else the system's temp folder), removed after."""
    base = os.environ.get("IMGSTORAGE_BENCH_TMP") or None
    path = Path(tempfile.mkdtemp(prefix=f"imgstorage-bench-{prefix}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def write_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            step = min(FILL_CHUNK, left)
            fh.write(random_bytes(rng, step))
            left -= step


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            piece = fh.read(FILL_CHUNK)
            if not piece:
                return h.hexdigest()
            h.update(piece)


# ---------------------------------------------------------- simulated ZFS
def wait_until(what: str, probe: Callable[[], object], timeout: float = 300.0,
               interval: float = 0.02):
    """Poll ``probe`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise ImgStorageError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)


def sized_main(doc: str, percent_help: str, run: Callable[[int, float, int], int],
               argv: Optional[Sequence[str]] = None) -> int:
    """The command line of a benchmark over a volume of --size-mib with --percent changed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512, help="zvol size (default 512)")
    parser.add_argument("--percent", type=float, default=1.0,
                        help=f"share of the blocks {percent_help} (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.rounds < 1 or not 0 < args.percent <= 100:
        parser.error("--size-mib and --rounds must be at least 1, --percent in (0, 100]")
    try:
        return run(args.size_mib, args.percent, args.rounds)
    except (ImgStorageError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1


def round_to_block(size: int) -> int:
    return max(VOLBLOCKSIZE, size // VOLBLOCKSIZE * VOLBLOCKSIZE)


def sim_host(root: Path, host: str, pool: str = POOL) -> simzfs.SimZfs:
    """A simulated host with a pool, as ``imgstorage-sim zpool create`` makes it."""
    if not simzfs.SimZfs(root, host).pool_exists(pool):
        simzfs.create_pool(root, host, pool)
    return simzfs.SimZfs(root, host)


def fill_volume(root: Path, host: str, pool: str, zvol: str, size: int, seed: int) -> None:
    """Write ``size`` bytes of pseudo-random data from offset 0, through the zvol's write path."""
    vol = Volume.of(root, host, pool, zvol)
    rng = random.Random(seed)
    offset = 0
    while offset < size:
        step = min(FILL_CHUNK, size - offset)
        vol.write(offset, random_bytes(rng, step))
        offset += step


def tcp_transfer(src: simzfs.SimZfs, pool: str, zvol: str, snap: str, base: Optional[str],
                 dst: simzfs.SimZfs, dst_pool: str, dst_zvol: str) -> Tuple[float, int]:
    """One stream the way the daemons move it: send -> pump -> TCP -> pump -> receive.

    The receiving end runs a StreamServer on 127.0.0.1 on a thread (the
    container's end), the sending end connects with a SocketSink (the NAS's
    end).  The clock stops when the sender has heard that the receiver
    committed the stream.  Returns (seconds, bytes sent).
    """
    server = StreamServer.open("127.0.0.1", timeout=60.0)
    token = server.token
    outcome: Dict[str, object] = {}

    def serve() -> None:
        try:
            outcome["received"] = server.serve_into(dst.receive(dst_pool, dst_zvol))
        except BaseException as exc:       # reported by the caller, after the join
            outcome["error"] = exc

    receiver = threading.Thread(target=serve, name="bench-receiver", daemon=True)
    started = time.perf_counter()
    receiver.start()
    try:
        source = src.send(pool, zvol, snap, base)
        sink = SocketSink.connect("127.0.0.1", server.port, token)
        sent = pump(source, sink)
        elapsed = time.perf_counter() - started
    except BaseException:
        server.close()                     # a receiver still waiting for the sender gives up
        raise
    finally:
        receiver.join(120)
        server.close()
    if "error" in outcome:
        raise ImgStorageError(f"the receiving end failed: {outcome['error']}")
    return elapsed, sent


class NullSink:
    """A ByteSink that keeps nothing: what a producer costs on its own."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


# ------------------------------------------------------------ sim clusters
def _vhost_name(tag: str) -> str:
    return f"imgstorage-bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def per_second(fn: Callable[[], object], seconds: float) -> float:
    """How many times a second ``fn`` ran, one call after another, for ``seconds``."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        done += 1
    return done / (time.perf_counter() - started)


def add_unmapped_zvols(bench: "BenchCluster", prefix: str, start: int, stop: int) -> None:
    """Unmapped zvols ``<prefix>-<n>`` on the NAS, made with the NAS's own calls as its map
    makes them before it maps (a benchmark needs many, a map each would take minutes)."""
    from imgstorage.db import make_engine
    from imgstorage.drivers import node_drivers
    from imgstorage.nas.store import NasStore
    cfg = from_dict(json.loads(bench.c.config_path(NAS).read_text()))
    zfs, store = node_drivers(cfg).zfs, NasStore(make_engine(cfg.db))
    for i in range(start, stop):
        zfs.create_zvol(POOL, f"{prefix}-{i:05d}", GiB, sparse=True)
        store.add(f"{prefix}-{i:05d}", POOL, GiB)


def listing_rate(bench: "BenchCluster", prefix: str, have: int, count: int,
                 seconds: float) -> Tuple[Dict, float]:
    """Grow the NAS from ``have`` to ``count`` unmapped zvols; its whole listing then, and
    how many ``list_zvols`` round trips one caller makes a second."""
    add_unmapped_zvols(bench, prefix, have, count)
    reply = bench.request(NAS, {"action": "list_zvols"})
    assert len(reply["body"]) == count
    return reply, per_second(lambda: bench.request(NAS, {"action": "list_zvols"}), seconds)


class BenchCluster:
    """A started SimCluster with the NAS and the container registered, and an RPC client."""

    def __init__(self, cluster: SimCluster):
        self.c = cluster
        cfg_path = cluster.config_path("frontend")
        self.config: Config = from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
        self.rpc = RpcClient(self.config)

    @property
    def sim_root(self) -> Path:
        return self.c.sim_root

    def rocks(self, *args: str, timeout: float = 180.0) -> str:
        proc = self.c.rocks(*args, timeout=timeout)
        if proc.returncode != 0:
            raise ImgStorageError(f"rocks {' '.join(args)} failed ({proc.returncode}): "
                                  f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout.decode(errors="replace")

    def request(self, node: str, message: Dict, timeout: float = 120.0) -> Dict:
        return self.rpc.request(node, message, timeout)

    def zvol_row(self, zvol: str, nas: str = NAS) -> Optional[Dict]:
        for row in self.request(nas, {"action": "list_zvols"})["body"]:
            if row.get("zvol") == zvol:
                return row
        return None

    def wait_lifecycle(self, zvol: str, wanted: Sequence[str], timeout: float = 300.0,
                       interval: float = 0.05, nas: str = NAS) -> Optional[Dict]:
        """Poll the NAS until the zvol's state is one of ``wanted`` (None: the row is gone)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            row = self.zvol_row(zvol, nas)
            state = row.get("lifecycle") if row else None
            if state in wanted:
                return row
            if row and row.get("error") and state not in ("uploading", "final_pull"):
                raise ImgStorageError(f"{zvol} is {state}: {row['error']}")
            last = row
            time.sleep(interval)
        raise ImgStorageError(f"{zvol} did not reach {'/'.join(map(str, wanted))} within "
                              f"{timeout:g} s; last seen {last}")

    def map_sync(self, zvol: str, size_gb: int, timeout: float = 120.0,
                 nas: str = NAS, remotehost: str = CONTAINER) -> Dict:
        return self.request(nas, {"action": "map_zvol", "zpool": POOL, "zvol": zvol,
                                  "remotehost": remotehost, "remotepool": POOL,
                                  "size": size_gb, "sync": True}, timeout)

    def unmap_and_delete(self, zvol: str, nas: str = NAS) -> None:
        """Unmap (a synced zvol comes home first), wait until unmapped, destroy the zvol."""
        row = self.zvol_row(zvol, nas)
        if row is None:
            return
        if row.get("lifecycle") != "unmapped":
            self.request(nas, {"action": "unmap_zvol", "zvol": zvol})
            self.wait_lifecycle(zvol, ["unmapped"])
        self.request(nas, {"action": "del_zvol", "zpool": POOL, "zvol": zvol})

    def log_lines(self, node: str) -> List[str]:
        path = self.c.log_path(node)
        return path.read_text(errors="replace").splitlines() if path.exists() else []


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(text: str) -> Optional[float]:
    """Epoch seconds of a daemon log line (its asctime, millisecond resolution)."""
    m = _LOG_TIME.match(text)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@contextmanager
def cluster(tag: str, workdir: Path, containers: Sequence[str] = (CONTAINER,),
            node_env: Optional[Dict[str, Dict[str, str]]] = None,
            node_settings: Optional[Dict[str, dict]] = None) -> Iterator[BenchCluster]:
    """NAS ``nas-0-0`` and the given containers on the simulated kernel, in a vhost of their own."""
    vhost = _vhost_name(tag)
    with broker_vhost(vhost):
        sim = SimCluster(workdir, broker_url(vhost), nas=(NAS,), containers=containers,
                         pool=POOL, node_env=node_env, node_settings=node_settings,
                         debug=False)
        bench = None
        try:
            sim.make_pools()
            sim.start()
            bench = BenchCluster(sim)
            bench.rocks("add", "host", NAS, "appliance=nas")
            for name in containers:
                bench.rocks("add", "host", name, "appliance=vm-container")
            bench.rocks("set", "host", "attr", NAS, "img_zpools", f"value={POOL}")
            yield bench
        finally:
            if bench is not None:
                bench.rpc.close()
            sim.stop_all()
