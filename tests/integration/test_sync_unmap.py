"""Sync mode: an unmap in any phase of a sync map brings every write home.

The unmap comes at the start, during the copy, during the merge, once the VM
runs from its local copy, and during a periodic pull.  Same cluster layout as
test_sync.py (a slow-merging and a fast container), a cluster of its own.
"""
from __future__ import annotations

import random

import pytest

from .sync_helpers import (FAST, KIB, MIB, REGION, SLOW, do_writes, nas_state, phase_writes,
                           prepare_zvol, read, set_zvolattr, sync_cluster_body, sync_map,
                           unmap_and_check, vm_state, wait_dev_status, wait_display, wait_local,
                           write_between_pulls)

BASE = 3 * MIB                  # the NAS pattern a throttled copy has to move


@pytest.fixture(scope="module")
def sync_cluster(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "unmap")


@pytest.mark.parametrize("phase,host", [
    ("start", SLOW),       # unmapped at once: the temp writes go home through iSCSI
    ("copy", SLOW),        # the copy is cancelled, the temp writes go home through iSCSI
    ("merge", SLOW),       # the merge finishes first, then a final pull
    ("local", FAST),       # a final pull of the local copy
    ("pull", FAST),        # the periodic pull is cancelled, then a final pull
])
def test_unmap_in_any_phase_brings_every_write_home(sync_cluster, phase, host):
    c, zvol = sync_cluster, f"unmap-{phase}"
    rng = random.Random(f"unmap-{phase}")
    # a throttled copy: the first writes must land in the temp-write zvol
    throttled = phase in ("start", "copy", "merge")
    image, tail = prepare_zvol(c, zvol, host, BASE if throttled else 512 * KIB, seed=2)
    if phase == "start":
        set_zvolattr(c, zvol, "uploadspeed", 100000)
    elif phase == "copy":
        set_zvolattr(c, zvol, "uploadspeed", 100000)      # cancelled by the unmap anyway
    elif phase == "merge":
        set_zvolattr(c, zvol, "uploadspeed", 500000)
    elif phase == "pull":
        set_zvolattr(c, zvol, "frequency", 2)
        set_zvolattr(c, zvol, "downloadspeed", 100000)
    dev = sync_map(c, zvol, host)
    do_writes(c, host, dev, image,
              phase_writes(rng, 4, big=MIB if phase == "merge" else 64 * KIB, zeros=True))
    if throttled:
        assert nas_state(c, zvol) == "uploading", "the copy ended before the first writes did"

    # "start": no waiting, the unmap follows at once
    if phase == "copy":
        wait_display(c, zvol, "NAS->VM")
        do_writes(c, host, dev, image, phase_writes(rng, 4))
        assert nas_state(c, zvol) == "uploading", "the copy ended before the writes did"
    elif phase == "merge":
        wait_dev_status(c, host, zvol, "snapshot-merge")
        do_writes(c, host, dev, image, phase_writes(rng, 4))
        assert vm_state(c, host, zvol) == "merging", "the merge ended before the writes did"
    elif phase in ("local", "pull"):
        wait_local(c, host, zvol)
        do_writes(c, host, dev, image, phase_writes(rng, 4))
        if phase == "pull":
            # enough changed data that the next pull lasts about ten seconds at 100 kB/s
            write_between_pulls(c, zvol, host, dev, image,
                                [(4 * MIB, rng.randbytes(MIB)), (7 * MIB + 1, rng.randbytes(999))])
            wait_display(c, zvol, "NAS<-VM sched")
            do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
            assert nas_state(c, zvol) == "pulling", "the pull ended before the writes did"
    if phase in ("merge", "local", "pull"):
        assert read(c, host, dev, 0, REGION) == image.bytes()

    unmap_and_check(c, host, zvol, image, tail, final_pull=phase not in ("start", "copy"))
