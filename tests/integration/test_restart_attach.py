"""A VM-container daemon killed with SIGKILL while it attaches a disk: the map is undone.

A module of its own: its cluster needs a broker vhost no other cluster uses.
"""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import time

import pytest

from imgstorage.simcluster import ENTRY, PYTHON

from .conftest import ok, registered_cluster
from .test_restart import nas_row



@pytest.fixture(scope="module")
def slow_disks(tmp_path_factory, vhost):
    """compute-0-3's kernel takes 30 s to attach a logged-in disk."""
    yield from registered_cluster(tmp_path_factory, vhost, "slowdisk",
                                  node_env={"compute-0-3": {"IMGSTORAGE_SIM_DISK_DELAY": "30"}})


def vm_rows(cluster, host):
    db = sqlite3.connect(cluster.db_path(host))
    try:
        return db.execute("SELECT zvol, state FROM vm_zvols").fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("sync", [False, True])
def test_container_killed_while_attaching_undoes_the_attach(slow_disks, sync):
    c, host, zvol = slow_disks, "compute-0-3", f"attach-{'sync' if sync else 'direct'}"
    extra = ["img_sync=true", "remotepool=tank"] if sync else []
    proc = subprocess.Popen([PYTHON, "-c", ENTRY["rocks"], "add", "host", "storagemap", "nas-0-0",
                             "tank", zvol, host, "1", "timeout=6", *extra],
                            env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 40
    while vm_rows(c, host) != [(zvol, "attaching")]:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the container never started attaching: {vm_rows(c, host)} "
                                 f"{proc.communicate()} {c.tail(host, 10)}")
        time.sleep(0.05)
    sessions = c.run("sim", "iscsi", "sessions", "--host", host, node=host)
    assert f"nas-0-0-{zvol}" in sessions.stdout.decode()
    c.stop(host, sig=signal.SIGKILL)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"Traceback" not in err, err
    c.start([host])
    # the restarted container undid its half of the map, the NAS rolled back its own
    assert vm_rows(c, host) == []
    assert f"nas-0-0-{zvol}" not in c.run("sim", "iscsi", "sessions", "--host", host,
                                          node=host).stdout.decode()
    names = c.run("sim", "zfs", "list", "--host", host, node=host).stdout.decode()
    assert f"tank/{zvol}" not in names
    deadline = time.monotonic() + 30
    while nas_row(c, zvol)[0][0] != "unmapped":
        assert time.monotonic() < deadline, nas_row(c, zvol)
        time.sleep(0.1)
    assert nas_row(c, zvol) == (("unmapped", None, None), [])
    # and the zvol maps again, to a container with a quick kernel
    ok(c.rocks("add", "host", "storagemap", "nas-0-0", "tank", zvol, "vm-container-0-14", "1"))
    ok(c.rocks("remove", "host", "storagemap", "nas-0-0", zvol))
