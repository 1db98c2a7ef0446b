"""Sync mode end to end: the VM's writes in every phase end up on the NAS, byte for byte.

One cluster for the module: compute-0-3 merges slowly (so a test can write
while its dm snapshot-merge runs), vm-container-0-14 at the simulation's
normal speed.  Each test uses its own zvol, written first with a pattern on
the NAS, and keeps the image the disk must hold in memory.
"""
from __future__ import annotations

import random
import re
import time

import pytest

from imgstorage.syncsnaps import taken_at

from .sync_helpers import (FAST, GIB, KIB, MIB, NAS, POOL, REGION, SLOW, assert_container_clean,
                           diagnose, do_writes, log_of, measure_transfer, median, nas_row,
                           nas_state, phase_writes, prepare_zvol, read, read_nas, set_zvolattr,
                           storagedev, sync_cluster_body, sync_map, target_of, unmap,
                           unmap_and_check, vm_state, wait_dev_status, wait_display, wait_local,
                           wait_nas_state, wait_until, write, write_between_pulls)

BASE = 3 * MIB                  # the NAS pattern a throttled copy has to move


@pytest.fixture(scope="module")
def sync_cluster(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "cluster")


# --------------------------------------------------------------- 1
def test_writes_in_every_phase_reach_the_nas(sync_cluster):
    c, zvol, host = sync_cluster, "allphases", SLOW
    rng = random.Random(1001)
    image, tail = prepare_zvol(c, zvol, host, BASE, seed=1)
    # the copy lasts about 30 s: time for eight writes even on a machine busy with other tests
    set_zvolattr(c, zvol, "uploadspeed", 110000)
    dev = sync_map(c, zvol, host)
    assert storagedev(c, host)[zvol]["status"] == "snapshot"

    # at once, before the copy got anywhere; the 1 MiB write keeps the merge busy for seconds
    do_writes(c, host, dev, image, phase_writes(rng, 4, big=MIB, zeros=True))
    assert nas_state(c, zvol) == "uploading"
    assert vm_state(c, host, zvol) == "snapshot"

    # while the NAS copies the zvol to the container
    row = wait_display(c, zvol, "NAS->VM")
    assert (row["host"], row["zpool"], row["target"]) == (host, POOL, target_of(zvol)), row
    assert vm_state(c, host, zvol) == "snapshot"
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    assert nas_state(c, zvol) == "uploading", "the copy ended before the writes did"
    assert read(c, host, dev, 0, REGION) == image.bytes()

    # while the container merges the VM's writes into its copy
    dev_row = wait_dev_status(c, host, zvol, "snapshot-merge")
    assert dev_row["is started"] == 1, dev_row
    assert re.fullmatch(r"\d+/\d+ \d+( \(\d+%\))?", dev_row["synced"] or ""), dev_row
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    assert vm_state(c, host, zvol) == "merging", "the merge ended before the writes did"
    assert read(c, host, dev, 0, REGION) == image.bytes()

    # on the local copy alone
    wait_local(c, host, zvol)
    do_writes(c, host, dev, image, phase_writes(rng, 6, zeros=True))
    assert read(c, host, dev, 0, REGION) == image.bytes()

    unmap_and_check(c, host, zvol, image, tail)


