"""A VM container that reboots gets its devices back, and nothing is lost.

The container daemons are killed with SIGKILL and their simulated kernels
rebooted (``imgstorage-sim reboot``: iSCSI sessions, dm tables and running
domains gone; zvols, the temp-write stores and every byte kept) while their
zvols are in each state: direct iSCSI, the copy running, merging, local,
a periodic pull running, and the final pull of a stopped VM.  The restarted
daemons must rebuild every device at the same path from their rows; then the
operator starts each VM again on its existing device (``rocks start host
vm``), it reads what it wrote before and takes new writes, and ``rocks stop
host vm`` brings every byte home.
"""
from __future__ import annotations

import random
import re

import pytest

from imgstorage.drivers.sim.hypervisor import read_domains

from .conftest import ok
from .sync_helpers import (FAST, KIB, MIB, NAS, POOL, REGION, SLOW, assert_container_clean,
                           assert_nas_holds, diagnose, do_writes, kill, log_of, nas_row,
                           nas_state, phase_writes, prepare_zvol, read, set_zvolattr, sim,
                           slow_zfs, storagedev, sync_cluster_body, wait_display, wait_local,
                           wait_nas_state, wait_until, write, write_between_pulls)

REBUILT = re.compile(r"rebuilt the devices of (\d+) zvol\(s\) after a restart of the host")


@pytest.fixture(scope="module")
def rc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "vmreboot")


def add_vm(c, container: str) -> str:
    out = ok(c.rocks("add", "host", "vm", container, "compute", "disksize=1"))
    name = re.search(r"added VM (\S+) on physical node", out).group(1)
    ok(c.rocks("set", "host", "vm", "nas", name, "nas=" + NAS, "zpool=" + POOL))
    return name


def start_vm(c, vm: str) -> str:
    out = ok(c.rocks("start", "host", "vm", vm))
    return re.search(r"mapped to \S+?:(/dev/\S+)", out).group(1)


def domains(c, host: str) -> dict:
    return read_domains(c.sim_root, host)


def reboot_container(c, host: str) -> None:
    kill(c, host)
    out = ok(sim(c, host, "reboot", "--host", host))
    assert out.splitlines()[-1].startswith(f"rebooted {host}: "), out


