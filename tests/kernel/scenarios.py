"""The operator's workflows on the real kernel, driven from the host through ``rocks``.

Each scenario writes seeded patterns on a guest's block device through the
test agent, keeps the image the zvol must hold (an :class:`Image`), and in
the end compares the NAS zvol with it chunk by chunk: the guest summarises
each 1 MiB chunk (all zero, or its sha256) reading with O_DIRECT, and the
runner computes the same from the image.  The patterns are
``random.Random(seed).randbytes(n)``, the same on both sides.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
from typing import Callable, Dict, List, Optional, Tuple

from cluster import CONTAINER, DAEMON, NAS, POOL, KernelCluster

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
CHUNK = MIB


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


class Image:
    """What a zvol must hold: zeros, plus every write so far, in order."""

    def __init__(self, size: int):
        self.size = size
        self.chunks: Dict[int, bytearray] = {}

    def apply(self, writes: List[Dict]) -> None:
        for w in writes:
            data = pattern(w["seed"], w["length"])
            pos = w["offset"]
            while data:
                index, within = divmod(pos, CHUNK)
                chunk = self.chunks.setdefault(index, bytearray(CHUNK))
                take = min(len(data), CHUNK - within)
                chunk[within:within + take] = data[:take]
                data, pos = data[take:], pos + take

    def summary(self, offset: int = 0, length: Optional[int] = None) -> List[Optional[str]]:
        end = self.size if length is None else offset + length
        out = []
        for index in range(offset // CHUNK, (end + CHUNK - 1) // CHUNK):
            chunk = self.chunks.get(index)
            out.append(None if chunk is None or not any(chunk)
                       else hashlib.sha256(bytes(chunk)).hexdigest())
        return out


def writes(seed: int, spans: List[Tuple[int, int]]) -> List[Dict]:
    return [{"offset": off, "length": length, "seed": seed * 1000 + i}
            for i, (off, length) in enumerate(spans)]


def scattered(seed: int, count: int, length: int, lo: int, hi: int) -> List[Dict]:
    """``count`` aligned writes of ``length`` bytes between ``lo`` and ``hi``."""
    rng = random.Random(seed)
    slots = rng.sample(range(lo // length, hi // length), count)
    return writes(seed, [(s * length, length) for s in sorted(slots)])


# --------------------------------------------------------------- the CLI
def storagemap(c: KernelCluster) -> Dict[str, Dict]:
    rows = json.loads(c.ok("list", "host", "storagemap", NAS, "output-format=json"))
    return {r["zvol"]: r for r in rows}


def storagedev(c: KernelCluster) -> Dict[str, Dict]:
    rows = json.loads(c.ok("list", "host", "storagedev", CONTAINER, "output-format=json"))
    return {r["zvol"]: r for r in rows}


def wait_until(what: str, probe: Callable[[], object], timeout: float = 300.0,
               interval: float = 0.5, show: Optional[Callable[[], object]] = None):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: "
                                 f"{(show() if show else value)!r}")
        time.sleep(interval)


def map_zvol(c: KernelCluster, zvol: str, sync: bool) -> str:
    args = ["add", "host", "storagemap", NAS, POOL, zvol, CONTAINER, "1",
            f"img_sync={'true' if sync else 'false'}"]
    if sync:
        args.append(f"remotepool={POOL}")
    lines = c.ok(*args).splitlines()
    assert lines[0] == f"mapping  {NAS} : {POOL} / {zvol}  on  {CONTAINER}", lines
    device = lines[1]
    if sync:
        assert device == f"/dev/mapper/{zvol}-snap", lines
    else:
        assert re.fullmatch(r"/dev/sd[a-z]+", device), lines
    return device


def unmap_zvol(c: KernelCluster, zvol: str) -> None:
    lines = c.ok("remove", "host", "storagemap", NAS, zvol).splitlines()
    assert lines == [f"unmapping   {NAS} : {zvol}", "Success"], lines


def state_of(c: KernelCluster, zvol: str) -> Optional[str]:
    row = storagemap(c).get(zvol)
    return row["state"] if row else None


def wait_state(c: KernelCluster, zvol: str, *states: str, timeout: float = 300.0) -> str:
    return wait_until(f"{zvol} in {states}", lambda: (lambda s: s if s in states else None)(
        state_of(c, zvol)), timeout, show=lambda: storagemap(c).get(zvol))


def nas_device(zvol: str) -> str:
    return f"/dev/zvol/{POOL}/{zvol}"


def assert_holds(c: KernelCluster, guest, device: str, image: Image, what: str,
                 offset: int = 0, length: Optional[int] = None) -> float:
    got = guest.summary(device, offset, length)
    if length is None:
        assert got["size"] == image.size, f"{what}: {device} is {got['size']} bytes, " \
                                          f"not {image.size}"
    want = image.summary(offset, length)
    bad = [offset // CHUNK + i for i, (a, b) in enumerate(zip(got["chunks"], want)) if a != b]
    assert len(got["chunks"]) == len(want) and not bad, \
        f"{what}: {device} differs from the expected bytes in MiB chunks {bad[:10]}" \
        f"{' ...' if len(bad) > 10 else ''} ({len(bad)} in all)"
    return got["seconds"]


def assert_written(c: KernelCluster, guest, device: str, image: Image, ws: List[Dict],
                   what: str) -> None:
    """Only the chunks the writes touched: reading a whole disk over iSCSI is slow here."""
    for w in ws:
        start = w["offset"] // CHUNK * CHUNK
        end = (w["offset"] + w["length"] + CHUNK - 1) // CHUNK * CHUNK
        assert_holds(c, guest, device, image, what, start, end - start)


def assert_container_clean(c: KernelCluster, zvol: str) -> None:
    g = c.container
    names = g.sh("zfs", "list", "-H", "-o", "name", "-t", "all").split()
    assert not any(n.split("@")[0] in (f"{POOL}/{zvol}", f"{POOL}/{zvol}-temp-write")
                   for n in names), f"the container still has {names}"
    dm = g.sh("dmsetup", "ls")
    assert f"{zvol}-snap" not in dm, f"the container still has dm device: {dm}"
    sessions = g.result("iscsiadm", "-m", "session")["stdout"]
    assert zvol not in sessions, f"the container still has an iSCSI session: {sessions}"
    targets = c.nas.sh("python3", "-c", "import rtslib_fb; print([t.wwn for t in "
                       "rtslib_fb.RTSRoot().targets])")
    assert zvol not in targets, f"the NAS still exports it: {targets}"


def remove_image(c: KernelCluster, zvol: str) -> None:
    """The operator deletes the zvol: the NAS's pool has room for only a few thick zvols."""
    lines = c.ok("remove", "host", "storageimg", NAS, POOL, zvol).splitlines()
    assert lines == [f"removing   {NAS} : {POOL} / {zvol}", "Success"], lines
    left = c.nas.sh("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", POOL).split()
    assert not any(n.split("@")[0] == f"{POOL}/{zvol}" for n in left), left


