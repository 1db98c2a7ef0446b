"""Helpers for the sync-mode integration tests: the operator's view of a sync map.

Everything goes through the same two tools an administrator has: ``rocks``
(the storage commands) and ``imgstorage-sim`` (raw bytes of a device as one
host sees it).  The daemons' SQLite databases are only read, to wait for the
exact phase a test wants to act in.
"""
from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from imgstorage.drivers.sim.target import read_targets

from .conftest import ok

NAS = "nas-0-0"
POOL = "tank"
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CHUNK = 8 * KIB                 # the dm snapshot's chunk (16 sectors)
REGION = 8 * MIB                # the part of the disk the tests write into
TAIL_AT = 16 * MIB              # a NAS pattern beyond the region, never written by the VM
TAIL_LEN = 128 * KIB
WAIT = 60.0

Write = Tuple[int, bytes]


# ----------------------------------------------------------------- cluster
SLOW = "compute-0-3"            # merges slowly, so a test can act while it merges
FAST = "vm-container-0-14"
SLOW_MERGE_RATE = 12            # chunks of 8 KiB per second: about 12 s for 1.2 MiB of writes


def sync_cluster_body(tmp_path_factory, vhost, name: str):
    """A fixture body: NAS + a slow and a fast container, registered; stopped afterwards."""
    from .conftest import registered_cluster
    yield from registered_cluster(
        tmp_path_factory, vhost, name,
        node_env={SLOW: {"IMGSTORAGE_SIM_MERGE_RATE": str(SLOW_MERGE_RATE)}})


# ----------------------------------------------------------------- waiting
def wait_until(what: str, probe: Callable[[], object], timeout: float = WAIT,
               interval: float = 0.1, show: Optional[Callable[[], object]] = None):
    """Poll ``probe`` until it returns something true; fail with what was last seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = show() if show else value
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {seen!r}")
        time.sleep(interval)


# ------------------------------------------------------------ the databases
def _query(path, sql: str, args: Sequence = ()) -> Optional[Dict]:
    db = sqlite3.connect(str(path), timeout=10)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute(sql, tuple(args)).fetchone()
        return dict(row) if row is not None else None
    finally:
        db.close()


def nas_row(cluster, zvol: str) -> Optional[Dict]:
    """The NAS's record of ``zvol`` (state is the life-cycle state, not the display)."""
    return _query(cluster.db_path(NAS), "SELECT * FROM nas_zvols WHERE zvol = ?", (zvol,))


def nas_state(cluster, zvol: str) -> Optional[str]:
    row = nas_row(cluster, zvol)
    return row["state"] if row else None


def vm_row(cluster, host: str, zvol: str) -> Optional[Dict]:
    path = cluster.db_path(host)
    if not path.exists():
        return None
    return _query(path, "SELECT * FROM vm_zvols WHERE zvol = ?", (zvol,))


def vm_state(cluster, host: str, zvol: str) -> Optional[str]:
    row = vm_row(cluster, host, zvol)
    return row["state"] if row else None


def wait_nas_state(cluster, zvol: str, *states: str, timeout: float = WAIT) -> str:
    return wait_until(f"{zvol} on the NAS in {states}",
                      lambda: (lambda s: s if s in states else None)(nas_state(cluster, zvol)),
                      timeout, show=lambda: diagnose(cluster, zvol))


def diagnose(cluster, zvol: str) -> Dict:
    """What a failing wait reports: both records and the ends of the daemons' logs."""
    return {"nas": nas_row(cluster, zvol),
            "containers": {h: vm_row(cluster, h, zvol) for h in cluster.containers},
            "logs": {n: cluster.tail(n, 8) for n in [NAS] + cluster.containers}}


# ------------------------------------------------------------ the operator
def storagemap(cluster) -> Dict[str, Dict]:
    rows = json.loads(ok(cluster.rocks("list", "host", "storagemap", NAS, "output-format=json")))
    return {r["zvol"]: r for r in rows}


def storagedev(cluster, host: str) -> Dict[str, Dict]:
    rows = json.loads(ok(cluster.rocks("list", "host", "storagedev", host, "output-format=json")))
    return {r["zvol"]: r for r in rows}


def set_zvolattr(cluster, zvol: str, attr: str, value) -> None:
    ok(cluster.rocks("set", "host", "zvolattr", NAS, zvol, attr, str(value)))