def test_rebooted_containers_rebuild_every_device_and_lose_nothing(rc):
    c = rc
    ok(c.rocks("set", "host", "attr", FAST, "img_sync", "true"))
    ok(c.rocks("set", "host", "attr", SLOW, "img_sync", "true"))
    vms = {}            # vm -> (host, zvol, device, image, tail, rng)

    def add(host, seed, base_len, **attrs):
        vm = add_vm(c, host)
        zvol = f"{vm}-vol"
        image, tail = prepare_zvol(c, zvol, host, base_len, seed=seed)
        for attr, value in attrs.items():
            set_zvolattr(c, zvol, attr, value)
        dev = start_vm(c, vm)
        assert dev == f"/dev/mapper/{zvol}-snap"
        vms[vm] = (host, zvol, dev, image, tail, random.Random(vm))
        return vm, zvol, dev, image

    # running from the container's copy, no pull due
    vm, zvol, dev, image = add(FAST, 31, 256 * KIB, frequency=3600)
    wait_local(c, FAST, zvol)
    do_writes(c, FAST, dev, image, phase_writes(random.Random(1), 4, zeros=True))
    local_vm = vm
    # a periodic pull running, throttled
    vm, zvol, dev, image = add(FAST, 32, 256 * KIB, frequency=2, downloadspeed=280000)
    wait_nas_state(c, zvol, "local", "pulling")
    write_between_pulls(c, zvol, FAST, dev, image, [(0, random.Random(2).randbytes(REGION))])
    wait_display(c, zvol, "NAS<-VM sched", min_progress=5)
    # the NAS->VM copy running, slowly
    vm, zvol, dev, image = add(FAST, 33, 3 * MIB, uploadspeed=50000)
    do_writes(c, FAST, dev, image, phase_writes(random.Random(3), 4, zeros=True))
    wait_display(c, zvol, "NAS->VM", min_progress=2)
    # merging, on the slow container
    vm, zvol, dev, image = add(SLOW, 34, 256 * KIB, uploadspeed=100000)
    do_writes(c, SLOW, dev, image, phase_writes(random.Random(4), 4, big=2 * MIB, zeros=True))
    wait_nas_state(c, zvol, "merging")
    # direct iSCSI, through the storage commands
    direct = "vr-direct"
    d_image, d_tail = prepare_zvol(c, direct, FAST, 256 * KIB, seed=35)
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, direct, FAST, "1", "img_sync=false"))
    d_dev = out.splitlines()[1]
    do_writes(c, FAST, d_dev, d_image, phase_writes(random.Random(5), 4, zeros=True))

    def devices(host):
        return {z: e["lvm"] or e["block dev"] for z, e in storagedev(c, host).items()}

    before = {host: devices(host) for host in (FAST, SLOW)}
    for host in (FAST, SLOW):
        reboot_container(c, host)
        assert not any(d["state"] == "running" for d in domains(c, host).values())
    c.start([FAST, SLOW])
    for host in (FAST, SLOW):
        wait_until(f"{host} rebuilt its devices", lambda h=host: REBUILT.search(log_of(c, h)),
                   timeout=60, show=lambda h=host: log_of(c, h)[-2000:])
        assert devices(host) == before[host], (host, devices(host), before[host])
        assert all(e["status"] != "broken" for e in storagedev(c, host).values())

    # the direct disk reads what was written, under the same name, and goes home as it is
    assert read(c, FAST, d_dev, 0, REGION) == d_image.bytes()
    do_writes(c, FAST, d_dev, d_image, phase_writes(random.Random(6), 3, zeros=True))
    ok(c.rocks("remove", "host", "storagemap", NAS, direct))
    wait_nas_state(c, direct, "unmapped")
    assert_nas_holds(c, direct, d_image, d_tail)
    assert_container_clean(c, FAST, direct)

    # every VM boots again on its existing device, reads its data, writes, stops, goes home
    for vm, (host, zvol, dev, image, tail, rng) in vms.items():
        assert start_vm(c, vm) == dev
        assert domains(c, host)[vm]["state"] == "running"
        assert read(c, host, dev, 0, REGION) == image.bytes(), vm
        do_writes(c, host, dev, image, phase_writes(rng, 3, zeros=True))
    for vm, (host, zvol, dev, image, tail, _) in vms.items():
        if vm != local_vm:
            wait_nas_state(c, zvol, "local", timeout=180)
        ok(c.rocks("stop", "host", "vm", vm))
        wait_nas_state(c, zvol, "unmapped", timeout=120)
        assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
        assert_nas_holds(c, zvol, image, tail)
        assert_container_clean(c, host, zvol)


def test_a_container_rebooted_during_the_final_pull_brings_the_disk_home(rc):
    c, host = rc, FAST
    ok(c.rocks("set", "host", "attr", host, "img_sync", "true"))
    vm = add_vm(c, host)
    zvol = f"{vm}-vol"
    image, tail = prepare_zvol(c, zvol, host, 256 * KIB, seed=36)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = start_vm(c, vm)
    wait_local(c, host, zvol)
    rng = random.Random(zvol)
    do_writes(c, host, dev, image, [(0, rng.randbytes(REGION))])
    far = rng.randbytes(32 * MIB)
    write(c, host, dev, 256 * MIB, far)
    # The final pull is never throttled, so it could end before the reboot below; a
    # container whose zfs commands take 1.5 s each (snapshot, then send) cannot finish
    # it first.  (A stream cut half-way: test_kill_unmap.py.)
    slow_zfs(c, host, 1.5)
    ok(c.rocks("stop", "host", "vm", vm))
    reboot_container(c, host)
    assert nas_state(c, zvol) == "final_pull", diagnose(c, zvol)
    slow_zfs(c, host, None)
    c.start([host])
    wait_nas_state(c, zvol, "unmapped", timeout=180)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert read(c, NAS, f"/dev/zvol/{POOL}/{zvol}", 256 * MIB, 32 * MIB) == far
    assert_container_clean(c, host, zvol)
