"""The broker stopped and started again: daemons reconnect, the CLI never hangs.

This module stops the whole local broker for a few seconds; it uses a cluster
of its own, and the other modules' clusters are torn down before it starts
(all cluster fixtures are module-scoped).
"""
from __future__ import annotations

import sqlite3
import subprocess
import time

import pytest

from imgstorage.simcluster import ENTRY, PYTHON

from .conftest import ok, registered_cluster
from .test_storagemap import storagemap, wait_for_lock


def broker(action: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", action], check=True, capture_output=True, timeout=120)
    if action == "start_app":
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, capture_output=True,
                       timeout=120)


@pytest.fixture(scope="module")
def outage_cluster(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "outage")


def locks(cluster) -> list:
    db = sqlite3.connect(cluster.db_path("nas-0-0"))
    try:
        return db.execute("SELECT zvol FROM nas_locks").fetchall()
    finally:
        db.close()


def one_error_line(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_daemons_reconnect_and_the_cli_fails_cleanly_meanwhile(outage_cluster):
    c = outage_cluster
    broker("stop_app")
    try:
        started = time.monotonic()
        err = one_error_line(c.rocks("list", "host", "storagemap", "nas-0-0"))
        assert "message broker" in err
        assert time.monotonic() - started < 30
    finally:
        broker("start_app")
    for node in ("nas-0-0", "compute-0-3", "vm-container-0-14"):
        c.wait_ready(node, timeout=60)          # each daemon reconnected by itself
        assert c.procs[node].poll() is None
    ok(c.rocks("add", "host", "storagemap", "nas-0-0", "tank", "aftervol", "compute-0-3", "1"))
    ok(c.rocks("remove", "host", "storagemap", "nas-0-0", "aftervol"))


def test_a_waiting_cli_is_told_and_nothing_runs_twice(outage_cluster):
    c = outage_cluster
    c.stop("vm-container-0-14")                 # the NAS will wait on this container
    waiting = subprocess.Popen([PYTHON, "-c", ENTRY["rocks"], "add", "host", "storagemap",
                                "nas-0-0", "tank", "outvol", "vm-container-0-14", "1",
                                "timeout=30"], env=c.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        wait_for_lock(c, "outvol")
        broker("stop_app")
        started = time.monotonic()
        _out, err = waiting.communicate(timeout=60)
        assert waiting.returncode != 0
        assert b"message broker" in err and len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - started < 30
    finally:
        if waiting.poll() is None:
            waiting.kill()
        broker("start_app")
    c.start(["vm-container-0-14"])
    c.wait_ready("nas-0-0", timeout=60)
    # the interrupted map was rolled back, once; the zvol can be mapped normally
    deadline = time.monotonic() + 60
    while storagemap(c)["outvol"]["state"] != "unmapped" or locks(c):
        assert time.monotonic() < deadline, (storagemap(c)["outvol"], locks(c))
        time.sleep(0.2)
    ok(c.rocks("add", "host", "storagemap", "nas-0-0", "tank", "outvol", "compute-0-3", "1"))
    ok(c.rocks("remove", "host", "storagemap", "nas-0-0", "outvol"))
