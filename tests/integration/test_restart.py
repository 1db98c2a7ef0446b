"""Daemons killed with SIGKILL mid-operation: on restart the operation is rolled back or finished."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time

import pytest

from imgstorage.simcluster import ENTRY, PYTHON

from .conftest import ok, registered_cluster
from .test_storagemap import wait_for_lock


@pytest.fixture(scope="module")
def crashy(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "restart")


def nas_row(cluster, zvol):
    db = sqlite3.connect(cluster.db_path("nas-0-0"))
    try:
        return db.execute("SELECT state, remotehost, iscsi_target FROM nas_zvols WHERE zvol = ?",
                          (zvol,)).fetchone(), \
            db.execute("SELECT zvol FROM nas_locks").fetchall()
    finally:
        db.close()


def start_map(cluster, zvol: str, host: str, timeout: int) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", ENTRY["rocks"], "add", "host", "storagemap", "nas-0-0",
                             "tank", zvol, host, "1", f"timeout={timeout}"],
                            env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_lock(cluster, zvol)
    deadline = time.monotonic() + 20
    while (nas_row(cluster, zvol)[0] or ("",))[0] != "mapping":
        assert time.monotonic() < deadline, "the map never reached the mapping state"
        time.sleep(0.05)
    return proc


def test_nas_killed_during_a_map_whose_caller_gave_up_rolls_back(crashy):
    crashy.stop("vm-container-0-14")           # its queue stays: the NAS will wait for it
    slow = start_map(crashy, "crashvol", "vm-container-0-14", timeout=4)
    crashy.stop("nas-0-0", sig=signal.SIGKILL)
    _out, err = slow.communicate(timeout=30)    # the caller gives up at its timeout
    assert slow.returncode != 0 and b"did not answer" in err
    crashy.start(["nas-0-0", "vm-container-0-14"])
    # the request the broker redelivered had expired: dropped; the map was rolled back
    row, locks = nas_row(crashy, "crashvol")
    assert row == ("unmapped", None, None) and locks == []
    ok(crashy.rocks("add", "host", "storagemap", "nas-0-0", "tank", "crashvol", "compute-0-3", "1"))
    ok(crashy.rocks("remove", "host", "storagemap", "nas-0-0", "crashvol"))
    dev = json.loads(ok(crashy.rocks("list", "host", "storagedev", "vm-container-0-14",
                                     "output-format=json")))
    assert not any(d.get("zvol") == "crashvol" for d in dev)


def test_nas_killed_during_a_map_its_caller_still_waits_for_completes_it(crashy):
    crashy.stop("vm-container-0-14")
    slow = start_map(crashy, "crashvol2", "vm-container-0-14", timeout=40)
    crashy.stop("nas-0-0", sig=signal.SIGKILL)
    crashy.start(["nas-0-0", "vm-container-0-14"])
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0, err
    assert out.decode().splitlines()[1].startswith("/dev/sd")
    row, locks = nas_row(crashy, "crashvol2")
    assert row[:2] == ("mapped", "vm-container-0-14") and locks == []
    ok(crashy.rocks("remove", "host", "storagemap", "nas-0-0", "crashvol2"))
    assert nas_row(crashy, "crashvol2")[0][0] == "unmapped"



def test_a_second_nas_daemon_on_the_same_database_refuses_to_start(crashy):
    """It stops with one line before it recovers anything: the map in flight on the
    first daemon keeps its lock and its state, and completes."""
    first = crashy.procs["nas-0-0"]
    db = crashy.db_path("nas-0-0")
    crashy.stop("vm-container-0-14")           # the map waits for it, holding its lock
    slow = start_map(crashy, "twicevol", "vm-container-0-14", timeout=60)
    before = nas_row(crashy, "twicevol")
    second = subprocess.run([PYTHON, "-c", ENTRY["nas"]], env=crashy.env("nas-0-0"),
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr.decode() == (f"img-storage-nas: {db} is in use by another daemon "
                                      f"(pid {first.pid})\n")
    assert nas_row(crashy, "twicevol") == before == (("mapping", "vm-container-0-14", before[0][2]),
                                                    [("twicevol",)])
    assert first.poll() is None
    crashy.start(["vm-container-0-14"])
    out, err = slow.communicate(timeout=90)
    assert slow.returncode == 0, err
    row, locks = nas_row(crashy, "twicevol")
    assert row[:2] == ("mapped", "vm-container-0-14") and locks == []
    ok(crashy.rocks("remove", "host", "storagemap", "nas-0-0", "twicevol"))
    assert nas_row(crashy, "twicevol")[0][0] == "unmapped"