def sync_map(cluster, zvol: str, host: str, size_gb: int = 1) -> str:
    """Map in sync mode; the answer must be the dm snapshot device."""
    out = ok(cluster.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, str(size_gb),
                           "img_sync=true", f"remotepool={POOL}"))
    assert out.splitlines() == [f"mapping  {NAS} : {POOL} / {zvol}  on  {host}",
                                f"/dev/mapper/{zvol}-snap"], out
    return f"/dev/mapper/{zvol}-snap"


def unmap(cluster, zvol: str) -> None:
    out = ok(cluster.rocks("remove", "host", "storagemap", NAS, zvol))
    assert out.splitlines() == [f"unmapping   {NAS} : {zvol}", "Success"], out


def percent_of(text) -> Optional[float]:
    """``"48%"`` -> 48.0"""
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", str(text))
    assert m, f"unexpected PROGRESS {text!r}"
    return float(m.group(1))


_RATE_UNITS = {"B/s": 1, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9}


def rate_of(text) -> Optional[float]:
    """``"916.1 KB/s"`` -> 916100.0 (bytes per second, decimal units)"""
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?) (B/s|KB/s|MB/s|GB/s)", str(text))
    assert m, f"unexpected RATE {text!r}"
    return float(m.group(1)) * _RATE_UNITS[m.group(2)]


def wait_display(cluster, zvol: str, state: str, min_progress: float = 0.0,
                 timeout: float = WAIT) -> Dict:
    """Until ``list host storagemap`` shows ``state`` (with progress above ``min_progress``)."""
    def probe():
        row = storagemap(cluster).get(zvol)
        if row and row["state"] == state:
            progress = percent_of(row.get("progress"))
            if progress is not None and progress > min_progress:
                return row
        return None
    return wait_until(f"{zvol} shown as {state} with progress > {min_progress:g}%", probe,
                      timeout, interval=0.05, show=lambda: diagnose(cluster, zvol))


def wait_dev_status(cluster, host: str, zvol: str, status: str, timeout: float = WAIT) -> Dict:
    """Until ``list host storagedev`` shows the zvol's device with ``status``."""
    return wait_until(f"{zvol} on {host} with STATUS {status}",
                      lambda: (lambda r: r if r and r["status"] == status else None)(
                          storagedev(cluster, host).get(zvol)),
                      timeout, interval=0.05, show=lambda: diagnose(cluster, zvol))


# ----------------------------------------------------------- raw bytes
def sim(cluster, host: str, *args: str, input: Optional[bytes] = None):
    """``imgstorage-sim`` run on ``host`` itself, with that node's environment."""
    return cluster.run("sim", *args, input=input, node=host)


def write(cluster, host: str, device: str, offset: int, data: bytes) -> None:
    ok(sim(cluster, host, "write", "--host", host, device, "--offset", str(offset), input=data))


def read(cluster, host: str, device: str, offset: int, length: int) -> bytes:
    proc = sim(cluster, host, "read", "--host", host, device, "--offset", str(offset),
               "--length", str(length))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == length
    return proc.stdout


def nas_device(zvol: str) -> str:
    return f"/dev/zvol/{POOL}/{zvol}"


def read_nas(cluster, zvol: str, offset: int, length: int) -> bytes:
    return read(cluster, NAS, nas_device(zvol), offset, length)


def zfs_names(cluster, host: str) -> List[str]:
    lines = ok(sim(cluster, host, "zfs", "list", "--host", host)).splitlines()
    return [line.split()[0] for line in lines[1:]]


# ------------------------------------------------------------ the image
class Image:
    """What the first REGION bytes of the disk must hold, write after write."""

    def __init__(self, base: bytes = b""):
        self.data = bytearray(REGION)
        self.data[:len(base)] = base

    def apply(self, writes: Iterable[Write]) -> None:
        for offset, data in writes:
            assert offset + len(data) <= REGION
            self.data[offset:offset + len(data)] = data

    def bytes(self) -> bytes:
        return bytes(self.data)


