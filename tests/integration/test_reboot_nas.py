"""A NAS that reboots comes back with every disk where it was, and nothing lost.

The NAS daemon is killed with SIGKILL and its simulated kernel rebooted
(``imgstorage-sim reboot``: every iSCSI target gone, zvols and bytes kept)
while its zvols are in each state a container can find them in; the
containers' kernels keep running, with their sessions to the vanished
targets.  The restarted daemon must export the targets again by itself, the
VMs' devices must read what was written and take new writes, and every zvol
must come home byte for byte when it is unmapped.
"""
from __future__ import annotations

import random
import re

import pytest

from imgstorage.drivers.sim.target import read_targets

from .conftest import ok
from .sync_helpers import (FAST, KIB, MIB, NAS, POOL, REGION, SLOW, Image, assert_container_clean,
                           assert_nas_holds, diagnose, do_writes, kill, log_of, nas_row,
                           nas_state, phase_writes, prepare_zvol, read, set_zvolattr, sim,
                           slow_zfs, sync_cluster_body, sync_map, target_of, unmap, wait_display,
                           wait_local, wait_nas_state, wait_until, write, write_between_pulls)

BASE = 3 * MIB
SUMMARY = re.compile(r"re-exported (\d+) targets of mapped zvols in [\d.]+ s; (\d+) were present")


@pytest.fixture(scope="module")
def rc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "reboot")


def summaries(c):
    return [(int(a), int(b)) for a, b in SUMMARY.findall(log_of(c, NAS))]


def reboot_nas(c) -> None:
    """Power cut: the daemon dies at once, then the kernel forgets its targets."""
    kill(c, NAS)
    out = ok(sim(c, NAS, "reboot", "--host", NAS))
    assert out.splitlines()[-1].startswith(f"rebooted {NAS}: "), out
    assert read_targets(c.sim_root, NAS) == {}


def restart_nas(c) -> tuple:
    """Start the daemon again and return the summary its re-export logged."""
    seen = len(summaries(c))
    c.start([NAS])
    return wait_until("the NAS's re-export summary", lambda: summaries(c)[seen:],
                      timeout=30, show=lambda: log_of(c, NAS)[-2000:])[0]


def direct_map(c, zvol: str, host: str) -> str:
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, host, "1", "img_sync=false"))
    dev = out.splitlines()[1]
    assert dev.startswith("/dev/sd"), out
    return dev


def finish(c, zvol: str, host: str, image: Image, tail: bytes) -> None:
    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped", timeout=120)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, host, zvol)


