"""Warm restarts: a container keeps its copy after the VM stopped (``img_keep_local``).

One cluster for the module, the NAS and two containers as in test_sync.py.
Between two runs of a VM the NAS's disk changes the way it does on a real
cluster: the VM ran on the NAS directly, or on the other container.  Every
check is byte for byte against what the disk must hold, and the NAS's log
says whether a start sent the whole disk or only what changed.
"""
from __future__ import annotations

import random
import re

import pytest

from .conftest import fails, ok
from .sync_helpers import (FAST, KIB, MIB, NAS, POOL, REGION, SLOW, TAIL_AT, TAIL_LEN,
                           assert_nas_holds, diagnose, do_writes, log_of, nas_device, nas_row,
                           prepare_zvol, random_writes, read, read_nas, sim, storagedev,
                           sync_cluster_body, unmap, vm_row, wait_dev_status, wait_local,
                           wait_nas_state, wait_until, write, zfs_names)

CHANGE = 128 * KIB              # one ZFS block of the disk changed on the NAS


@pytest.fixture(scope="module")
def wc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "warm")


def keep_map(c, zvol: str, host: str, pool: str = POOL) -> str:
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, "1", "img_sync=true",
                     f"remotepool={pool}", "img_keep_local=true"))
    assert out.splitlines()[-1] == f"/dev/mapper/{zvol}-snap", out
    return f"/dev/mapper/{zvol}-snap"


def stop(c, zvol: str, host: str) -> None:
    """Unmap; the final pull comes home and the container keeps its copy."""
    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped")
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    wait_until(f"{zvol} kept on {host}",
               lambda: (vm_row(c, host, zvol) or {}).get("state") == "kept",
               show=lambda: diagnose(c, zvol))


def running_locally(c, host: str, zvol: str) -> None:
    """The VM runs from the container's copy (in any pool)."""
    wait_dev_status(c, host, zvol, "linear")
    wait_nas_state(c, zvol, "local")


def copies(c, zvol: str):
    """The NAS's log of each NAS->VM copy of ``zvol``: (how it started, bytes sent)."""
    text = log_of(c, NAS)
    kinds = re.findall(rf"NAS->VM copy of {zvol} to \S+ started \(\d+ bytes, (full|incremental "
                       rf"from \S+), the copy kept there|NAS->VM copy of {zvol} to \S+ started "
                       rf"\(\d+ bytes, (full)", text)
    sent = [int(n) for n in re.findall(rf"NAS->VM copy of {zvol} done: (\d+) bytes", text)]
    return [a or b for a, b in kinds], sent


