"""Daemons killed with SIGKILL while a sync map is being unmapped: nothing is lost.

The final pull cut by a killed NAS or container, and the flush of the VM's
writes back into the NAS disk cut by a killed NAS (back before or after the
container finished) or container.  The same method as test_kill_sync.py, a
cluster of its own.
"""
from __future__ import annotations

import random
import subprocess

import pytest

from imgstorage.simcluster import ENTRY, PYTHON

from .sync_helpers import (FAST, KIB, MIB, NAS, REGION, SLOW, assert_container_clean,
                           assert_nas_holds, diagnose, do_writes, kill, log_of, nas_row,
                           phase_writes, prepare_zvol, set_zvolattr, sim, storagedev,
                           sync_cluster_body, sync_map, unmap, vm_state, wait_nas_state,
                           wait_until)

BASE = 3 * MIB


@pytest.fixture(scope="module")
def kc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "killunmap")


@pytest.mark.parametrize("victim", ["nas", "container"])
def test_a_final_pull_cut_by_a_killed_daemon_completes(kc, victim):
    c, zvol, host = kc, f"kill-final-{victim}", FAST
    node = NAS if victim == "nas" else host
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=15)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = sync_map(c, zvol, host)
    wait_nas_state(c, zvol, "local")
    do_writes(c, host, dev, image, [(0, rng.randbytes(REGION))] + phase_writes(rng, 4))
    unmap(c, zvol)                                   # answers at once; the pull follows
    wait_until(f"{zvol} in final_pull", lambda: nas_row(c, zvol)["state"] in ("final_pull",
                                                                              "unmapped"))
    kill(c, node)
    c.start([node])
    wait_nas_state(c, zvol, "unmapped", timeout=90)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, host, zvol)


def start_unmap(c, zvol: str, timeout: int) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", ENTRY["rocks"], "remove", "host", "storagemap", NAS,
                             zvol, f"timeout={timeout}"], env=c.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize("victim", ["nas", "nas-back-late", "container"])
def test_an_unmap_cut_by_a_killed_daemon_is_finished(kc, victim):
    """The VM's writes still in the container's temp-write zvol are flushing back into
    the NAS disk (slowly) when a daemon dies.  A NAS back after the container finished
    finishes the unmap itself; otherwise the operator's second unmap does."""
    c, zvol, host = kc, f"kill-unmap-{victim}", SLOW
    node = host if victim == "container" else NAS
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, BASE, seed=16)
    set_zvolattr(c, zvol, "uploadspeed", 50000)        # the copy never gets far
    dev = sync_map(c, zvol, host)
    do_writes(c, host, dev, image, phase_writes(rng, 4, big=MIB // 2, zeros=True))
    # The flush takes about 6 s; when the NAS comes back late, the container must finish it
    # within the time the caller gave the unmap.
    waiting = start_unmap(c, zvol, timeout=20 if victim == "nas-back-late" else 8)
    wait_until(f"{zvol} flushing on {host}", lambda: vm_state(c, host, zvol) == "flushing",
               show=lambda: diagnose(c, zvol))
    assert nas_row(c, zvol)["state"] == "unmapping"
    kill(c, node)
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode != 0 and b"Traceback" not in err, err
    assert len(err.decode().strip().splitlines()) == 1, err
    if victim == "nas-back-late":
        wait_until(f"{host} done with {zvol}", lambda: vm_state(c, host, zvol) is None,
                   show=lambda: diagnose(c, zvol))
    c.start([node])
    if victim == "nas-back-late":
        assert nas_row(c, zvol)["state"] == "unmapped", diagnose(c, zvol)
        assert f"zvol {zvol} was being unmapped when the daemon stopped; {host} had finished" \
            in log_of(c, NAS)
    # a restarted NAS finishes the unmap if the container did its part meanwhile; else the
    # zvol is back where the unmap began, nothing destroyed, and the operator asks again
    again = wait_nas_state(c, zvol, "uploading", "unmapped") == "uploading"
    if victim != "nas":
        assert again == (victim == "container")
    if again:
        wait_until("the unmap to go through",
                   lambda: start_unmap(c, zvol, timeout=30).wait() == 0,
                   timeout=120, interval=1.0, show=lambda: diagnose(c, zvol))
    wait_nas_state(c, zvol, "unmapped")
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, host, zvol)
    assert storagedev(c, host).get(zvol) is None
    assert sim(c, host, "zfs", "list", "--host", host).returncode == 0