def prepare(c: KernelCluster, zvol: str, seed: int) -> Image:
    """A 1 GB zvol made by a direct map and unmap, then a pattern written on the NAS."""
    map_zvol(c, zvol, sync=False)
    unmap_zvol(c, zvol)
    image = Image(GIB)
    base = writes(seed, [(0, 24 * MIB), (512 * MIB, 128 * KIB), (GIB - 64 * KIB, 64 * KIB)])
    c.nas.write(nas_device(zvol), base)
    image.apply(base)
    return image


# ------------------------------------------------------------ scenarios
def direct_iscsi(c: KernelCluster, note: Callable[[str], None]) -> None:
    """Map directly, write from the container, unmap, and find the bytes on the NAS."""
    zvol = "kdirect"
    device = map_zvol(c, zvol, sync=False)
    size = int(c.container.sh("blockdev", "--getsize64", device))
    assert size == GIB, f"{device} is {size} bytes"
    g, n = c.container, c.nas
    target = f"iqn.2001-04.com.{NAS}-{zvol}"
    c.rec(g, "iscsi/real_discovery", "iscsiadm", "-m", "discovery", "-t", "sendtargets",
          "-p", NAS, note="bookworm open-iscsi 2.1.8 against LIO; portal given by host name")
    c.rec(g, "iscsi/real_sessions_p3", "iscsiadm", "-m", "session", "-P", "3",
          note="bookworm open-iscsi 2.1.8, one LIO session with CHAP")
    c.rec(g, "iscsi/real_login_already", "iscsiadm", "-m", "node", "-T", target, "-p", NAS,
          "--login", note="a second login to a logged-in target")
    c.rec(g, "blockdev/real_getsize64", "blockdev", "--getsize64", device,
          note="a 1 GiB LIO LUN")
    c.rec(n, "zfs/real_list_volumes", "zfs", "list", "-Hp", "-o", "name,volsize,used,refer",
          "-t", "volume", "-r", POOL, note="zfsutils-linux 2.1.11")
    c.rec(n, "zfs/real_destroy_busy", "zfs", "destroy", f"{POOL}/{zvol}",
          note="the zvol is exported by LIO")
    image = Image(GIB)
    ws = writes(11, [(0, MIB), (100 * MIB + 4 * KIB, 256 * KIB), (GIB - 64 * KIB, 64 * KIB)])
    c.container.write(device, ws)
    image.apply(ws)
    assert_written(c, c.container, device, image, ws, "the container's iSCSI disk")
    row = storagedev(c).get(zvol)
    assert row is not None and row["status"] == "iscsi", row
    unmap_zvol(c, zvol)
    assert state_of(c, zvol) == "unmapped"
    c.rec(g, "iscsi/real_logout_no_session", "iscsiadm", "-m", "node", "-T", target,
          "--logout", note="nothing logged in any more")
    c.rec(g, "iscsi/real_sessions_none", "iscsiadm", "-m", "session", "-P", "3")
    c.rec(n, "zfs/real_get_missing", "zfs", "list", "-Hp", "-o", "name,volsize,used,refer",
          "-t", "volume", f"{POOL}/nosuchvol")
    seconds = assert_holds(c, c.nas, nas_device(zvol), image, "the NAS zvol")
    note(f"NAS checksum {seconds:.1f}s")
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def _throttled_sync_map(c: KernelCluster, zvol: str, speed: int, frequency: int) -> str:
    c.ok("set", "host", "zvolattr", NAS, zvol, "uploadspeed", str(speed))
    c.ok("set", "host", "zvolattr", NAS, zvol, "frequency", str(frequency))
    return map_zvol(c, zvol, sync=True)


def sync_mode(c: KernelCluster, note: Callable[[str], None]) -> None:
    """Writes during the copy, the merge and after the switch; stop; the NAS has them all."""
    zvol = "ksync"
    image = prepare(c, zvol, 21)
    device = _throttled_sync_map(c, zvol, 2_000_000, 300)
    g = c.container

    # 1. during the NAS->VM copy: the writes go to the temp-write zvol
    assert state_of(c, zvol) == "NAS->VM", storagemap(c).get(zvol)
    w1 = scattered(22, 96, 64 * KIB, 0, 256 * MIB) + writes(23, [(30 * MIB, 2 * MIB)])
    g.write(device, w1)
    image.apply(w1)
    assert state_of(c, zvol) == "NAS->VM", "the copy ended before the writes did"
    assert_written(c, g, device, image, w1[-1:], "the snapshot device during the copy")
    c.rec(g, "dm/real_status_snapshot", "dmsetup", "status", f"{zvol}-snap",
          note="bookworm dmsetup 1.02.185, kernel 6.1; 1 GiB origin over iSCSI, writes in COW")
    c.rec(g, "dm/real_table_snapshot", "dmsetup", "table", f"{zvol}-snap")
    c.rec(g, "dm/real_status_all", "dmsetup", "status")
    c.rec(g, "dm/real_info_missing", "dmsetup", "info", "nosuchdevice")
    c.rec(g, "dm/real_status_missing", "dmsetup", "status", "nosuchdevice")

    # 2. during the kernel's snapshot-merge, seen and written inside the guest
    w2 = scattered(24, 16, 64 * KIB, 256 * MIB, 512 * MIB)
    r = g.call("write_when", path=device, writes=w2, probe=["dmsetup", "status", f"{zvol}-snap"],
               match=r"snapshot-merge|linear", timeout=600, interval=0.02)
    assert r["matched"], f"the merge never showed: {r['before']}"
    assert "snapshot-merge" in r["before"], f"the merge was over before it was seen: {r['before']}"
    image.apply(w2)
    merging_after = "snapshot-merge" in r["after"]
    if c.recording:
        from record import FIXTURES
        (FIXTURES / "dm" / "real_status_merging.txt").write_text(
            f"command: dmsetup status {zvol}-snap\nnote: seen by the agent as the merge ran\n"
            f"exit: 0\n--- stdout\n{r['before']}--- stderr\n")
    note(f"merge writes {'inside' if merging_after else 'overlapping the end of'} the merge")

    # 3. after the switch to the local copy
    wait_until("dm linear", lambda: "linear" in g.sh("dmsetup", "table", f"{zvol}-snap"),
               timeout=600)
    wait_state(c, zvol, "mapped")
    c.rec(g, "dm/real_status_linear", "dmsetup", "status", f"{zvol}-snap")
    c.rec(g, "blockdev/real_fuser_dm", "fuser", "-s", device)
    c.rec(c.nas, "zfs/real_list_snapshots", "zfs", "list", "-Hp", "-t", "snapshot", "-o", "name",
          "-s", "creation", "-d", "1", f"{POOL}/{zvol}")
    snaps = nas_snapshots(c, zvol)
    if snaps:
        c.rec(c.nas, "zfs/real_send_estimate", "zfs", "send", "-nP", snaps[-1],
              note="a full stream's estimate")
    w3 = writes(25, [(600 * MIB, 3 * MIB), (GIB - 128 * KIB, 64 * KIB)])
    g.write(device, w3)
    image.apply(w3)
    assert_holds(c, g, device, image, "the local copy", 0, 32 * MIB)

    # 4. stop: the final pull, then the container's copy goes
    w4 = writes(26, [(700 * MIB, MIB)])
    g.write(device, w4)
    image.apply(w4)
    unmap_zvol(c, zvol)
    wait_state(c, zvol, "unmapped", timeout=600)
    assert_holds(c, c.nas, nas_device(zvol), image, "the NAS zvol after stop")
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def nas_snapshots(c: KernelCluster, zvol: str) -> List[str]:
    out = c.nas.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation",
                   "-d", "1", f"{POOL}/{zvol}")
    return out.split()


