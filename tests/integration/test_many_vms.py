"""Starting and stopping several sync-mode VMs in one command, one of them failing.

Four VMs on the two running containers and one on a container that is
registered but down (its hypervisor cannot be reached): ``rocks start host
vm`` and ``rocks stop host vm`` name all five.  The four are started, and
later stopped, as if each had its own command (its own lines, its disk copied
to the container and brought home byte for byte); the fifth fails with its
own error line and nothing of it is touched; the last line counts and names,
and the exit status says that not all went well.
"""
from __future__ import annotations

import random

import pytest

from imgstorage.drivers.sim.hypervisor import read_domains

from .conftest import ok, registered_cluster
from .sync_helpers import (KIB, NAS, POOL, assert_container_clean, read_nas, storagemap,
                           wait_local, wait_nas_state, write)

HOSTS = ("vm-container-0-14", "compute-0-3")
DOWN = "vm-container-0-15"          # registered, never started: its hypervisor does not answer


@pytest.fixture(scope="module")
def mc(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "manyvms")


def add_vm(c, container: str, index: int) -> str:
    rack, rank = container.split("-")[-2:]
    vm = f"compute-{rack}-{rank}-{index}"
    assert ok(c.rocks("add", "host", "vm", container, "compute", "disksize=1", f"name={vm}")) \
        == f"added VM {vm} on physical node {container}\n"
    ok(c.rocks("set", "host", "vm", "nas", vm, f"nas={NAS}", f"zpool={POOL}"))
    return vm


def lines(proc) -> tuple:
    return proc.stdout.decode().splitlines(), proc.stderr.decode().splitlines()


def test_start_and_stop_several_sync_vms_in_one_command(mc):
    c = mc
    ok(c.rocks("add", "host", DOWN, "appliance=vm-container"))
    for host in HOSTS + (DOWN,):
        ok(c.rocks("set", "host", "attr", host, "img_sync", "true"))
    good = {add_vm(c, host, n): host for host in HOSTS for n in (0, 1)}
    bad = add_vm(c, DOWN, 0)
    names = list(good)[:2] + [bad] + list(good)[2:]       # the failing one in the middle

    # start: four mapped in sync mode and booted, one refused before anything of it is done
    proc = c.rocks("start", "host", "vm", *names, "parallel=3")
    out, err = lines(proc)
    assert proc.returncode == 1, (out, err)
    assert sorted(out) == sorted(f"{NAS}:{vm}-vol mapped to {host}:/dev/mapper/{vm}-vol-snap"
                                 for vm, host in good.items())
    assert err[0].startswith(f"error - {bad}: cannot start VM {bad}: ")
    assert DOWN in err[0]
    assert err[1:] == [f"error - started 4 of 5 VMs, 1 failed: {bad}"]
    assert "Traceback" not in proc.stderr.decode()
    rows = storagemap(c)
    assert f"{bad}-vol" not in rows
    for vm, host in good.items():
        assert read_domains(c.sim_root, host)[vm]["state"] == "running"
        assert rows[f"{vm}-vol"]["host"] == host

    # each VM writes its own pattern while its disk is copied to its container
    patterns = {vm: random.Random(vm).randbytes(64 * KIB) for vm in good}
    for vm, host in good.items():
        write(c, host, f"/dev/mapper/{vm}-vol-snap", 0, patterns[vm])
    for vm, host in good.items():
        wait_local(c, host, f"{vm}-vol")

    # stop: each good VM's two lines together, its disk home; the down one fails alone
    proc = c.rocks("stop", "host", "vm", *names)
    out, err = lines(proc)
    assert proc.returncode == 1, (out, err)
    pairs = sorted(out[i:i + 2] for i in range(0, len(out), 2))
    assert pairs == sorted([f"stopped VM {vm} on physical node {host}",
                            f"{NAS}:{vm}-vol unmapped from {host}"] for vm, host in good.items())
    assert err[0].startswith(f"error - {bad}: cannot ask {DOWN} about VM {bad} (")
    assert err[0].endswith("add terminate=true to release its disk")
    assert err[1:] == [f"error - stopped 4 of 5 VMs, 1 failed: {bad}"]
    for vm, host in good.items():
        zvol = f"{vm}-vol"
        wait_nas_state(c, zvol, "unmapped", timeout=120)
        assert read_domains(c.sim_root, host)[vm]["state"] == "shut off"
        assert read_nas(c, zvol, 0, 64 * KIB) == patterns[vm], vm
        assert_container_clean(c, host, zvol)

    # the same VMs without the down one: all succeed, exit status 0
    good_names = list(good)
    proc = c.rocks("start", "host", "vm", *good_names)
    out, err = lines(proc)
    assert (proc.returncode, err) == (0, []), (out, err)
    assert out[-1] == "started 4 of 4 VMs" and len(out) == 5
    proc = c.rocks("stop", "host", "vm", *good_names, "parallel=2")
    out, err = lines(proc)
    assert (proc.returncode, err) == (0, []), (out, err)
    assert out[-1] == "stopped 4 of 4 VMs" and len(out) == 9
    for vm, host in good.items():
        wait_nas_state(c, f"{vm}-vol", "unmapped", timeout=120)
        assert read_nas(c, f"{vm}-vol", 0, 64 * KIB) == patterns[vm], vm