# --------------------------------------------------------------- 3
def test_the_nas_misses_only_the_writes_after_the_last_pull(sync_cluster):
    c, zvol, host = sync_cluster, "lostcopy", FAST
    rng = random.Random(3003)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=3)
    set_zvolattr(c, zvol, "frequency", 2)
    set_zvolattr(c, zvol, "downloadspeed", 200000)       # B needs about 2 s to come home
    mapped_at = time.time()
    dev = sync_map(c, zvol, host)
    wait_local(c, host, zvol)
    # safe on the NAS: everything up to the map (the VM wrote nothing before it)
    first = nas_row(c, zvol)["recovery_point"]
    assert mapped_at - 1 <= first <= time.time(), (mapped_at, first)

    a = [(MIB + 100, rng.randbytes(5000)), (MIB + 8192 - 300, rng.randbytes(600)),
         (MIB + 64 * KIB, rng.randbytes(4096)), (200 * KIB + 7, rng.randbytes(777))]
    before_a = write_between_pulls(c, zvol, host, dev, image, a)
    with_a = image.bytes()
    # a pull that started after A has come home
    after_a = wait_until("a pull after A", lambda: (lambda r: r["last_snapshot"] if (
        r["state"] == "local" and r["last_snapshot"] != before_a) else None)(nas_row(c, zvol)),
        show=lambda: diagnose(c, zvol))
    # no further pull until the NAS was read: B must be missing from it, not racing to it.
    # A pull that started in the moment before is let finish (it brings A too); it
    # schedules its successor an hour on, like the next sync set here.
    set_zvolattr(c, zvol, "frequency", 3600)
    set_zvolattr(c, zvol, "nextsync", int(time.time()) + 3600)
    row = wait_until("no pull running", lambda: (lambda r: r if r["state"] == "local" else None)(
        nas_row(c, zvol)), show=lambda: diagnose(c, zvol))
    after_a = row["last_snapshot"]
    assert after_a not in (None, before_a), diagnose(c, zvol)
    # the recovery point moved to the snapshot that brought A: no later than A's writes
    assert row["recovery_point"] == taken_at(after_a) > first, (row, first)

    b = [(MIB + 2000, rng.randbytes(3000)), (3 * MIB + 5, rng.randbytes(200000))]
    do_writes(c, host, dev, image, b)
    on_nas = read_nas(c, zvol, 0, REGION)
    assert nas_row(c, zvol)["last_snapshot"] == after_a, "another pull came in: the check is void"
    assert on_nas == with_a
    for offset, data in b:
        assert on_nas[offset:offset + len(data)] != data
    # the VM runs on, from its local copy, with A and B
    assert storagedev(c, host)[zvol]["status"] == "linear"
    assert read(c, host, dev, 0, REGION) == image.bytes()

    unmap_and_check(c, host, zvol, image, tail)


# --------------------------------------------------------------- 4
def logged_seconds(c, what: str) -> float:
    """How long the NAS's log says the last transfer matching ``what`` took."""
    found = re.findall(what + r" in ([\d.]+)s", log_of(c, NAS))
    assert found, what
    return float(found[-1])


def test_upload_and_download_speeds_are_honoured(sync_cluster):
    c, zvol, host = sync_cluster, "throttled", FAST
    rng = random.Random(4004)
    # 3.8 MB with the tail: about 3.8 s each way at 1 MB/s
    image, tail = prepare_zvol(c, zvol, host, 3 * MIB + 512 * KIB, seed=4)
    set_zvolattr(c, zvol, "uploadspeed", 1000000)
    set_zvolattr(c, zvol, "downloadspeed", 1000000)
    set_zvolattr(c, zvol, "frequency", 3600)              # no pull unless asked for
    dev = sync_map(c, zvol, host)

    took, rates = measure_transfer(c, zvol, "NAS->VM")
    assert rates and 500000 <= median(rates) <= 1500000, rates
    # the daemon's own clock: the listing sees a transfer only as often as it is run
    assert 2.0 <= logged_seconds(c, rf"NAS->VM copy of {zvol} done: \d+ bytes") <= 6.0, took
    wait_local(c, host, zvol)

    changed = [(4 * MIB, rng.randbytes(3 * MIB + 512 * KIB))]
    do_writes(c, host, dev, image, changed)
    set_zvolattr(c, zvol, "nextsync", int(time.time()))   # pull now
    took, rates = measure_transfer(c, zvol, "NAS<-VM sched")
    assert rates and 500000 <= median(rates) <= 1500000, rates
    wait_nas_state(c, zvol, "local")
    assert 2.0 <= logged_seconds(c, rf"periodic NAS<-VM sync of {zvol}: \d+ bytes") <= 6.0, took
    wait_nas_state(c, zvol, "local")
    # the pull brought the changes home while the VM runs on
    assert read_nas(c, zvol, 0, REGION) == image.bytes()

    unmap_and_check(c, host, zvol, image, tail)


# --------------------------------------------------------------- 5
def test_a_large_sync_map_answers_at_once_and_unmaps_clean(sync_cluster):
    c, zvol, host = sync_cluster, "bigsync", FAST
    dev = sync_map(c, zvol, host, size_gb=64)
    assert storagedev(c, host)[zvol]["size (gb)"] == 64
    assert read_nas(c, zvol, 64 * GIB - 4096, 4096) == bytes(4096)
    far = 60 * GIB + 123
    data = random.Random(5005).randbytes(10000)
    write(c, host, dev, far, data)
    assert read(c, host, dev, far, len(data)) == data

    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped")
    assert read_nas(c, zvol, far, len(data)) == data
    assert read_nas(c, zvol, 0, MIB) == bytes(MIB)
    assert_container_clean(c, host, zvol)