def stop_during_copy(c: KernelCluster, note: Callable[[str], None]) -> None:
    """Unmap while the NAS->VM copy runs: the VM's writes go home through iSCSI."""
    zvol = "kstop"
    image = prepare(c, zvol, 31)
    device = _throttled_sync_map(c, zvol, 1_000_000, 300)
    g = c.container
    assert state_of(c, zvol) == "NAS->VM", storagemap(c).get(zvol)
    w1 = scattered(32, 48, 64 * KIB, 0, 512 * MIB)
    g.write(device, w1)
    image.apply(w1)
    assert state_of(c, zvol) == "NAS->VM", "the copy ended before the stop"
    unmap_zvol(c, zvol)
    wait_state(c, zvol, "unmapped", timeout=600)
    assert_holds(c, c.nas, nas_device(zvol), image, "the NAS zvol after a stop during the copy")
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def busy_device(c: KernelCluster, note: Callable[[str], None]) -> None:
    """A process holding the container's disk (as qemu would) keeps the unmap from happening."""
    zvol = "kbusy"
    device = map_zvol(c, zvol, sync=False)
    g = c.container
    g.sh("systemd-run", "--unit=kbusy-holder", "sh", "-c", f"exec 3<>{device}; exec sleep 600")
    wait_until("the holder", lambda: g.result("fuser", "-s", device)["rc"] == 0, timeout=60)
    c.rec(g, "blockdev/real_fuser_in_use", "fuser", "-s", device,
          note="a shell holds the iSCSI disk open, as qemu would")
    try:
        started = time.monotonic()
        proc = c.rocks("remove", "host", "storagemap", NAS, zvol, "timeout=12")
        err = proc.stderr.strip()
        assert proc.returncode != 0, f"the unmap of a held disk succeeded: {proc.stdout}"
        assert f"device {device} of zvol {zvol} is still in use" in err \
            and len(err.splitlines()) == 1, err
        note(f"unmap refused after {time.monotonic() - started:.0f}s while held")
        assert state_of(c, zvol) == "mapped", storagemap(c).get(zvol)
        assert f"{NAS}-{zvol}" in g.sh("iscsiadm", "-m", "session"), "the session went anyway"
    finally:
        g.result("systemctl", "stop", "kbusy-holder")
    unmap_zvol(c, zvol)
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def restart_daemons(c: KernelCluster, note: Callable[[str], None]) -> None:
    """Both daemons restarted while a zvol is mapped: they find the kernel's state and let go."""
    zvol = "krestart"
    device = map_zvol(c, zvol, sync=False)
    ws = writes(51, [(0, 256 * KIB)])
    c.container.write(device, ws)
    image = Image(GIB)
    image.apply(ws)
    # What a restarted NAS (or imgstorageadmin) reads back from LIO through rtslib-fb.
    out = c.nas.sh("python3", "-c", "import json; from imgstorage.drivers.lio import LioTarget; "
                   "print(json.dumps([vars(t) for t in LioTarget().list_targets()]))")
    assert json.loads(out) == [{"iqn": f"iqn.2001-04.com.{NAS}-{zvol}",
                                "device": nas_device(zvol), "tid": None,
                                "acls": [f"iqn.2005-03.org.open-iscsi:{CONTAINER}"]}], out
    c.restart_daemon(c.nas, c.container)
    row = storagemap(c)[zvol]
    assert row["state"] == "mapped" and row["host"] == CONTAINER, row
    dev = storagedev(c).get(zvol)
    assert dev is not None and dev["block dev"] == device.rsplit("/", 1)[1], dev
    unmap_zvol(c, zvol)
    assert_written(c, c.nas, nas_device(zvol), image, ws, "the NAS zvol after the restarts")
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def dm_by_hand(c: KernelCluster, note: Callable[[str], None]) -> None:
    """dm-snapshot's life cycle on two local zvols, with dmsetup alone: what the kernel prints
    at each step, including a finished merge and a device that is busy."""
    g = c.container
    origin, cow, name = f"{POOL}/kdm-origin", f"{POOL}/kdm-cow", "kdm-snap"
    g.sh("zfs", "create", "-V", "64M", origin)
    g.sh("zfs", "create", "-s", "-V", "64M", cow)
    g.sh("udevadm", "settle")
    odev, cdev = f"/dev/zvol/{origin}", f"/dev/zvol/{cow}"
    sectors = 64 * MIB // 512
    try:
        g.sh("dmsetup", "create", name, "--table", f"0 {sectors} snapshot {odev} {cdev} P 16")
        c.rec(g, "dm/real_status_snapshot_empty", "dmsetup", "status", name,
              note="a new persistent snapshot, nothing written")
        c.rec(g, "dm/real_create_exists", "dmsetup", "create", name, "--table",
              f"0 {sectors} snapshot {odev} {cdev} P 16", note="the name is taken")
        g.write(f"/dev/mapper/{name}", writes(61, [(0, 4 * MIB)]))
        g.sh("dmsetup", "suspend", name)
        g.sh("dmsetup", "reload", name, "--table",
             f"0 {sectors} snapshot-merge {odev} {cdev} P 16")
        g.sh("dmsetup", "resume", name)
        wait_until("the merge", lambda: merged_status(g.sh("dmsetup", "status", name)),
                   timeout=120)
        c.rec(g, "dm/real_status_merged", "dmsetup", "status", name,
              note="snapshot-merge once every chunk is back in the origin")
        g.sh("systemd-run", "--unit=kdm-holder", "sh", "-c",
             f"exec 3<>/dev/mapper/{name}; exec sleep 600")
        wait_until("the holder", lambda: g.result("fuser", "-s", f"/dev/mapper/{name}")["rc"] == 0,
                   timeout=60)
        c.rec(g, "dm/real_remove_busy", "dmsetup", "remove", name,
              note="a process holds the device open")
        g.sh("systemctl", "stop", "kdm-holder")
        g.sh("dmsetup", "suspend", name)
        g.sh("dmsetup", "reload", name, "--table", f"0 {sectors} linear {odev} 0")
        g.sh("dmsetup", "resume", name)
        c.rec(g, "dm/real_table_linear", "dmsetup", "table", name)
        c.rec(g, "zfs/real_destroy_cow_held", "zfs", "destroy", cow,
              note="right after the table stopped using it")
    finally:
        g.result("systemctl", "stop", "kdm-holder")
        g.result("dmsetup", "remove", "--retry", name)
        g.result("udevadm", "settle")
        for ds in (cow, origin):
            g.result("zfs", "destroy", "-r", ds)