def change_on_nas(c, zvol: str, image, rng: random.Random) -> None:
    """The VM ran on the NAS meanwhile: one block of its disk changed there."""
    offset = CHANGE * rng.randrange(REGION // CHANGE)
    data = rng.randbytes(CHANGE)
    write(c, NAS, nas_device(zvol), offset, data)
    image.apply([(offset, data)])


def test_a_restart_on_the_same_container_copies_only_what_changed(wc):
    c, zvol, host = wc, "warmsame", FAST
    rng = random.Random(7001)
    image, tail = prepare_zvol(c, zvol, host, 2 * MIB, seed=71)
    dev = keep_map(c, zvol, host)
    wait_local(c, host, zvol)
    do_writes(c, host, dev, image, random_writes(rng, 6))
    stop(c, zvol, host)
    assert_nas_holds(c, zvol, image, tail)
    # listed as kept, with its age; the copy and nothing else stays on the container
    row = storagedev(c, host)[zvol]
    assert (row["status"], row["lvm"], row["block dev"]) == ("kept", None, None), row
    assert re.fullmatch(r"\d+:\d\d:\d\d", row["time"] or ""), row
    names = zfs_names(c, host)
    assert f"{POOL}/{zvol}" in names and f"{POOL}/{zvol}-temp-write" not in names, names
    status = ok(sim(c, host, "dmsetup", "status", "--host", host))
    assert f"{zvol}-snap" not in status

    # both daemons restart in between: the kept copy and the NAS's hold survive
    for node in (host, NAS):
        c.stop(node)
        c.start([node])
    change_on_nas(c, zvol, image, rng)
    dev = keep_map(c, zvol, host)
    wait_local(c, host, zvol)
    kinds, sent = copies(c, zvol)
    assert kinds[0] == "full" and kinds[-1].startswith("incremental from "), kinds
    assert sent[-1] < 2 * CHANGE < sent[0], sent
    assert read(c, host, dev, 0, REGION) == image.bytes()
    assert read(c, host, dev, TAIL_AT, TAIL_LEN) == tail
    do_writes(c, host, dev, image, random_writes(rng, 4))
    stop(c, zvol, host)
    assert_nas_holds(c, zvol, image, tail)


def test_a_restart_elsewhere_and_back_still_copies_only_the_changes(wc):
    c, zvol = wc, "warmaway"
    rng = random.Random(7002)
    image, tail = prepare_zvol(c, zvol, FAST, 2 * MIB, seed=72)
    keep_map(c, zvol, FAST)
    wait_local(c, FAST, zvol)
    stop(c, zvol, FAST)
    dev = keep_map(c, zvol, SLOW)                         # nothing kept there: a full copy
    wait_local(c, SLOW, zvol)
    do_writes(c, SLOW, dev, image, random_writes(rng, 6))
    stop(c, zvol, SLOW)
    dev = keep_map(c, zvol, FAST)
    wait_local(c, FAST, zvol)
    kinds, sent = copies(c, zvol)
    assert kinds == ["full", "full", kinds[2]] and kinds[2].startswith("incremental"), kinds
    assert sent[2] < sent[1], sent
    assert read(c, FAST, dev, 0, REGION) == image.bytes()
    stop(c, zvol, FAST)
    assert_nas_holds(c, zvol, image, tail)


def test_without_a_shared_snapshot_the_kept_copy_goes_and_a_full_copy_runs(wc):
    c, zvol, host = wc, "warmlost", FAST
    rng = random.Random(7003)
    image, tail = prepare_zvol(c, zvol, host, 2 * MIB, seed=73)
    keep_map(c, zvol, host)
    wait_local(c, host, zvol)
    stop(c, zvol, host)
    snap = vm_row(c, host, zvol)["kept_snapshot"]
    # an administrator lets go of the NAS's snapshot and destroys it
    ref = f"{POOL}/{zvol}@{snap}"
    for tag in ("imgstorage", "imgstorage-kept"):
        ok(sim(c, NAS, "zfs", "release", "--host", NAS, tag, ref))
    ok(sim(c, NAS, "zfs", "destroy", "--host", NAS, ref))
    change_on_nas(c, zvol, image, rng)
    dev = keep_map(c, zvol, host)
    wait_local(c, host, zvol)
    kinds, _sent = copies(c, zvol)
    assert kinds == ["full", "full"], kinds
    assert "is gone here" in log_of(c, NAS)
    assert read(c, host, dev, 0, REGION) == image.bytes()
    stop(c, zvol, host)
    assert_nas_holds(c, zvol, image, tail)


def test_removing_the_zvol_destroys_its_kept_copies(wc):
    c, zvol = wc, "warmgone"
    prepare_zvol(c, zvol, FAST, 256 * KIB, seed=74)
    for host in (FAST, SLOW):
        keep_map(c, zvol, host)
        wait_local(c, host, zvol)
        stop(c, zvol, host)
    assert all(storagedev(c, h)[zvol]["status"] == "kept" for h in (FAST, SLOW))
    out = ok(c.rocks("remove", "host", "storageimg", NAS, POOL, zvol))
    assert out.splitlines()[-1] == "Success"
    for host in (FAST, SLOW):
        assert zvol not in storagedev(c, host)
        assert f"{POOL}/{zvol}" not in zfs_names(c, host)
        assert vm_row(c, host, zvol) is None


def test_kept_copies_make_room_oldest_first(wc):
    c, host, pool = wc, SLOW, "small"
    # 2.5 GiB: two kept copies of 1 GiB, and no room for a third beside them
    ok(sim(c, host, "zpool", "create", "--host", host, "--size", "2560M", pool))
    zvols = ["fifo1", "fifo2", "fifo3"]
    for zvol in zvols[:2]:
        prepare_zvol(c, zvol, host, 64 * KIB, seed=75)
        keep_map(c, zvol, host, pool)
        running_locally(c, host, zvol)
        stop(c, zvol, host)
    prepare_zvol(c, "fifo3", host, 64 * KIB, seed=76)
    keep_map(c, "fifo3", host, pool)
    running_locally(c, host, "fifo3")
    dev = storagedev(c, host)
    assert "fifo1" not in dev and dev["fifo2"]["status"] == "kept", dev
    assert f"{pool}/fifo1" not in zfs_names(c, host)
    assert "pool small needs" in log_of(c, host)
    # the NAS heard of it and let go of the snapshot it held for that copy
    wait_until("the NAS forgets fifo1's kept copy",
               lambda: "fifo1: " + host + " no longer keeps a copy" in log_of(c, NAS))
    stop(c, "fifo3", host)


def test_the_attribute_reaches_the_nas_through_rocks_start_host_vm(wc):
    c, host = wc, FAST
    out = ok(c.rocks("add", "host", "vm", host, "compute", "disksize=1"))
    vm = re.search(r"added VM (\S+) on physical node", out).group(1)
    zvol = f"{vm}-vol"
    ok(c.rocks("set", "host", "vm", "nas", vm, f"nas={NAS}", f"zpool={POOL}"))
    ok(c.rocks("set", "host", "attr", host, "img_sync", "true"))
    ok(c.rocks("set", "host", "attr", host, "img_keep_local", "true"))
    try:
        for run in range(2):
            out = ok(c.rocks("start", "host", "vm", vm))
            assert out.strip().endswith(f"{host}:/dev/mapper/{zvol}-snap"), out
            wait_local(c, host, zvol)
            ok(c.rocks("stop", "host", "vm", vm))
            wait_nas_state(c, zvol, "unmapped")
            assert storagedev(c, host)[zvol]["status"] == "kept"
        kinds, _sent = copies(c, zvol)
        assert kinds[0] == "full" and kinds[1].startswith("incremental"), kinds
        # the default again: the next stop destroys the copy, as it always did
        ok(c.rocks("set", "host", "attr", host, "img_keep_local", "false"))
        ok(c.rocks("start", "host", "vm", vm))
        wait_local(c, host, zvol)
        ok(c.rocks("stop", "host", "vm", vm))
        wait_nas_state(c, zvol, "unmapped")
        wait_until(f"{zvol} gone from {host}", lambda: vm_row(c, host, zvol) is None)
        assert f"{POOL}/{zvol}" not in zfs_names(c, host)
    finally:
        ok(c.rocks("set", "host", "attr", host, "img_sync", "false"))
        ok(c.rocks("remove", "host", "attr", host, "img_keep_local"))


def test_keep_local_without_sync_is_refused(wc):
    fails(wc.rocks("add", "host", "storagemap", NAS, POOL, "nosync", FAST, "1",
                   "img_sync=false", "img_keep_local=true"),
          "img_keep_local keeps a synced copy")
