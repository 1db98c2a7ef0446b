"""Simulated device mapper: a real copy-on-write store, merge, and the kernel's status figures."""
import os
import random

import pytest

from imgstorage.drivers.base import DeviceMapperDriver, DmStatus
from imgstorage.drivers.sim import blockdev, dm, hypervisor, initiator, target, zfs
from imgstorage.errors import DriverError, ValidationError

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 8 * KIB
SIZE = 8 * MIB
SECTORS = SIZE // 512
IQN = "iqn.2001-04.com.nas-vm-1-vol"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(dm, "policy", dm.MergePolicy(rate=0.0, clock=fake, suspend_timeout=0.0))
    return fake


@pytest.fixture
def root(tmp_path, clock):
    zfs.create_pool(tmp_path, "vm", "tank")
    local = zfs.SimZfs(tmp_path, "vm")
    local.create_zvol("tank", "origin", SIZE, sparse=True)
    local.create_zvol("tank", "cow", SIZE, sparse=True)
    return tmp_path


@pytest.fixture
def mapper(root):
    return dm.SimDeviceMapper(root, "vm")


def dev(root, path, host="vm"):
    return blockdev.open_device(root, host, path)


def snap_table(kind="snapshot", origin="/dev/zvol/tank/origin", cow="/dev/zvol/tank/cow",
               sectors=SECTORS):
    return f"0 {sectors} {kind} {origin} {cow} P 16"


def figures(mapper, name):
    (line,) = mapper.status(name)
    return line.snapshot_figures()