def zfs_streams_by_hand(c: KernelCluster, note: Callable[[str], None]) -> None:
    """zfs send | zfs receive on the NAS alone: how receive refuses what sync mode must
    recover from (a base that does not match, a full stream over history, a cut stream)."""
    n = c.nas
    a, b, d = f"{POOL}/ks-a", f"{POOL}/ks-b", f"{POOL}/ks-d"

    def pipe(name: str, cmd: str, note_text: str, ok: bool) -> None:
        r = c.run(n, name, "sh", "-c", cmd, note=note_text)
        assert (r["rc"] == 0) is ok, f"`{cmd}` -> {r['rc']}: {r['stderr']}"

    try:
        n.sh("zfs", "create", "-s", "-V", "64M", a)
        n.sh("udevadm", "settle")
        n.write(f"/dev/zvol/{a}", writes(71, [(0, MIB)]))
        n.sh("zfs", "snapshot", f"{a}@s1")
        n.write(f"/dev/zvol/{a}", writes(72, [(2 * MIB, MIB)]))
        n.sh("zfs", "snapshot", f"{a}@s2")
        pipe("zfs/real_receive_full", f"zfs send {a}@s1 | zfs receive -F {b}",
             "a full stream into a new zvol", True)
        pipe("zfs/real_receive_incremental", f"zfs send -I @s1 {a}@s2 | zfs receive -F {b}",
             "the incremental on top of it", True)
        pipe("zfs/real_receive_full_over_history", f"zfs send {a}@s1 | zfs receive -F {b}",
             "a full stream into a zvol that has snapshots", False)
        n.sh("sh", "-c", f"zfs send {a}@s1 | zfs receive -F {d}")
        n.sh("zfs", "snapshot", f"{d}@other")
        n.sh("zfs", "destroy", f"{d}@s1")
        pipe("zfs/real_receive_base_mismatch", f"zfs send -I @s1 {a}@s2 | zfs receive -F {d}",
             "the destination no longer has the stream's base", False)
        pipe("zfs/real_receive_truncated",
             f"zfs send {a}@s2 | head -c 200000 | zfs receive -F {f'{POOL}/ks-e'}",
             "the stream ends early", False)
        pipe("zfs/real_send_estimate_incremental", f"zfs send -nP -I @s1 {a}@s2",
             "an incremental estimate", True)
    finally:
        for ds in (a, b, d, f"{POOL}/ks-e"):
            n.result("zfs", "destroy", "-r", ds)


RESUME_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,4096}")


