"""Narrow windows on the map and final-pull paths, each hit every time.

* The final pull arrived and the NAS recorded it (``releasing``), then was
  killed before the container destroyed its copy, or after the container did
  but before its answer was recorded (a lost answer): the restarted NAS asks
  again and the zvol ends unmapped, every byte on the NAS.
* A map whose container attach is slower than the map's time: it fails with
  one line, nothing stays on the container, and the next map works.

As in test_lost_records.py, a kill is placed by rewriting the stopped NAS's
record to exactly what such a kill leaves.
"""
from __future__ import annotations

import json
import random
import signal
import sqlite3
import time

import pytest

from imgstorage.config import from_dict
from imgstorage.drivers.sim.target import read_targets
from imgstorage.messaging import RpcClient

from .conftest import fails, ok, registered_cluster
from .sync_helpers import (FAST, KIB, NAS, POOL, SLOW, assert_container_clean, assert_nas_holds,
                           diagnose, do_writes, log_of, nas_row, phase_writes, prepare_zvol,
                           read, read_nas, set_zvolattr, sim, sync_map, target_of, unmap,
                           vm_row, vm_state, wait_nas_state, wait_until)

LOGIN_DELAY = 6          # seconds a login to the NAS takes from SLOW


@pytest.fixture(scope="module")
def wc(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "windows",
                                  node_env={SLOW: {"IMGSTORAGE_SIM_LOGIN_DELAY": str(LOGIN_DELAY)}})


def restart_nas_with(c, zvol: str, **values) -> None:
    """Kill the NAS, set columns of its record as a kill at the right moment leaves them,
    start it again."""
    assert c.stop(NAS, sig=signal.SIGKILL) == -signal.SIGKILL
    columns = sorted(values)
    db = sqlite3.connect(str(c.db_path(NAS)), timeout=10)
    try:
        with db:
            db.execute("UPDATE nas_zvols SET " + ", ".join(f"{k} = ?" for k in columns)
                       + " WHERE zvol = ?", [values[k] for k in columns] + [zvol])
    finally:
        db.close()
    c.start([NAS])


def pulled_home(c, zvol: str, seed: int):
    """A sync map on FAST whose writes all came home with a periodic pull."""
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, FAST, 256 * KIB, seed=seed)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = sync_map(c, zvol, FAST)
    wait_nas_state(c, zvol, "local")
    copied = nas_row(c, zvol)["last_snapshot"]
    do_writes(c, FAST, dev, image, phase_writes(rng, 6))
    set_zvolattr(c, zvol, "nextsync", int(time.time()))          # pull now
    wait_until("a periodic pull", lambda: (lambda r: r["state"] == "local" and
                                           r["last_snapshot"] != copied)(nas_row(c, zvol)),
               show=lambda: diagnose(c, zvol))
    return image, tail


def ask_container(c, host: str, message: dict) -> dict:
    """A request to a container as the operator sends it (an administrator's user)."""
    cfg = from_dict(json.loads(c.config_path("frontend").read_text()))
    with RpcClient(cfg) as rpc:
        return rpc.request(host, message, 30)


def test_killed_after_recording_the_final_pull_the_nas_releases_the_copy(wc):
    c, zvol = wc, "win-release"
    image, tail = pulled_home(c, zvol, seed=31)
    # The NAS dies with the final pull recorded as arrived (every byte is home, as the
    # periodic pull above brought them) and before it asked the container to let go:
    # the container has let go of the device and keeps its copy for that pull.
    assert c.stop(NAS, sig=signal.SIGKILL) == -signal.SIGKILL
    assert ask_container(c, FAST, {"action": "unmap_zvol", "zvol": zvol, "sync": True})["local"]
    assert vm_state(c, FAST, zvol) == "detached_local"
    assert f"{POOL}/{zvol}" in ok(sim(c, FAST, "zfs", "list", "--host", FAST))
    c.start([NAS])
    restart_nas_with(c, zvol, state="releasing", prior_state=None)
    wait_nas_state(c, zvol, "unmapped")
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert f"zvol {zvol}: the final NAS<-VM sync had arrived; asking {FAST} again" in log_of(c, NAS)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, FAST, zvol)


def test_a_lost_release_answer_is_asked_again_and_the_zvol_ends_unmapped(wc):
    c, zvol = wc, "win-lost"
    image, tail = pulled_home(c, zvol, seed=32)
    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped")
    assert_container_clean(c, FAST, zvol)
    # The container destroyed its copy; the answer never reached the record.
    restart_nas_with(c, zvol, state="releasing", remotehost=FAST, remotepool=POOL)
    wait_nas_state(c, zvol, "unmapped")
    row = nas_row(c, zvol)
    assert (row["last_error"], row["remotehost"], row["failures"]) == (None, None, 0), row
    assert f"zvol {zvol} is home: {FAST} destroyed its copy" in log_of(c, NAS)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, FAST, zvol)


def test_a_map_slower_than_its_time_leaves_nothing_and_the_next_map_works(wc):
    c, zvol, host = wc, "win-slow-login", SLOW
    rng = random.Random(zvol)
    prepare_zvol(c, zvol, FAST, 0, seed=33)
    pattern = rng.randbytes(64 * KIB)
    ok(sim(c, NAS, "write", "--host", NAS, f"/dev/zvol/{POOL}/{zvol}", "--offset", "0",
           input=pattern))
    err = fails(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, "1",
                        "img_sync=false", "timeout=5"), "did not finish within")
    assert "iSCSI login to" in err, err
    # nothing left on the container, the NAS's zvol unmapped and no longer exported
    assert vm_row(c, host, zvol) is None
    assert target_of(zvol) not in ok(sim(c, host, "iscsi", "sessions", "--host", host))
    assert target_of(zvol) not in read_targets(c.sim_root, NAS)
    row = nas_row(c, zvol)
    assert (row["state"], row["remotehost"], row["iscsi_target"]) == ("unmapped", None, None)
    assert "did not finish within" in row["last_error"]
    # with time enough the same map works, and its device reads the NAS's bytes
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, "1",
                     "img_sync=false", "timeout=30"))
    dev = out.splitlines()[1]
    assert dev.startswith("/dev/sd"), out
    assert read(c, host, dev, 0, len(pattern)) == pattern == read_nas(c, zvol, 0, len(pattern))
    unmap(c, zvol)
    assert vm_row(c, host, zvol) is None
