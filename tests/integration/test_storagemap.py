"""The operator's storage commands against real daemons on the real broker."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest

from .conftest import fails, ok


def storagemap(cluster) -> dict:
    rows = json.loads(ok(cluster.rocks("list", "host", "storagemap", "nas-0-0",
                                       "output-format=json")))
    return {r["zvol"]: r for r in rows}


def test_map_list_unmap_delete(cluster):
    out = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "vol1",
                           "compute-0-3", "10"))
    lines = out.splitlines()
    assert lines[0] == "mapping  nas-0-0 : tank / vol1  on  compute-0-3"
    assert lines[1].startswith("/dev/sd")
    row = storagemap(cluster)["vol1"]
    assert row["host"] == "compute-0-3" and row["zpool"] == "tank"
    assert row["target"] == "iqn.2001-04.com.nas-0-0-vol1" and row["state"] == "mapped"

    table = ok(cluster.rocks("list", "host", "storagemap", "nas-0-0")).splitlines()
    assert table[0].split() == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME"]
    vol1 = next(line for line in table if line.startswith("vol1 "))
    assert vol1.split() == ["vol1", "compute-0-3", "tank", "iqn.2001-04.com.nas-0-0-vol1",
                            "mapped", "----"]

    dev = ok(cluster.rocks("list", "host", "storagedev", "compute-0-3")).splitlines()
    assert dev[0].split()[:3] == ["ZVOL", "LVM", "STATUS"]
    assert any(line.startswith("vol1 ") and lines[1].rsplit("/", 1)[1] in line for line in dev)

    # the zvol exists on the NAS with its size
    zfs = ok(cluster.sim("zfs", "list", "--host", "nas-0-0"))
    assert "tank/vol1" in zfs

    fails(cluster.rocks("remove", "host", "storageimg", "nas-0-0", "tank", "vol1"),
          "Error deleting zvol vol1: is mapped")

    out = ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "vol1"))
    assert out.splitlines() == ["unmapping   nas-0-0 : vol1", "Success"]
    row = storagemap(cluster)["vol1"]
    assert row["state"] == "unmapped" and row["host"] is None and row["target"] is None
    assert "vol1" not in ok(cluster.rocks("list", "host", "storagedev", "compute-0-3"))

    out = ok(cluster.rocks("remove", "host", "storageimg", "nas-0-0", "tank", "vol1"))
    assert out.splitlines() == ["removing   nas-0-0 : tank / vol1", "Success"]
    assert "vol1" not in storagemap(cluster)
    assert "tank/vol1" not in ok(cluster.sim("zfs", "list", "--host", "nas-0-0"))


def test_data_written_by_the_container_lands_on_the_nas(cluster):
    out = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "datavol",
                           "vm-container-0-14", "1"))
    bdev = out.splitlines()[1]
    pattern = bytes(range(256)) * 64
    ok(cluster.sim("write", "--host", "vm-container-0-14", bdev, "--offset", "4096",
                   input=pattern))
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "datavol"))
    got = cluster.sim("read", "--host", "nas-0-0", "/dev/zvol/tank/datavol", "--offset", "4096",
                      "--length", str(len(pattern)))
    assert got.returncode == 0 and got.stdout == pattern
    # the container lost access to the disk with the unmap
    proc = cluster.sim("read", "--host", "vm-container-0-14", bdev, "--offset", "0",
                       "--length", "1")
    assert proc.returncode != 0


def test_map_is_idempotent_for_the_same_host_and_refused_for_another(cluster):
    first = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "twice",
                             "compute-0-3", "1")).splitlines()[1]
    again = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "twice",
                             "compute-0-3", "1")).splitlines()[1]
    assert first == again
    fails(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "twice",
                        "vm-container-0-14", "1"), "already mapped to compute-0-3")
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "twice"))


def test_unmapping_an_unmapped_or_unknown_zvol(cluster):
    ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "lonely", "compute-0-3", "1"))
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "lonely"))
    fails(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "lonely"),
          "ZVol lonely is not mapped")
    fails(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "ghostvol"),
          "ZVol ghostvol not found")
    fails(cluster.rocks("remove", "host", "storageimg", "nas-0-0", "other", "lonely"),
          "is in zpool tank, not other")


def nas_state(cluster) -> tuple:
    """Everything the NAS knows: its database rows and its pool."""
    db = sqlite3.connect(cluster.db_path("nas-0-0"))
    try:
        zvols = db.execute("SELECT zvol, zpool, state, remotehost, iscsi_target FROM nas_zvols "
                           "ORDER BY zvol").fetchall()
        locks = db.execute("SELECT zvol FROM nas_locks").fetchall()
    finally:
        db.close()
    zfs = ok(cluster.sim("zfs", "list", "--host", "nas-0-0"))
    return zvols, locks, sorted(zfs.splitlines()[1:])


BAD_MAPS = [
    (["nas-0-0", "tank", "../etc", "compute-0-3", "1"], "invalid zvol name"),
    (["nas-0-0", "tank", "a/b", "compute-0-3", "1"], "invalid zvol name"),
    (["nas-0-0", "tank", "a;reboot", "compute-0-3", "1"], "invalid zvol name"),
    (["nas-0-0", "tank", "a b", "compute-0-3", "1"], "invalid zvol name"),
    (["nas-0-0", "tank", "$(id)", "compute-0-3", "1"], "invalid zvol name"),
    (["nas-0-0", "ta/nk", "vol", "compute-0-3", "1"], "invalid zpool name"),
    (["nas-0-0", "tank", "vol", "compute-0-3", "-1"], "must be a positive number"),
    (["nas-0-0", "tank", "vol", "compute-0-3", "0"], "must be a positive number"),
    (["nas-0-0", "tank", "vol", "compute-0-3", "lots"], "invalid size"),
    (["nas-0-0", "tank", "vol", "nobody-1-1", "1"], "unknown host nobody-1-1"),
    (["nas-9-9", "tank", "vol", "compute-0-3", "1"], "unknown host nas-9-9"),
    (["nas-0-0", "nopool", "vol", "compute-0-3", "1"], "no such pool 'nopool'"),
    (["nas-0-0", "tank", "vol", "compute-0-3"], "wrong number of arguments"),
]


@pytest.mark.parametrize("args,text", BAD_MAPS)
def test_bad_input_is_rejected_with_nothing_changed(cluster, args, text):
    before = nas_state(cluster)
    fails(cluster.rocks("add", "host", "storagemap", *args), text)
    assert nas_state(cluster) == before


def test_unknown_parameter_and_bad_timeout(cluster):
    fails(cluster.rocks("list", "host", "storagemap", "nas-0-0", "colour=red"), "colour")
    fails(cluster.rocks("list", "host", "storagemap", "nas-0-0", "timeout=-3"), "timeout")


def test_unregistered_node_with_no_queue(cluster):
    ok(cluster.rocks("add", "host", "nas-0-7", "appliance=nas"))
    started = time.monotonic()
    fails(cluster.rocks("list", "host", "storagemap", "nas-0-7"), "no such node: nas-0-7")
    assert time.monotonic() - started < 20


def wait_for_lock(cluster, zvol: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db = sqlite3.connect(cluster.db_path("nas-0-0"))
        try:
            if db.execute("SELECT 1 FROM nas_locks WHERE zvol = ?", (zvol,)).fetchone():
                return
        finally:
            db.close()
        time.sleep(0.05)
    raise AssertionError(f"{zvol} was never locked")


def test_busy_lock_and_a_silent_container(cluster):
    """A container whose daemon is down keeps its queue: the NAS waits, holding the lock."""
    import subprocess
    cluster.stop("vm-container-0-14")
    try:
        slow = subprocess.Popen(
            [*cluster_cmd(cluster), "add", "host", "storagemap", "nas-0-0", "tank", "busyvol",
             "vm-container-0-14", "1", "timeout=12"],
            env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_lock(cluster, "busyvol")
        fails(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "busyvol",
                            "compute-0-3", "1"), "ZVol busyvol is busy")
        fails(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "busyvol"),
              "ZVol busyvol is busy")
        out, err = slow.communicate(timeout=30)
        assert slow.returncode != 0
        assert b"vm-container-0-14 did not answer" in err, err
    finally:
        cluster.start(["vm-container-0-14"])
    # rolled back: unlocked, unmapped, no target left; the zvol can be mapped again
    row = storagemap(cluster)["busyvol"]
    assert row["state"] == "unmapped" and row["target"] is None
    ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "busyvol", "compute-0-3", "1"))
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "busyvol"))


def cluster_cmd(cluster) -> list:
    from imgstorage.simcluster import ENTRY, PYTHON
    return [PYTHON, "-c", ENTRY["rocks"]]


def test_daemon_restart_keeps_mappings(cluster):
    bdev = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "keepvol",
                            "compute-0-3", "1")).splitlines()[1]
    assert cluster.stop("nas-0-0") == 0
    assert cluster.stop("compute-0-3") == 0
    cluster.start(["nas-0-0", "compute-0-3"])
    row = storagemap(cluster)["keepvol"]
    assert (row["state"], row["host"]) == ("mapped", "compute-0-3")
    dev = json.loads(ok(cluster.rocks("list", "host", "storagedev", "compute-0-3",
                                      "output-format=json")))
    assert any(d["zvol"] == "keepvol" and d["block dev"] == bdev.rsplit("/", 1)[1] for d in dev)
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "keepvol"))
    assert storagemap(cluster)["keepvol"]["state"] == "unmapped"


def test_attributes(cluster):
    ok(cluster.rocks("set", "host", "storageattr", "nas-0-0", "downloadspeed", "1000000"))
    attrs = json.loads(ok(cluster.rocks("list", "host", "storageattr", "nas-0-0",
                                        "output-format=json")))
    assert {"attr": "downloadspeed", "value": "1000000"} in [
        {k: v for k, v in a.items() if k in ("attr", "value")} for a in attrs]
    fails(cluster.rocks("set", "host", "storageattr", "nas-0-0", "frequency", "-5"), "frequency")
    ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "attrvol", "compute-0-3", "1"))
    ok(cluster.rocks("set", "host", "zvolattr", "nas-0-0", "attrvol", "frequency", "120"))
    rows = json.loads(ok(cluster.rocks("list", "host", "zvolattr", "nas-0-0", "attrvol",
                                       "output-format=json")))
    assert rows[0]["frequency"] == 120
    fails(cluster.rocks("set", "host", "zvolattr", "nas-0-0", "attrvol", "action", "1"), "action")
    ok(cluster.rocks("set", "host", "zvolattr", "nas-0-0", "attrvol", "frequency", "none"))
    rows = json.loads(ok(cluster.rocks("list", "host", "zvolattr", "nas-0-0", "attrvol",
                                       "output-format=json")))
    assert rows[0]["frequency"] is None
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "attrvol"))