def zfs_resume_by_hand(c: KernelCluster, note: Callable[[str], None]) -> None:
    """Resumable receives and holds on the NAS alone: where a cut ``zfs receive -s -F``
    leaves its token (new zvol, incremental, existing zvol without snapshots), how the
    resumed stream completes it byte for byte, ``zfs receive -A``, and what a hold does
    to ``zfs destroy``."""
    n = c.nas
    a, b, d = f"{POOL}/ksr-a", f"{POOL}/ksr-b", f"{POOL}/ksr-d"
    e, f, g = f"{POOL}/ksr-e", f"{POOL}/ksr-f", f"{POOL}/ksr-g"
    size = 64 * MIB

    def step(name: Optional[str], argv: List[str], note_text: Optional[str], rc: int) -> Dict:
        r = c.run(n, name, *argv, note=note_text) if name else n.result(*argv)
        assert r["rc"] == rc, f"`{' '.join(argv)}` -> {r['rc']} (want {rc}): " \
                              f"{(r['stderr'] or r['stdout']).strip()[-800:]}"
        return r

    def pipe(name: Optional[str], cmd: str, note_text: Optional[str], rc: int) -> Dict:
        return step(name, ["sh", "-c", cmd], note_text, rc)

    def token_of(ds: str, name: Optional[str] = None, note_text: Optional[str] = None) -> str:
        r = step(name, ["zfs", "get", "-H", "-o", "value", "receive_resume_token", ds],
                 note_text, 0)
        token = r["stdout"].strip()
        assert RESUME_TOKEN.fullmatch(token), f"{ds} has no resume token: {r['stdout']!r}"
        return token

    def no_token(ds: str, name: Optional[str] = None, note_text: Optional[str] = None) -> None:
        r = step(name, ["zfs", "get", "-H", "-o", "value", "receive_resume_token", ds],
                 note_text, 0)
        assert r["stdout"] == "-\n", f"{ds} still has a resume token: {r['stdout']!r}"

    def partial(ds: str) -> bool:
        return n.result("zfs", "list", "-H", "-o", "name", f"{ds}/%recv")["rc"] == 0

    def snaps(ds: str) -> List[str]:
        return n.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-s", "creation",
                    "-d", "1", ds).split()

    def holds_device(ds: str, image: Image, what: str) -> None:
        n.sh("udevadm", "settle")
        assert_holds(c, n, f"/dev/zvol/{ds}", image, what)

    def cut(r: Dict) -> None:
        assert "Partially received snapshot is saved." in r["stderr"], r["stderr"]

    try:
        n.sh("zfs", "create", "-s", "-V", "64M", a)
        n.sh("udevadm", "settle")
        img1, img2 = Image(size), Image(size)
        w1 = writes(81, [(0, 6 * MIB)])
        w2 = writes(82, [(20 * MIB, 3 * MIB), (size - MIB, MIB)])
        n.write(f"/dev/zvol/{a}", w1)
        n.sh("zfs", "snapshot", f"{a}@s1")
        n.write(f"/dev/zvol/{a}", w2)
        n.sh("zfs", "snapshot", f"{a}@s2")
        img1.apply(w1)
        img2.apply(w1 + w2)

        # 1. a full stream into a new zvol, cut short: the zvol exists, inconsistent,
        #    and holds the token itself
        step("zfs/real_resume_token_missing",
             ["zfs", "get", "-H", "-o", "value", "receive_resume_token", b],
             "before any receive: the zvol does not exist", 1)
        r = pipe("zfs/real_receive_resumable_cut",
                 f"zfs send {a}@s1 | head -c 2000000 | zfs receive -s -F {b}",
                 "a resumable full stream into a new zvol, cut after 2000000 bytes", 1)
        cut(r)
        token = token_of(b, "zfs/real_resume_token_new",
                         "after the cut full stream into a new zvol: on the zvol itself")
        assert f"zfs send -t {token}" in r["stderr"], "the cut receive named another token"
        assert n.sh("zfs", "get", "-H", "-o", "value", "inconsistent", b).strip() == "1"
        assert not partial(b), f"{b}/%recv exists after a receive into a new zvol"
        pipe("zfs/real_receive_resumable_refused", f"zfs send {a}@s1 | zfs receive -s -F {b}",
             "a new full stream while the partial state is there", 1)
        r = step("zfs/real_send_resume_estimate", ["zfs", "send", "-nP", "-t", token],
                 "what is left of the cut full stream", 0)
        assert f"\ttoname = {a}@s1" in r["stdout"].splitlines(), r["stdout"]
        assert re.search(r"^size\t\d+$", r["stdout"], re.M), r["stdout"]
        pipe("zfs/real_send_resume", f"zfs send -t {token} | zfs receive -s -F {b}",
             "the resumed full stream completes the new zvol", 0)
        no_token(b, "zfs/real_resume_token_none", "the stream completed: nothing partial")
        assert snaps(b) == [f"{b}@s1"], snaps(b)
        holds_device(b, img1, "the new zvol after the resumed full stream")

        # 2. an incremental stream, cut short: the zvol keeps its data, the partial
        #    state is the hidden %recv child, the token shows on the zvol
        r = pipe("zfs/real_receive_resumable_cut_incremental",
                 f"zfs send -I @s1 {a}@s2 | head -c 1000000 | zfs receive -s -F {b}",
                 "a resumable incremental stream, cut after 1000000 bytes", 1)
        cut(r)
        token = token_of(b, "zfs/real_resume_token_incremental",
                         "after the cut incremental: reported on the zvol, kept in its %recv")
        assert partial(b), f"no {b}/%recv after a cut incremental"
        token_of(f"{b}/%recv")
        holds_device(b, img1, "the zvol while an incremental is partial")
        pipe("zfs/real_receive_resumable_refused_incremental",
             f"zfs send -I @s1 {a}@s2 | zfs receive -s -F {b}",
             "a new incremental while the partial state is there", 1)
        r = step("zfs/real_send_resume_estimate_incremental", ["zfs", "send", "-nP", "-t", token],
                 "what is left of the cut incremental", 0)
        assert re.search(rf"^incremental\t{re.escape(a)}@s1\t{re.escape(a)}@s2\t\d+$",
                         r["stdout"], re.M), r["stdout"]
        pipe("zfs/real_send_resume_incremental", f"zfs send -t {token} | zfs receive -s -F {b}",
             "the resumed incremental", 0)
        no_token(b)
        assert not partial(b)
        assert snaps(b) == [f"{b}@s1", f"{b}@s2"], snaps(b)
        holds_device(b, img2, "the zvol after the resumed incremental")

        # 3. a full stream into an existing zvol without snapshots (-F): %recv again
        n.sh("zfs", "create", "-s", "-V", "64M", d)
        n.sh("udevadm", "settle")
        own = Image(size)
        w3 = writes(83, [(4 * MIB, 2 * MIB)])
        n.write(f"/dev/zvol/{d}", w3)
        own.apply(w3)
        r = pipe("zfs/real_receive_resumable_cut_existing",
                 f"zfs send {a}@s1 | head -c 2000000 | zfs receive -s -F {d}",
                 "a resumable full stream into an existing zvol without snapshots, cut", 1)
        cut(r)
        token = token_of(d, "zfs/real_resume_token_existing",
                         "after the cut full stream into an existing zvol")
        assert partial(d), f"no {d}/%recv after a cut full stream into an existing zvol"
        holds_device(d, own, "the existing zvol while a full stream is partial")
        pipe(None, f"zfs send -t {token} | zfs receive -s -F {d}", None, 0)
        no_token(d)
        assert snaps(d) == [f"{d}@s1"], snaps(d)
        holds_device(d, img1, "the existing zvol after the resumed full stream")

        # 4. zfs receive -A: a new zvol goes altogether, an existing one only loses %recv
        cut(pipe(None, f"zfs send {a}@s1 | head -c 2000000 | zfs receive -s -F {e}", None, 1))
        step("zfs/real_receive_abort", ["zfs", "receive", "-A", e],
             "the partial state of a new zvol", 0)
        assert n.result("zfs", "list", "-H", e)["rc"] == 1, f"{e} survived zfs receive -A"
        step("zfs/real_receive_abort_missing", ["zfs", "receive", "-A", e],
             "the zvol does not exist", 2)
        cut(pipe(None, f"zfs send -I @s1 {a}@s2 | head -c 1000000 | zfs receive -s -F {d}",
                 None, 1))
        token_of(d)
        step("zfs/real_receive_abort_existing", ["zfs", "receive", "-A", d],
             "the %recv state of an existing zvol", 0)
        no_token(d)
        assert not partial(d) and snaps(d) == [f"{d}@s1"], snaps(d)
        holds_device(d, img1, "the existing zvol after zfs receive -A")
        step("zfs/real_receive_abort_none", ["zfs", "receive", "-A", d],
             "an existing zvol without partial state", 1)

        # 5. a receive killed mid-stream keeps its state too (what CommandSink.abort does)
        #    The receive reads the stream inside the kernel, so its rchar tells when it has
        #    taken all 2 MB; it is killed then, while it waits for more on an open fifo.
        r = pipe(None, f"zfs send {a}@s1 | head -c 2000000 > /run/ksr.part; "
                       "rm -f /run/ksr.fifo; mkfifo /run/ksr.fifo; "
                       f"zfs receive -s -F {f} < /run/ksr.fifo & pid=$!; "
                       "exec 3>/run/ksr.fifo; cat /run/ksr.part >&3; n=0; "
                       "while [ $(awk '/^rchar/ {print $2}' /proc/$pid/io) -lt 2000000 ] "
                       "&& [ $n -lt 600 ]; do n=$((n+1)); sleep 0.1; done; "
                       "kill -KILL $pid; wait $pid; rc=$?; exec 3>&-; rm -f /run/ksr.fifo; "
                       "exit $rc", None, 137)
        token = token_of(f)
        pipe(None, f"zfs send -t {token} | zfs receive -s -F {f}", None, 0)
        holds_device(f, img1, "a killed receive after its resume")

        # 6. holds
        hold = ["zfs", "hold", "imgstorage", f"{a}@s1"]
        release = ["zfs", "release", "imgstorage", f"{a}@s1"]
        step("zfs/real_holds_none", ["zfs", "holds", "-H", f"{a}@s1"], "no holds yet", 0)
        step("zfs/real_hold", hold, None, 0)
        step("zfs/real_hold_exists", hold, "the same tag a second time", 1)
        r = step("zfs/real_holds", ["zfs", "holds", "-H", f"{a}@s1"], "one hold", 0)
        fields = r["stdout"].rstrip("\n").split("\t")
        assert fields[:2] == [f"{a}@s1", "imgstorage"] and len(fields) == 3, r["stdout"]
        step("zfs/real_holds_missing", ["zfs", "holds", "-H", f"{a}@nosuch"],
             "a snapshot that does not exist", 1)
        step("zfs/real_hold_missing", ["zfs", "hold", "imgstorage", f"{a}@nosuch"],
             "a snapshot that does not exist", 1)
        step("zfs/real_release_missing", ["zfs", "release", "imgstorage", f"{POOL}/nosuch@s1"],
             "a zvol that does not exist", 1)
        step("zfs/real_destroy_snapshot_held", ["zfs", "destroy", f"{a}@s1"],
             "the snapshot is held", 1)
        step("zfs/real_destroy_recursive_held", ["zfs", "destroy", "-r", a],
             "one of the zvol's snapshots is held", 1)
        assert snaps(a) == [f"{a}@s1", f"{a}@s2"], f"zfs destroy -r of a held zvol: {snaps(a)}"
        # the driver in the guest, as the daemons run it (LibZfsCoreZfs when pyzfs is there)
        out = n.sh("python3", "-c", DRIVER_CHECK, a.split("/", 1)[1], f.split("/", 1)[1])
        assert out.strip() == "ok", out
        step("zfs/real_release", release, None, 0)
        step("zfs/real_release_none", release, "the tag is gone already", 1)
        assert n.sh("zfs", "holds", "-H", f"{a}@s1") == ""

        # 7. a token whose snapshot is gone (and has no copy in the pool with its guid)
        n.sh("zfs", "snapshot", f"{a}@s3")
        cut(pipe(None, f"zfs send {a}@s3 | head -c 2000000 | zfs receive -s -F {g}", None, 1))
        token = token_of(g)
        n.sh("zfs", "destroy", f"{a}@s3")
        step("zfs/real_send_resume_gone", ["zfs", "send", "-nP", "-t", token],
             "the snapshot of the token was destroyed", 255)
        out = n.sh("python3", "-c", RESUME_CHECK, g.split("/", 1)[1], token)
        assert out.strip() == "ok", out
        note("token on the zvol in all three cases; -s -F combine")
    finally:
        n.result("rm", "-f", "/run/ksr.part")
        for ds in (a, b, d, e, f, g):
            n.result("zfs", "receive", "-A", ds)
            for snap in ("s1", "s2", "s3"):
                n.result("zfs", "release", "imgstorage", f"{ds}@{snap}")
            n.result("zfs", "destroy", "-r", ds)


