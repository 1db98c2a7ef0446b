"""Daemons killed with SIGKILL at each state of a sync map: nothing is lost.

A NAS or a VM-container daemon is killed while its zvol is in one state of
the copy, the merge or a periodic pull, then started again (the unmap:
test_kill_unmap.py).  The simulated kernel keeps running meanwhile (the VM
goes on writing through its device), as a real one would.  Every test ends with an unmap and checks that
the NAS holds every byte the VM wrote.  Transfers cut short must resume where
they stopped, which the NAS's log says in so many words.
"""
from __future__ import annotations

import random
import re

import pika
import pytest

from .sync_helpers import (FAST, KIB, MIB, NAS, REGION, SLOW, Image, assert_container_clean,
                           assert_nas_holds, diagnose, do_writes, kill, log_of, nas_row,
                           phase_writes, prepare_zvol, read, set_zvolattr, sync_cluster_body,
                           sync_map, unmap, vm_state, wait_dev_status, wait_display,
                           wait_nas_state, wait_until, write_between_pulls)

BASE = 3 * MIB


@pytest.fixture(scope="module")
def kc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "kill")


def byte_counts(c, pattern: str):
    """The numbers a NAS log line matching ``pattern`` (one group) carries, in order."""
    return [int(m.group(1)) for m in re.finditer(pattern, log_of(c, NAS))]


def finish(c, zvol: str, host: str, image: Image, tail: bytes) -> None:
    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped")
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, host, zvol)


# ------------------------------------------------------------------ copy
@pytest.mark.parametrize("victim", ["nas", "container"])
def test_a_copy_cut_by_a_killed_daemon_resumes_where_it_stopped(kc, victim):
    c, zvol, host = kc, f"kill-copy-{victim}", FAST
    node = NAS if victim == "nas" else host
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, BASE, seed=11)
    set_zvolattr(c, zvol, "uploadspeed", 400000)           # about 8 s for the base
    dev = sync_map(c, zvol, host)
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    wait_display(c, zvol, "NAS->VM", min_progress=30)
    kill(c, node)
    if victim == "container":
        # the kernel (and the VM on it) carries on without the daemon
        do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    c.start([node])
    wait_nas_state(c, zvol, "merging", "local", timeout=90)
    started = byte_counts(c, rf"NAS->VM copy of {zvol} to \S+ started \((\d+) bytes")
    resumed = byte_counts(c, rf"NAS->VM copy of {zvol} to \S+ resumed \((\d+) bytes left")
    assert len(started) == 1 and resumed, (started, resumed)
    assert 0 < resumed[0] < 0.75 * started[0], (started, resumed)
    wait_nas_state(c, zvol, "local")
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    assert read(c, host, dev, 0, REGION) == image.bytes()
    finish(c, zvol, host, image, tail)


# ----------------------------------------------------------------- merge
def test_a_container_killed_while_merging_finishes_the_merge(kc):
    c, zvol, host = kc, "kill-merge-vm", SLOW
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=12)
    set_zvolattr(c, zvol, "uploadspeed", 30000)           # about 10 s: the writes go to temp
    dev = sync_map(c, zvol, host)
    do_writes(c, host, dev, image, phase_writes(rng, 4, big=MIB, zeros=True))
    assert nas_row(c, zvol)["state"] == "uploading", "the copy ended before the writes did"
    wait_dev_status(c, host, zvol, "snapshot-merge")
    kill(c, host)
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    c.start([host])
    wait_dev_status(c, host, zvol, "linear", timeout=90)
    wait_nas_state(c, zvol, "local")
    assert read(c, host, dev, 0, REGION) == image.bytes()
    finish(c, zvol, host, image, tail)


def purge_queue(c, node: str) -> int:
    """Throw away what waits in ``node``'s queue: the reports it would have read."""
    params = pika.URLParameters(c.broker)
    with pika.BlockingConnection(params) as conn:
        ch = conn.channel()
        return ch.queue_purge(node).method.message_count


def test_a_merge_report_lost_while_the_nas_was_down_is_noticed(kc):
    c, zvol, host = kc, "kill-merge-nas", SLOW
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=13)
    set_zvolattr(c, zvol, "uploadspeed", 30000)           # about 10 s: the writes go to temp
    dev = sync_map(c, zvol, host)
    do_writes(c, host, dev, image, phase_writes(rng, 4, big=MIB // 2, zeros=True))
    assert nas_row(c, zvol)["state"] == "uploading", "the copy ended before the writes did"
    wait_nas_state(c, zvol, "merging")
    kill(c, NAS)
    wait_until("the container's merge done", lambda: vm_state(c, host, zvol) == "local",
               timeout=90, show=lambda: diagnose(c, zvol))
    assert purge_queue(c, NAS) >= 1                  # the report, never to be read
    c.start([NAS])
    wait_nas_state(c, zvol, "local")
    assert f"zvol {zvol}: {host} finished merging but its report never arrived" in log_of(c, NAS)
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    finish(c, zvol, host, image, tail)


# ------------------------------------------------------------ periodic pull
@pytest.mark.parametrize("victim", ["nas", "container"])
def test_a_periodic_pull_cut_by_a_killed_daemon_resumes(kc, victim):
    c, zvol, host = kc, f"kill-pull-{victim}", FAST
    node = NAS if victim == "nas" else host
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=14)
    set_zvolattr(c, zvol, "frequency", 2)
    set_zvolattr(c, zvol, "downloadspeed", 800000)
    dev = sync_map(c, zvol, host)
    wait_nas_state(c, zvol, "local", "pulling")
    # more than the sender's socket buffer (4 MiB here) can hold beyond what the NAS read,
    # so a killed sender really cuts the stream
    write_between_pulls(c, zvol, host, dev, image, [(0, rng.randbytes(REGION))])
    wait_display(c, zvol, "NAS<-VM sched", min_progress=5)
    kill(c, node)
    do_writes(c, host, dev, image, phase_writes(rng, 4, zeros=True))
    c.start([node])
    wait_until("a resumed pull", lambda: re.search(
        rf"periodic NAS<-VM sync of {zvol} resumed", log_of(c, NAS)), timeout=60,
        show=lambda: diagnose(c, zvol))
    finish(c, zvol, host, image, tail)