def test_a_rebooted_nas_exports_every_disk_again_and_loses_nothing(rc):
    c = rc
    disks = {}          # zvol -> (host, device, image, tail, rng)

    def add(zvol, host, seed, base_len, sync, **attrs):
        image, tail = prepare_zvol(c, zvol, host, base_len, seed=seed)
        for attr, value in attrs.items():
            set_zvolattr(c, zvol, attr, value)
        dev = sync_map(c, zvol, host) if sync else direct_map(c, zvol, host)
        disks[zvol] = (host, dev, image, tail, random.Random(zvol))
        return dev

    # direct iSCSI
    dev = add("rb-direct", FAST, 21, 256 * KIB, False)
    do_writes(c, FAST, dev, disks["rb-direct"][2], phase_writes(random.Random(1), 4, zeros=True))
    # running from the container's copy, no pull due
    dev = add("rb-local", FAST, 22, 256 * KIB, True, frequency=3600)
    wait_local(c, FAST, "rb-local")
    do_writes(c, FAST, dev, disks["rb-local"][2], phase_writes(random.Random(2), 4, zeros=True))
    # the NAS->VM copy running, slowly (about a minute for the base)
    dev = add("rb-copy", FAST, 23, BASE, True, uploadspeed=50000)
    do_writes(c, FAST, dev, disks["rb-copy"][2], phase_writes(random.Random(3), 4, zeros=True))
    wait_display(c, "rb-copy", "NAS->VM", min_progress=2)
    # a periodic pull running, throttled (about 30 s for 8 MiB)
    dev = add("rb-pull", FAST, 25, 256 * KIB, True, frequency=2, downloadspeed=280000)
    wait_nas_state(c, "rb-pull", "local", "pulling")
    write_between_pulls(c, "rb-pull", FAST, dev, disks["rb-pull"][2],
                        [(0, random.Random(5).randbytes(REGION))])
    wait_display(c, "rb-pull", "NAS<-VM sched", min_progress=5)
    # last, as its window is the shortest: merging on the slow container (about 20 s)
    dev = add("rb-merge", SLOW, 24, 256 * KIB, True, uploadspeed=100000)
    do_writes(c, SLOW, dev, disks["rb-merge"][2],
              phase_writes(random.Random(4), 4, big=2 * MIB, zeros=True))
    wait_nas_state(c, "rb-merge", "merging")

    reboot_nas(c)
    states = {z: nas_state(c, z) for z in disks}
    assert states == {"rb-direct": "mapped", "rb-local": "local", "rb-copy": "uploading",
                      "rb-merge": "merging", "rb-pull": "pulling"}, diagnose(c, "rb-merge")
    # the containers' sessions survive, but I/O through a lost target fails
    host, dev = disks["rb-direct"][:2]
    assert sim(c, host, "read", "--host", host, dev, "--length", "512").returncode != 0

    exported, present = restart_nas(c)
    assert (exported, present) == (3, 0)
    log = log_of(c, NAS)
    for zvol in ("rb-direct", "rb-copy", "rb-merge"):
        assert re.search(rf"re-exported /dev/zvol/{POOL}/{zvol} as {re.escape(target_of(zvol))} "
                         r"to \S+ \(\S+, zvol \w+, CHAP\)", log), zvol
    for zvol in ("rb-local", "rb-pull"):
        assert f"/dev/zvol/{POOL}/{zvol} as" not in log

    # every VM reads what it wrote and takes new writes
    for zvol, (host, dev, image, tail, rng) in disks.items():
        assert read(c, host, dev, 0, REGION) == image.bytes(), zvol
        do_writes(c, host, dev, image, phase_writes(rng, 3, zeros=True))
        assert read(c, host, dev, 0, REGION) == image.bytes(), zvol
    # the copy and the merge go on to the end, through the re-exported targets
    wait_nas_state(c, "rb-merge", "local", timeout=120)
    assert target_of("rb-merge") not in read_targets(c.sim_root, NAS)
    for zvol, (host, dev, image, tail, _) in disks.items():
        finish(c, zvol, host, image, tail)


def test_a_nas_rebooted_during_the_final_pull_brings_the_disk_home(rc):
    c, zvol, host = rc, "rb-final", FAST
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=26)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = sync_map(c, zvol, host)
    wait_local(c, host, zvol)
    do_writes(c, host, dev, image, [(0, rng.randbytes(REGION))])
    far = rng.randbytes(32 * MIB)
    write(c, host, dev, 256 * MIB, far)
    # The final pull is never throttled and starts as soon as the unmap is answered, so
    # it could end before the reboot below; a container whose zfs commands take 1.5 s
    # each (snapshot, then send) cannot finish it first.
    slow_zfs(c, host, 1.5)
    unmap(c, zvol)
    reboot_nas(c)
    assert nas_state(c, zvol) == "final_pull", diagnose(c, zvol)
    assert restart_nas(c) == (0, 0)
    wait_nas_state(c, zvol, "unmapped", timeout=120)
    slow_zfs(c, host, None)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert read(c, NAS, f"/dev/zvol/{POOL}/{zvol}", 256 * MIB, 32 * MIB) == far
    assert_container_clean(c, host, zvol)


def test_a_nas_restarted_without_a_reboot_finds_its_targets_and_changes_nothing(rc):
    c, zvol, host = rc, "rb-restart", FAST
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=27)
    dev = direct_map(c, zvol, host)
    path = c.sim_root / NAS / "target" / "targets.json"
    before = path.read_bytes(), path.stat().st_mtime_ns
    kill(c, NAS)
    assert restart_nas(c) == (0, 1)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    do_writes(c, host, dev, image, phase_writes(random.Random(zvol), 4, zeros=True))
    finish(c, zvol, host, image, tail)