# Run in the NAS guest with the zvol names of zfs_resume_by_hand: the installed
# driver against the real tools, on a held snapshot and a resumed zvol.
DRIVER_CHECK = r"""
import sys
from imgstorage.drivers.zfs import make_zfs
from imgstorage.errors import DriverError, NotFoundError
from imgstorage.runner import Runner
src, done = sys.argv[1], sys.argv[2]
z = make_zfs(Runner())
z.hold("tank", src, "s1")
z.hold("tank", src, "s1")
assert z.holds("tank", src, "s1") == ["imgstorage"], z.holds("tank", src, "s1")
assert z.holds("tank", src, "s2") == []
for call in (lambda: z.destroy_snapshot("tank", src, "s1"), lambda: z.destroy("tank", src)):
    try:
        call()
    except NotFoundError as exc:
        raise AssertionError(f"held: {exc}")
    except DriverError as exc:
        assert "dataset is busy" in str(exc), exc
    else:
        raise AssertionError("a held snapshot was destroyed")
assert z.list_snapshots("tank", src) == ["s1", "s2"]
try:
    z.holds("tank", src, "nosuch")
    raise AssertionError("holds of a missing snapshot")
except NotFoundError:
    pass
assert z.resume_token("tank", done) is None
assert z.resume_token("tank", "nosuch") is None
z.abort_resume("tank", done)
z.abort_resume("tank", "nosuch")
z.release("tank", src, "s1")
z.release("tank", src, "s1")
z.hold("tank", src, "s1")
print("ok")
"""

# The same for a partial receive whose snapshot has been destroyed since.
RESUME_CHECK = r"""
import sys
from imgstorage.drivers.zfs import make_zfs
from imgstorage.errors import NotResumableError
from imgstorage.runner import Runner
name, token = sys.argv[1], sys.argv[2]
z = make_zfs(Runner())
assert z.resume_token("tank", name) == token
try:
    z.send_resume_size("tank", name, token)
    raise AssertionError("an estimate for a destroyed snapshot")
except NotResumableError as exc:     # the sender's verdict: start over
    assert exc.code == "not_resumable" and "no longer exists" in str(exc), exc
z.abort_resume("tank", name)
assert z.resume_token("tank", name) is None
z.abort_resume("tank", name)
print("ok")
"""


def _progress(c: KernelCluster, zvol: str, shown: str) -> float:
    row = storagemap(c).get(zvol) or {}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", str(row.get("progress") or ""))
    return float(m.group(1)) if m and row.get("state") == shown else 0.0


def _kill_nas_daemon(c: KernelCluster) -> None:
    """SIGKILL to the NAS daemon and its children (zfs send/receive), as a crash would."""
    c.nas.sh("systemctl", "kill", "--signal=KILL", DAEMON["nas"])
    wait_until("the NAS daemon gone", lambda: c.nas.result(
        "systemctl", "is-active", "--quiet", DAEMON["nas"])["rc"] != 0, timeout=60)