def expect_alloc(n):
    """dm-snapshot's accounting: header + one metadata chunk per 512 exceptions + data."""
    return (2 + n + n // 512) * 16, SECTORS, (n // 512 + 2) * 16


def switch(mapper, name, table):
    mapper.suspend(name)
    mapper.reload(name, table)
    mapper.resume(name)


def test_driver_satisfies_protocol(mapper):
    assert isinstance(mapper, DeviceMapperDriver)


def test_empty_snapshot_status_is_the_kernels(mapper):
    mapper.create("v-snap", snap_table())
    assert mapper.status() == [DmStatus("v-snap", 0, SECTORS, "snapshot", f"32/{SECTORS} 32")]
    assert mapper.exists("v-snap") and not mapper.exists("other")
    assert mapper.table("v-snap") == snap_table()


def test_writes_land_in_the_cow_and_leave_the_origin_alone(root, mapper):
    base = os.urandom(SIZE // 2)
    dev(root, "/dev/zvol/tank/origin").write(0, base)
    mapper.create("v-snap", snap_table())
    snap = dev(root, "/dev/mapper/v-snap")
    marker = os.urandom(CHUNK)
    snap.write(10 * CHUNK, marker)                               # one whole chunk
    snap.write(3 * CHUNK + 100, b"partial chunk write")            # copy-on-write of the rest
    snap.write(6 * MIB + 5, b"beyond the base image")            # over a hole of the origin
    assert figures(mapper, "v-snap") == expect_alloc(3)
    origin = dev(root, "/dev/zvol/tank/origin")
    assert origin.read(0, SIZE // 2) == base
    assert origin.read(6 * MIB, CHUNK) == bytes(CHUNK)
    chunk3 = bytearray(base[3 * CHUNK:4 * CHUNK])
    chunk3[100:119] = b"partial chunk write"
    assert snap.read(3 * CHUNK, CHUNK) == bytes(chunk3)
    assert snap.read(10 * CHUNK, CHUNK) == marker
    assert snap.read(6 * MIB, 32) == bytes(5) + b"beyond the base image" + bytes(6)
    assert snap.read(20 * CHUNK, 3 * CHUNK) == base[20 * CHUNK:23 * CHUNK]   # falls through
    cow_bytes = (root / "vm" / "zfs" / "tank" / "cow" / "data").read_bytes()
    assert marker in cow_bytes and bytes(chunk3) in cow_bytes
    assert cow_bytes[:8] == dm.MAGIC
    snap.write(10 * CHUNK + 1, b"again")                         # an existing exception
    assert figures(mapper, "v-snap") == expect_alloc(3)
    assert snap.read(10 * CHUNK, 6) == marker[:1] + b"again"


def test_unwritten_areas_stay_holes_through_a_merge(root, mapper):
    mapper.create("v-snap", snap_table())
    snap = dev(root, "/dev/mapper/v-snap")
    writes = {0: os.urandom(CHUNK), 400 * CHUNK + 17: b"middle", SIZE - 5: b"tail!"}
    for offset, data in writes.items():
        snap.write(offset, data)
    switch(mapper, "v-snap", snap_table("snapshot-merge"))
    assert mapper.merge_step("v-snap", 1000) == 3
    origin = dev(root, "/dev/zvol/tank/origin")
    image = bytearray(SIZE)
    for offset, data in writes.items():
        image[offset:offset + len(data)] = data
    assert origin.read(0, SIZE) == bytes(image)
    allocated = (root / "vm" / "zfs" / "tank" / "origin" / "data").stat().st_blocks * 512
    assert allocated <= 3 * CHUNK + 64 * KIB


def test_the_sync_workflow_end_to_end(root, mapper):
    """iSCSI origin -> writes in the COW -> copy -> snapshot-merge -> linear, byte for byte."""
    rng = random.Random(7)
    zfs.create_pool(root, "nas", "tank")
    zfs.SimZfs(root, "nas").create_zvol("tank", "vm-1-vol", SIZE, sparse=True)
    nas_vol = dev(root, "/dev/zvol/tank/vm-1-vol", "nas")
    base = bytearray(SIZE)
    base[:MIB] = rng.randbytes(MIB)
    base[5 * MIB:5 * MIB + 300000] = rng.randbytes(300000)
    nas_vol.write(0, bytes(base))
    ini = initiator.SimInitiator(root, "vm")
    target.SimTarget(root, "nas").create_target(IQN, "/dev/zvol/tank/vm-1-vol", ini.initiator_name())
    ini.login(IQN, "nas")
    local = zfs.SimZfs(root, "vm")
    local.create_zvol("tank", "vm-1-vol", SIZE)
    local.create_zvol("tank", "vm-1-vol-temp-write", SIZE, sparse=True)
    cow = "/dev/zvol/tank/vm-1-vol-temp-write"
    mapper.create("vm-1-vol-snap", snap_table(origin="/dev/sdb", cow=cow))
    assert figures(mapper, "vm-1-vol-snap") == (32, SECTORS, 32)

    snap, image, touched = dev(root, "/dev/mapper/vm-1-vol-snap"), bytearray(base), set()

    def vm_write(offset, data):
        snap.write(offset, data)
        image[offset:offset + len(data)] = data
        touched.update(range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1))

    vm_write(MIB, rng.randbytes(600 * CHUNK))                     # crosses into a second area
    vm_write(12345, b"partial write into the base image")
    vm_write(5 * MIB + 3, rng.randbytes(3 * CHUNK))
    vm_write(SIZE - 100, rng.randbytes(100))
    for _ in range(50):
        at = rng.randrange(0, SIZE - 4096)
        vm_write(at, rng.randbytes(rng.randrange(1, 4096)))
    n = len(touched)
    assert n > 600
    assert figures(mapper, "vm-1-vol-snap") == expect_alloc(n)
    assert snap.read(0, SIZE) == bytes(image)
    assert nas_vol.read(0, SIZE) == bytes(base)                  # the NAS never saw a write

    # the NAS's copy arrives on the container (zfs send | zfs receive)
    dev(root, "/dev/zvol/tank/vm-1-vol").write(0, nas_vol.read(0, SIZE))
    switch(mapper, "vm-1-vol-snap", snap_table("snapshot-merge", "/dev/zvol/tank/vm-1-vol", cow))
    (line,) = mapper.status("vm-1-vol-snap")
    assert line.target_type == "snapshot-merge"
    assert line.snapshot_figures() == expect_alloc(n)            # every exception kept
    assert snap.read(0, SIZE) == bytes(image)                    # the merged view, before merging

    seen, late = [], False
    while True:
        alloc, total, meta = figures(mapper, "vm-1-vol-snap")
        seen.append((alloc, meta))
        if alloc == meta:
            break
        if not late and len(seen) == 3:                          # the VM keeps writing meanwhile
            vm_write(MIB + 7, b"written during the merge")
            vm_write(7 * MIB + 1, b"outside the store")
            late = True
        assert mapper.merge_step("vm-1-vol-snap", 97) > 0
    assert seen[-1] == (32, 32)
    assert all(a[0] > b[0] and a[1] >= b[1] for a, b in zip(seen, seen[1:]))
    assert seen[0][1] > seen[-1][1]                              # the metadata figure shrank too
    assert mapper.merge_step("vm-1-vol-snap", 10) == 0
    assert dev(root, "/dev/zvol/tank/vm-1-vol").read(0, SIZE) == bytes(image)

    switch(mapper, "vm-1-vol-snap", f"0 {SECTORS} linear /dev/zvol/tank/vm-1-vol 0")
    assert mapper.status() == [DmStatus("vm-1-vol-snap", 0, SECTORS, "linear", "")]
    assert snap.read(0, SIZE) == bytes(image)
    local.destroy("tank", "vm-1-vol-temp-write")                 # nothing holds it any more
    ini.logout(IQN, "nas")
    vm_write(0, b"after the switch")
    assert dev(root, "/dev/zvol/tank/vm-1-vol").read(0, SIZE) == bytes(image)
    assert nas_vol.read(0, SIZE) == bytes(base)


def test_merge_progress_follows_the_clock(root, mapper, clock, monkeypatch):
    monkeypatch.setattr(dm.policy, "rate", 100.0)
    mapper.create("v-snap", snap_table())
    snap = dev(root, "/dev/mapper/v-snap")
    snap.write(0, os.urandom(300 * CHUNK))
    switch(mapper, "v-snap", snap_table("snapshot-merge"))
    assert figures(mapper, "v-snap") == expect_alloc(300)
    clock.now += 1.0
    assert figures(mapper, "v-snap") == expect_alloc(200)
    clock.now += 1.5
    assert figures(mapper, "v-snap") == expect_alloc(50)
    clock.now += 0.25
    snap.read(0, 512)                                              # I/O drives the merge too
    assert figures(mapper, "v-snap") == expect_alloc(25)
    mapper.suspend("v-snap")
    clock.now += 10.0
    assert figures(mapper, "v-snap") == expect_alloc(25)         # no merging while suspended
    mapper.resume("v-snap")
    assert figures(mapper, "v-snap") == expect_alloc(25)         # and no credit for the pause
    clock.now += 0.1
    assert figures(mapper, "v-snap") == expect_alloc(15)
    clock.now += 3600
    assert figures(mapper, "v-snap") == (32, SECTORS, 32)
    assert dm.SimDeviceMapper(root, "vm").status("v-snap")[0].args == f"32/{SECTORS} 32"


def test_io_on_a_suspended_device_waits_for_resume(root, mapper):
    mapper.create("v-snap", snap_table())
    snap = dev(root, "/dev/mapper/v-snap")
    mapper.suspend("v-snap")
    assert snap.size == SIZE                                       # size is answered at once
    with pytest.raises(blockdev.DeviceIOError, match="suspended"):
        snap.read(0, 10)
    mapper.resume("v-snap")
    assert snap.read(0, 10) == bytes(10)


def test_the_store_is_persistent_across_remove_and_create(root, mapper):
    mapper.create("v-snap", snap_table())
    snap = dev(root, "/dev/mapper/v-snap")
    data = os.urandom(5 * CHUNK)
    snap.write(CHUNK, data)
    other = dm.SimDeviceMapper(root, "vm")                         # another process, same state
    assert other.status() == mapper.status()
    mapper.remove("v-snap")
    assert not other.exists("v-snap")
    other.create("v-snap", snap_table())
    assert figures(other, "v-snap") == expect_alloc(5)
    assert dev(root, "/dev/mapper/v-snap").read(CHUNK, 5 * CHUNK) == data
    assert dev(root, "/dev/zvol/tank/origin").read(CHUNK, 5 * CHUNK) == bytes(5 * CHUNK)


def test_a_full_cow_invalidates_the_snapshot(root, mapper):
    zfs.SimZfs(root, "vm").create_zvol("tank", "tiny", 128 * KIB, sparse=True)   # 16 chunks
    mapper.create("v-snap", snap_table(cow="/dev/zvol/tank/tiny"))
    assert mapper.status("v-snap")[0].args == "32/256 32"
    snap = dev(root, "/dev/mapper/v-snap")
    for i in range(14):                                            # header + area + 14 data
        snap.write(i * CHUNK, b"x")
    assert mapper.status("v-snap")[0].args == "256/256 32"
    with pytest.raises(blockdev.DeviceIOError, match="full"):
        snap.write(20 * CHUNK, b"y")
    assert mapper.status("v-snap")[0].args == "Invalid"
    assert mapper.status("v-snap")[0].snapshot_figures() is None
    with pytest.raises(blockdev.DeviceIOError, match="invalid"):
        snap.read(0, 1)
    with pytest.raises(DriverError, match="cannot merge"):
        mapper.reload("v-snap", snap_table("snapshot-merge", cow="/dev/zvol/tank/tiny"))


def test_linear_maps_with_an_offset(root, mapper):
    dev(root, "/dev/zvol/tank/origin").write(MIB, b"one MiB in")
    mapper.create("lin", "0 2048 linear /dev/zvol/tank/origin 2048")
    lin = dev(root, "/dev/mapper/lin")
    assert lin.size == MIB
    assert lin.read(0, 10) == b"one MiB in"
    lin.write(MIB - 4, b"last")
    assert dev(root, "/dev/zvol/tank/origin").read(2 * MIB - 4, 4) == b"last"
    with pytest.raises(blockdev.DeviceIOError, match="beyond the end"):
        lin.write(MIB - 3, b"last")
    assert mapper.status("lin") == [DmStatus("lin", 0, 2048, "linear", "")]
    assert mapper.table("lin") == "0 2048 linear /dev/zvol/tank/origin 2048"


@pytest.mark.parametrize("table,why", [
    ("0 100 striped /dev/zvol/tank/origin 0", "Invalid argument (unknown target type 'striped')"),
    ("0 abc linear /dev/zvol/tank/origin 0", "invalid length"),
    ("0 0 linear /dev/zvol/tank/origin 0", "invalid length"),
    ("0 \u00b2 linear /dev/zvol/tank/origin 0", "invalid length"),
    ("0 100 linear /dev/zvol/tank/origin -1", "linear needs"),
    ("8 100 linear /dev/zvol/tank/origin 0", "start at sector 0"),
    ("0 100 linear /dev/zvol/tank/origin", "linear needs"),
    ("0 100 linear /dev/zvol/tank/missing 0", "No such device or address"),
    ("0 100 linear /etc/passwd 0", "No such device"),
    (f"0 {SECTORS + 1} linear /dev/zvol/tank/origin 0", "too small for target"),
    (f"0 {SECTORS} linear /dev/zvol/tank/origin 1", "too small for target"),
    (snap_table(sectors=SECTORS * 2), "too small for target"),
    ("0 100 snapshot /dev/zvol/tank/origin /dev/zvol/tank/cow N 16", "only persistent"),
    ("0 100 snapshot /dev/zvol/tank/origin /dev/zvol/tank/cow P 12", "invalid chunk size"),
    ("0 100 snapshot /dev/zvol/tank/origin /dev/zvol/tank/origin P 16", "different devices"),
    ("0 100 snapshot /dev/zvol/tank/origin /dev/zvol/tank/cow", "needs"),
    ("", "exactly one target line"),
    ("0 10 linear /dev/zvol/tank/origin 0\n10 10 linear /dev/zvol/tank/origin 10",
     "exactly one target line"),
])
def test_bad_tables_are_refused_like_dmsetup(root, mapper, table, why):
    with pytest.raises(DriverError) as err:
        mapper.create("x", table)
    assert str(err.value).startswith("device-mapper: create ioctl on x failed: ")
    assert why in str(err.value)
    assert not mapper.exists("x") and mapper.status() == []
    assert (root / "vm" / "zfs" / "tank" / "cow" / "data").stat().st_blocks == 0


def test_control_errors(root, mapper):
    mapper.create("v-snap", snap_table())
    with pytest.raises(DriverError, match=r"^device-mapper: create ioctl on v-snap failed: "
                                          r"Device or resource busy$"):
        mapper.create("v-snap", snap_table())
    for call in (lambda: mapper.reload("ghost", snap_table()), lambda: mapper.suspend("ghost"),
                 lambda: mapper.resume("ghost"), lambda: mapper.remove("ghost"),
                 lambda: mapper.table("ghost")):
        with pytest.raises(DriverError, match="ghost failed: No such device or address"):
            call()
    with pytest.raises(DriverError, match="ghost does not exist"):
        mapper.status("ghost")
    with pytest.raises(DriverError, match="cannot map onto itself"):
        mapper.reload("v-snap", "0 100 linear /dev/mapper/v-snap 0")
    with pytest.raises(ValidationError):
        mapper.create("../evil", snap_table())
    with pytest.raises(ValidationError):
        mapper.create("a b", snap_table())


def test_a_corrupt_cow_is_refused(root, mapper):
    dev(root, "/dev/zvol/tank/cow").write(0, b"garbage!" + bytes(100))
    with pytest.raises(DriverError, match="invalid or corrupt snapshot store"):
        mapper.create("v-snap", snap_table())
    assert not mapper.exists("v-snap")


def test_reload_stages_until_resume(root, mapper):
    dev(root, "/dev/zvol/tank/origin").write(0, b"origin bytes")
    mapper.create("v-snap", snap_table())
    mapper.reload("v-snap", "0 2048 linear /dev/zvol/tank/origin 0")
    assert mapper.status("v-snap")[0].target_type == "snapshot"     # staged, not live
    assert blockdev.SimBlockDevices(root, "vm").in_use("/dev/zvol/tank/origin")
    mapper.resume("v-snap")
    assert mapper.status("v-snap") == [DmStatus("v-snap", 0, 2048, "linear", "")]
    assert dev(root, "/dev/mapper/v-snap").read(0, 12) == b"origin bytes"
    assert not blockdev.SimBlockDevices(root, "vm").in_use("/dev/zvol/tank/cow")


def test_remove_is_refused_while_a_domain_runs_on_the_device(root, mapper):
    mapper.create("v-snap", snap_table())
    hv = hypervisor.SimHypervisor(root)
    hv.start("vm", "guest", "/dev/mapper/v-snap", 1024, 2)
    with pytest.raises(DriverError, match=r"^device-mapper: remove ioctl on v-snap failed: "
                                          r"Device or resource busy$"):
        mapper.remove("v-snap")
    with pytest.raises(DriverError, match="dataset is busy"):
        zfs.SimZfs(root, "vm").destroy("tank", "cow")
    hv.stop("vm", "guest")
    mapper.remove("v-snap")
    assert not mapper.exists("v-snap")
    with pytest.raises(DriverError, match="No such device or address"):
        mapper.remove("v-snap")
    zfs.SimZfs(root, "vm").destroy("tank", "cow")


class _SizedOnly:
    """Just enough of a device for the accounting of a very large store."""
    path = "/dev/zvol/tank/big-temp-write"

    def __init__(self, size):
        self.size = size


def test_figures_match_a_real_merge_in_progress():
    # "9099712/73400320 17760" was printed by a real kernel merging a 35 GiB store
    n = 567622
    store = dm.CowStore(_SizedOnly(73400320 * 512), 16, [(i, 0) for i in range(n)], True)
    assert store.figures() == (9099712, 73400320, 17760)


def test_a_35_gib_store_starts_as_the_kernel_prints_it(root, mapper):
    zfs.SimZfs(root, "vm").create_zvol("tank", "big-temp-write", 35 << 30, sparse=True)
    mapper.create("big-snap", snap_table(cow="/dev/zvol/tank/big-temp-write"))
    assert mapper.status("big-snap")[0].args == "32/73400320 32"


def test_a_merge_onto_a_dead_origin_reports_merge_failed(root, mapper, monkeypatch):
    monkeypatch.setattr(dm.policy, "rate", 1000.0)
    zfs.create_pool(root, "nas", "tank")
    zfs.SimZfs(root, "nas").create_zvol("tank", "vm-1-vol", SIZE, sparse=True)
    ini = initiator.SimInitiator(root, "vm")
    nas_target = target.SimTarget(root, "nas")
    nas_target.create_target(IQN, "/dev/zvol/tank/vm-1-vol", ini.initiator_name())
    ini.login(IQN, "nas")
    mapper.create("v-snap", snap_table(origin="/dev/sdb"))
    dev(root, "/dev/mapper/v-snap").write(0, b"x" * (4 * CHUNK))
    switch(mapper, "v-snap", snap_table("snapshot-merge", origin="/dev/sdb"))
    nas_target.delete_target(IQN)
    dm.policy.clock.now += 1.0
    assert mapper.status("v-snap")[0].args == "Merge failed"
    assert dev(root, "/dev/mapper/v-snap").read(0, 4) == b"xxxx"     # still in the store
    assert figures(mapper, "v-snap") is None