def random_writes(rng: random.Random, count: int) -> List[Write]:
    """Writes of three kinds in turn: 4 KiB aligned, unaligned, across an 8 KiB chunk edge."""
    writes: List[Write] = []
    for n in range(count):
        kind = n % 3
        if kind == 0:
            length = 4 * KIB * rng.randint(1, 4)
            offset = 4 * KIB * rng.randrange((REGION - length) // (4 * KIB))
        elif kind == 1:
            length = rng.randint(1, 3 * CHUNK)
            offset = rng.randrange(REGION - length)
            if offset % 512 == 0:
                offset += rng.randint(1, 511)       # never sector aligned
        else:
            edge = CHUNK * rng.randrange(1, REGION // CHUNK)
            before, after = rng.randint(1, CHUNK - 1), rng.randint(1, CHUNK - 1)
            offset, length = edge - before, before + after
        writes.append((offset, rng.randbytes(length)))
    return writes


def do_writes(cluster, host: str, device: str, image: Image, writes: Sequence[Write]) -> None:
    for offset, data in writes:
        write(cluster, host, device, offset, data)
    image.apply(writes)


def phase_writes(rng: random.Random, count: int, big: int = 0, zeros: bool = False) -> List[Write]:
    """``count`` random writes; optionally one contiguous ``big`` write and one of zeros."""
    writes = random_writes(rng, count)
    if big:
        writes.insert(0, (CHUNK * rng.randrange((REGION - big) // CHUNK), rng.randbytes(big)))
    if zeros:
        # zeros over data: the NAS must end with zeros there, not the old bytes
        writes.append((rng.randrange(0, 2 * MIB), bytes(rng.randint(1, 3 * CHUNK))))
    return writes


def prepare_zvol(cluster, zvol: str, host: str, base_len: int, seed: int) -> Tuple[Image, bytes]:
    """Create ``zvol`` (1 GB) with a direct map and unmap, then put a pattern on the NAS.

    Returns the expected image of the region and the pattern at TAIL_AT.
    """
    out = ok(cluster.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, "1",
                           "img_sync=false"))
    assert out.splitlines()[1].startswith("/dev/sd"), out
    unmap(cluster, zvol)
    rng = random.Random(seed)
    base, tail = rng.randbytes(base_len), rng.randbytes(TAIL_LEN)
    write(cluster, NAS, nas_device(zvol), 0, base)
    write(cluster, NAS, nas_device(zvol), TAIL_AT, tail)
    assert read_nas(cluster, zvol, 0, base_len) == base
    return Image(base), tail


# ------------------------------------------------------------ final checks
def first_difference(got: bytes, want: bytes) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            end = i
            while end < len(want) and got[end] != want[end]:
                end += 1
            return (f"first difference at byte {i} (chunk {i // CHUNK}), "
                    f"{end - i} bytes differ there")
    return f"lengths {len(got)} != {len(want)}"


def assert_nas_holds(cluster, zvol: str, image: Image, tail: bytes) -> None:
    """The NAS zvol byte for byte: the region, zeros after it, the untouched tail pattern."""
    got = read_nas(cluster, zvol, 0, REGION)
    assert got == image.bytes(), first_difference(got, image.bytes())
    assert read_nas(cluster, zvol, REGION, TAIL_AT - REGION) == bytes(TAIL_AT - REGION)
    assert read_nas(cluster, zvol, TAIL_AT, TAIL_LEN) == tail
    assert read_nas(cluster, zvol, GIB - 64 * KIB, 64 * KIB) == bytes(64 * KIB)


def assert_container_clean(cluster, host: str, zvol: str) -> None:
    """Nothing of ``zvol`` is left on the container, and the NAS exports nothing for it."""
    names = zfs_names(cluster, host)
    assert f"{POOL}/{zvol}" not in names and f"{POOL}/{zvol}-temp-write" not in names, names
    status = ok(sim(cluster, host, "dmsetup", "status", "--host", host))
    assert f"{zvol}-snap" not in status, status
    sessions = ok(sim(cluster, host, "iscsi", "sessions", "--host", host))
    target = f"iqn.2001-04.com.{NAS}-{zvol}"
    assert target not in sessions, sessions
    assert target not in read_targets(cluster.sim_root, NAS)
    assert vm_row(cluster, host, zvol) is None
    assert zvol not in storagedev(cluster, host)
    row = storagemap(cluster)[zvol]
    assert (row["state"], row["host"], row["target"]) == ("unmapped", None, None), row


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write_between_pulls(cluster, zvol: str, host: str, device: str, image: Image,
                        writes: Sequence[Write], timeout: float = WAIT) -> str:
    """Make ``writes`` while no periodic pull runs, so every later pull carries them.

    A pull snapshots the container's copy only after the NAS recorded it as
    ``pulling``; when the NAS shows the same ``local`` record with the same last
    snapshot before and after the writes, no snapshot was taken in between.
    Writing the same bytes again is harmless, so an unlucky round is repeated.
    Returns the last snapshot the NAS had before the writes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = wait_until(f"{zvol} local on the NAS",
                            lambda: (lambda r: r if r and r["state"] == "local" else None)(
                                nas_row(cluster, zvol)), timeout,
                            interval=0.05, show=lambda: diagnose(cluster, zvol))
        for offset, data in writes:
            write(cluster, host, device, offset, data)
        after = nas_row(cluster, zvol)
        if after["state"] == "local" and after["last_snapshot"] == before["last_snapshot"]:
            image.apply(writes)
            return before["last_snapshot"]
    raise AssertionError(f"never found {zvol} between two pulls: {diagnose(cluster, zvol)!r}")


def measure_transfer(cluster, zvol: str, shown: str,
                     timeout: float = WAIT) -> Tuple[float, List[float]]:
    """How long ``list host storagemap`` shows ``shown`` with progress, and the rates it shows.

    The clock starts at the first listing with progress above 0 and stops at the
    first listing in another state.
    """
    first = wait_display(cluster, zvol, shown, timeout=timeout)
    started = time.monotonic()
    rates = [rate_of(first.get("rate"))]
    deadline = started + timeout
    while time.monotonic() < deadline:
        row = storagemap(cluster)[zvol]
        now = time.monotonic()
        if row["state"] != shown:
            return now - started, [r for r in rates if r]
        assert re.fullmatch(r"\d+:\d\d:\d\d", row["time"] or ""), row   # how long it has run
        rates.append(rate_of(row.get("rate")))
        time.sleep(0.05)
    raise AssertionError(f"{zvol} still {shown} after {timeout:g} s: {diagnose(cluster, zvol)!r}")


# ------------------------------------------------------- switch and unmap
def target_of(zvol: str) -> str:
    return f"iqn.2001-04.com.{NAS}-{zvol}"


def wait_local(c, host: str, zvol: str) -> None:
    """The switch is done: dm linear on the container, the NAS no longer exports the zvol."""
    wait_dev_status(c, host, zvol, "linear")
    wait_nas_state(c, zvol, "local")
    row = storagemap(c)[zvol]
    # with a short frequency a periodic pull may already be running
    assert row["state"] in ("mapped", "NAS<-VM sched"), row
    assert (row["host"], row["target"]) == (host, None), row
    assert target_of(zvol) not in read_targets(c.sim_root, NAS)
    assert target_of(zvol) not in ok(sim(c, host, "iscsi", "sessions", "--host", host))
    names = zfs_names(c, host)
    assert f"{POOL}/{zvol}" in names and f"{POOL}/{zvol}-temp-write" not in names, names


def unmap_and_check(c, host: str, zvol: str, image: Image, tail: bytes,
                    final_pull: bool = True) -> None:
    """Unmap; the container's copy comes home with a final pull, or (``final_pull`` false)
    the VM's writes went into the NAS disk through iSCSI before the unmap answered."""
    before = nas_row(c, zvol)["last_snapshot"]
    unmap(c, zvol)
    if not final_pull:
        assert nas_state(c, zvol) == "unmapped", diagnose(c, zvol)
    wait_nas_state(c, zvol, "unmapped")
    if final_pull:
        assert nas_row(c, zvol)["last_snapshot"] not in (None, before), diagnose(c, zvol)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, host, zvol)


# ------------------------------------------------------------- killing
def kill(c, node: str) -> None:
    assert c.stop(node, sig=signal.SIGKILL) == -signal.SIGKILL


def log_of(c, node: str) -> str:
    return c.log_path(node).read_text(errors="replace")


def slow_zfs(c, host: str, seconds) -> None:
    """Restart ``host``'s daemon with every simulated zfs command taking ``seconds``
    (None: as fast as the simulation goes)."""
    settings = c.node_settings.setdefault(host, {})
    if seconds is None:
        settings.pop("sim_latency", None)
    else:
        settings["sim_latency"] = {"zfs": seconds}
    c.write_config(host)
    if c.procs.get(host) is not None and c.procs[host].poll() is None:
        c.stop(host)
        c.start([host])