def _nas_log(c: KernelCluster) -> str:
    return c.nas.sh("cat", f"/var/log/imgstorage/{DAEMON['nas']}.log")


def kill_and_resume(c: KernelCluster, note: Callable[[str], None]) -> None:
    """The NAS daemon killed mid-copy and mid-pull: restarted, it resumes both from the
    receiver's token (zfs receive -s / zfs send -t), the resumed periodic pull brings the
    VM's writes home before any stop, and the NAS ends with every byte."""
    zvol = "kkill"
    image = prepare(c, zvol, 61)
    c.ok("set", "host", "zvolattr", NAS, zvol, "downloadspeed", "2000000")
    device = _throttled_sync_map(c, zvol, 2_000_000, 5)
    g = c.container
    wait_until("the copy a quarter done", lambda: _progress(c, zvol, "NAS->VM") >= 25,
               timeout=300, interval=0.2, show=lambda: storagemap(c).get(zvol))
    _kill_nas_daemon(c)
    ws = scattered(62, 16, 64 * KIB, 0, 512 * MIB)          # the VM goes on meanwhile
    g.write(device, ws)
    image.apply(ws)
    c.restart_daemon(c.nas)
    wait_until("dm linear", lambda: "linear" in g.sh("dmsetup", "table", f"{zvol}-snap"),
               timeout=600)
    log = _nas_log(c)
    started = [int(x) for x in re.findall(rf"copy of {zvol} to \S+ started \((\d+) bytes", log)]
    left = [int(x) for x in re.findall(rf"copy of {zvol} to \S+ resumed \((\d+) bytes left",
                                       log)]
    assert len(started) == 1 and len(left) == 1 and left[0] < 0.9 * started[0], (started, left)
    note(f"copy resumed with {left[0]} of {started[0]} bytes left")

    wait_state(c, zvol, "mapped")
    big = writes(63, [(100 * MIB, 16 * MIB)])
    g.write(device, big)
    image.apply(big)
    wait_until("a pull a fifth done", lambda: _progress(c, zvol, "NAS<-VM sched") >= 20,
               timeout=300, interval=0.2, show=lambda: storagemap(c).get(zvol))
    _kill_nas_daemon(c)
    c.restart_daemon(c.nas)
    wait_until("the pull resumed", lambda: f"periodic NAS<-VM sync of {zvol} resumed"
               in _nas_log(c), timeout=300)
    wait_until("the resumed pull done", lambda: f"periodic NAS<-VM sync of {zvol} done in"
               in _nas_log(c).split(f"periodic NAS<-VM sync of {zvol} resumed", 1)[1],
               timeout=300)
    # what a periodic pull brings home, before any stop
    assert_written(c, c.nas, nas_device(zvol), image, ws + big,
                   "the NAS zvol after a resumed periodic pull")
    note("pull resumed")
    unmap_zvol(c, zvol)
    wait_state(c, zvol, "unmapped", timeout=600)
    assert_holds(c, c.nas, nas_device(zvol), image, "the NAS zvol after two killed transfers")
    assert_container_clean(c, zvol)
    remove_image(c, zvol)


def tidy(c: KernelCluster) -> List[str]:
    """After a failed scenario: unmap and remove what it left, so the next one starts clean.

    Best effort, and it says what it did; a scenario that passes leaves nothing behind.
    """
    done = []
    for zvol, row in storagemap(c).items():
        if row["state"] not in ("unmapped",):
            c.rocks("remove", "host", "storagemap", NAS, zvol)
            try:
                wait_state(c, zvol, "unmapped", timeout=300)
            except AssertionError:
                done.append(f"{zvol} stays {state_of(c, zvol)}")
                continue
        proc = c.rocks("remove", "host", "storageimg", NAS, POOL, zvol)
        done.append(f"{zvol} removed" if proc.returncode == 0 else f"{zvol} kept")
    return done


def merged_status(status: str) -> bool:
    """``0 L snapshot-merge A/T M``: done when A == M."""
    fields = status.split()
    return len(fields) == 5 and int(fields[3].split("/")[0]) == int(fields[4])


SCENARIOS = [("direct-iscsi", direct_iscsi), ("sync-mode", sync_mode),
             ("stop-during-copy", stop_during_copy),
             ("busy-device", busy_device),
             ("restart-daemons", restart_daemons), ("dm-by-hand", dm_by_hand),
             ("zfs-streams-by-hand", zfs_streams_by_hand),
             ("zfs-resume-by-hand", zfs_resume_by_hand), ("kill-and-resume", kill_and_resume)]


# ------------------------------------------------------------ warm restarts
KEPT_TAG = "imgstorage-kept"


def keep_map(c: KernelCluster, zvol: str) -> str:
    """A sync map that asks the container to keep its copy after the stop."""
    lines = c.ok("add", "host", "storagemap", NAS, POOL, zvol, CONTAINER, "1", "img_sync=true",
                 f"remotepool={POOL}", "img_keep_local=true").splitlines()
    assert lines[-1] == f"/dev/mapper/{zvol}-snap", lines
    return lines[-1]


def _go_local(c: KernelCluster, zvol: str) -> None:
    g = c.container
    wait_until("dm linear", lambda: "linear" in g.sh("dmsetup", "table", f"{zvol}-snap"),
               timeout=600)
    wait_state(c, zvol, "mapped")


def _stop_and_keep(c: KernelCluster, zvol: str) -> None:
    unmap_zvol(c, zvol)
    wait_state(c, zvol, "unmapped", timeout=600)
    row = storagemap(c)[zvol]
    assert not row.get("last_error"), row
    wait_until(f"{zvol} kept on {CONTAINER}",
               lambda: (storagedev(c).get(zvol) or {}).get("status") == "kept",
               timeout=120, show=lambda: storagedev(c).get(zvol))


def _copies(c: KernelCluster, zvol: str) -> Tuple[List[str], List[int]]:
    """From the NAS daemon's log: how each NAS->VM copy started, and the bytes each sent."""
    log = _nas_log(c)
    kinds = re.findall(rf"NAS->VM copy of {zvol} to \S+ started \(\d+ bytes, (full|incremental "
                       rf"from \S+), ", log)
    sent = [int(n) for n in re.findall(rf"NAS->VM copy of {zvol} done: (\d+) bytes", log)]
    return [k.split(",")[0] for k in kinds], sent


def _held(c: KernelCluster, guest, zvol: str) -> Dict[str, List[str]]:
    """Every snapshot of ``zvol`` in ``guest`` with its hold tags."""
    out = {}
    for snap in guest.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1",
                         f"{POOL}/{zvol}").split():
        lines = guest.sh("zfs", "holds", "-H", snap).splitlines()
        out[snap] = [line.split("\t")[1] for line in lines if line.strip()]
    return out


def _rollback_by_hand(c: KernelCluster) -> None:
    """zfs rollback on a small zvol of the NAS: what it prints when later snapshots exist,
    when one of them is held, and when the snapshot is missing."""
    n = c.nas
    ds = f"{POOL}/kroll"
    try:
        n.sh("zfs", "create", "-s", "-V", "16M", ds)
        n.sh("udevadm", "settle")
        dev = f"/dev/zvol/{ds}"
        first = writes(94, [(0, MIB)])
        n.write(dev, first)
        n.sh("zfs", "snapshot", f"{ds}@s1")
        n.write(dev, writes(95, [(0, MIB)]))
        n.sh("zfs", "snapshot", f"{ds}@s2")
        n.write(dev, writes(96, [(0, MIB)]))
        def rollback(name: str, rc_ok: bool, *argv: str, note: str) -> None:
            r = c.run(n, name, "zfs", "rollback", *argv, note=note)
            assert (r["rc"] == 0) is rc_ok, f"zfs rollback {' '.join(argv)} -> {r['rc']}: " \
                                            f"{r['stderr']}"

        rollback("zfs/real_rollback_later", False, f"{ds}@s1",
                 note="zfsutils-linux 2.1.11; a later snapshot exists")
        n.sh("zfs", "hold", "someone", f"{ds}@s2")
        rollback("zfs/real_rollback_held", False, "-r", f"{ds}@s1",
                 note="the later snapshot is held")
        n.sh("zfs", "release", "someone", f"{ds}@s2")
        rollback("zfs/real_rollback_missing", False, "-r", f"{ds}@gone",
                 note="the snapshot does not exist")
        rollback("zfs/real_rollback_ok", True, "-r", f"{ds}@s1",
                 note="destroys s2 and the writes made since s1")
        snaps = n.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", ds).split()
        assert snaps == [f"{ds}@s1"], snaps
        image = Image(16 * MIB)
        image.apply(first)
        assert_holds(c, n, dev, image, "the zvol after zfs rollback -r")
    finally:
        n.result("zfs", "release", "someone", f"{ds}@s2")
        n.result("zfs", "destroy", "-r", ds)


def warm_restart(c: KernelCluster, note: Callable[[str], None]) -> None:
    """img_keep_local: the stop leaves the container's copy; the next start sends only what
    changed on the NAS meanwhile; removing the image drops the copy and the NAS's hold."""
    zvol = "kwarm"
    g, n = c.container, c.nas
    image = prepare(c, zvol, 91)
    device = keep_map(c, zvol)
    _go_local(c, zvol)
    w1 = writes(92, [(40 * MIB, 2 * MIB), (300 * MIB, 256 * KIB)])
    g.write(device, w1)
    image.apply(w1)
    _stop_and_keep(c, zvol)
    assert_holds(c, n, nas_device(zvol), image, "the NAS zvol after the first stop")
    names = g.sh("zfs", "list", "-H", "-o", "name", "-t", "all").split()
    assert f"{POOL}/{zvol}" in names and f"{POOL}/{zvol}-temp-write" not in names, names
    assert f"{zvol}-snap" not in g.sh("dmsetup", "ls"), "the dm device stayed"
    held = {s: t for s, t in _held(c, n, zvol).items() if KEPT_TAG in t}
    assert len(held) == 1, _held(c, n, zvol)
    base = next(iter(held))
    there = list(_held(c, g, zvol))
    assert f"{POOL}/{zvol}@{base.split('@')[1]}" in there, (base, there)
    c.rec(n, "zfs/real_get_guid", "zfs", "get", "-Hp", "-o", "value", "guid", base,
          note="zfsutils-linux 2.1.11; the snapshot a container keeps a copy of")
    c.rec(g, "zfs/real_get_guid_received", "zfs", "get", "-Hp", "-o", "value", "guid", base,
          note="the same snapshot received on the container")
    guid = n.sh("zfs", "get", "-Hp", "-o", "value", "guid", base).strip()
    assert guid.isdigit() and g.sh("zfs", "get", "-Hp", "-o", "value", "guid",
                                   base).strip() == guid, guid
    c.rec(n, "zfs/real_get_guid_missing", "zfs", "get", "-Hp", "-o", "value", "guid",
          f"{POOL}/{zvol}@gone", note="the snapshot does not exist")
    c.rec(n, "zfs/real_holds_kept", "zfs", "holds", "-H", base,
          note="a snapshot a container keeps a copy of")
    c.rec(n, "zfs/real_get_available", "zfs", "get", "-Hp", "-o", "value", "available", POOL,
          note="zfsutils-linux 2.1.11; bytes")
    c.rec(n, "zfs/real_get_available_missing", "zfs", "get", "-Hp", "-o", "value", "available",
          "nopool", note="no such pool")

    # the VM ran on the NAS meanwhile: a few blocks change there
    w2 = writes(93, [(64 * MIB, 128 * KIB), (700 * MIB, 128 * KIB)])
    n.write(nas_device(zvol), w2)
    image.apply(w2)
    device = keep_map(c, zvol)
    _go_local(c, zvol)
    kinds, sent = _copies(c, zvol)
    assert len(kinds) == 2 and kinds[0] == "full" and kinds[1] == f"incremental from " \
        f"{base.split('@')[1]}", kinds
    assert len(sent) == 2 and sent[1] * 10 < sent[0], sent
    note(f"second copy {sent[1]} bytes, first {sent[0]}")
    seconds = assert_holds(c, g, device, image, "the container's disk after the warm start")
    note(f"container checksum {seconds:.1f}s")
    w3 = writes(97, [(128 * MIB, MIB), (GIB - 256 * KIB, 128 * KIB)])
    g.write(device, w3)
    image.apply(w3)
    _stop_and_keep(c, zvol)
    assert_holds(c, n, nas_device(zvol), image, "the NAS zvol after the second stop")
    _rollback_by_hand(c)

    remove_image(c, zvol)
    wait_until("the kept copy gone from the container", lambda: not any(
        name.split("@")[0] in (f"{POOL}/{zvol}", f"{POOL}/{zvol}-temp-write")
        for name in g.sh("zfs", "list", "-H", "-o", "name", "-t", "all").split()),
        timeout=120, show=lambda: g.sh("zfs", "list", "-H", "-o", "name", "-t", "all"))
    assert zvol not in storagedev(c), storagedev(c)
    left = n.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", POOL).split()
    tags = {s: n.sh("zfs", "holds", "-H", s) for s in left}
    assert not any(KEPT_TAG in t for t in tags.values()), tags
    assert_container_clean(c, zvol)


SCENARIOS.append(("warm-restart", warm_restart))
