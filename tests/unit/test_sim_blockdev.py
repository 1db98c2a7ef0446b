"""Simulated block devices: real bytes, paths resolved as each host sees them."""
import os

import pytest

from imgstorage.drivers.base import BlockDevices
from imgstorage.drivers.sim import blockdev, dm, hypervisor, initiator, target, zfs
from imgstorage.errors import DriverError, ImgStorageError, ValidationError

MIB = 1 << 20
IQN = "iqn.2001-04.com.nas-v"


@pytest.fixture
def root(tmp_path):
    zfs.create_pool(tmp_path, "nas", "tank")
    zfs.create_pool(tmp_path, "vm", "tank")
    zfs.SimZfs(tmp_path, "nas").create_zvol("tank", "v", 4 * MIB, sparse=True)
    zfs.SimZfs(tmp_path, "vm").create_zvol("tank", "local", 4 * MIB, sparse=True)
    return tmp_path


def _zvol(root, host="nas", vol="v"):
    return blockdev.open_device(root, host, f"/dev/zvol/tank/{vol}")


def _attach(root):
    ini = initiator.SimInitiator(root, "vm")
    target.SimTarget(root, "nas").create_target(IQN, "/dev/zvol/tank/v", ini.initiator_name())
    ini.login(IQN, "nas")
    return ini


def test_zvol_round_trip_and_holes_read_as_zeros(root):
    dev = _zvol(root)
    assert dev.size == 4 * MIB
    pattern = os.urandom(10000)
    dev.write(123457, pattern)
    assert dev.read(123457, len(pattern)) == pattern
    assert dev.read(0, 4096) == bytes(4096)
    around = dev.read(123000, 11000)
    assert around[:457] == bytes(457) and around[457:10457] == pattern
    assert around[10457:] == bytes(543)
    assert dev.read(4 * MIB - 10, 10) == bytes(10)
    assert dev.read(4 * MIB, 0) == b""
    assert blockdev.SimBlockDevices(root, "nas").size_bytes("/dev/zvol/tank/v") == 4 * MIB


def test_out_of_range_io_is_refused_and_changes_nothing(root):
    dev = _zvol(root)
    data = root / "nas" / "zfs" / "tank" / "v" / "data"
    with pytest.raises(blockdev.DeviceIOError, match="beyond the end"):
        dev.read(4 * MIB - 10, 11)
    with pytest.raises(blockdev.DeviceIOError, match="beyond the end"):
        dev.write(4 * MIB - 3, b"abcd")
    with pytest.raises(ValidationError, match="negative"):
        dev.read(-1, 10)
    with pytest.raises(ValidationError, match="negative"):
        dev.read(0, -10)
    with pytest.raises(ValidationError, match="negative"):
        dev.write(-512, b"x")
    with pytest.raises(ValidationError, match="whole number"):
        dev.read(1.5, 10)
    assert data.stat().st_size == 4 * MIB
    assert data.stat().st_blocks == 0
    assert dev.read(4 * MIB - 3, 3) == bytes(3)


@pytest.mark.parametrize("path", ["/dev/sda", "/etc/passwd", "/dev/zvol/tank/../v", "/dev/zvol/tank",
                                  "dev/sdb", "/dev/sdb", "/dev/mapper/nope", "/dev/zvol/tank/nope",
                                  "/dev/mapper/a;b", "/dev/zvol/tank/v\n", ""])
def test_unknown_or_malformed_paths(root, path):
    with pytest.raises(ImgStorageError):
        blockdev.open_device(root, "vm", path)


def test_paths_mean_what_they_mean_on_that_host(root):
    assert blockdev.device_exists(root, "nas", "/dev/zvol/tank/v")
    assert not blockdev.device_exists(root, "vm", "/dev/zvol/tank/v")
    assert not blockdev.device_exists(root, "vm", "/dev/sdb")
    _zvol(root).write(0, b"on the nas")
    assert _zvol(root, "vm", "local").read(0, 10) == bytes(10)
    with pytest.raises(DriverError, match="No such device on vm"):
        blockdev.open_device(root, "vm", "/dev/zvol/tank/v")


def test_iscsi_disk_resolves_to_the_nas_zvol(root):
    _attach(root)
    sdb = blockdev.open_device(root, "vm", "/dev/sdb")
    assert sdb.size == 4 * MIB
    sdb.write(MIB, b"written by the VM container")
    assert _zvol(root).read(MIB, 27) == b"written by the VM container"
    _zvol(root).write(0, b"nas side")
    assert sdb.read(0, 8) == b"nas side"
    assert blockdev.SimBlockDevices(root, "vm").size_bytes("/dev/sdb") == 4 * MIB


def test_a_destroyed_zvol_fails_io_on_open_handles(root):
    dev = _zvol(root)
    zfs.SimZfs(root, "nas").destroy("tank", "v")
    with pytest.raises(blockdev.DeviceIOError, match="no longer exists"):
        dev.read(0, 1)


def test_in_use_by_target_dm_table_and_running_domain(root):
    nas_bd, vm_bd = blockdev.SimBlockDevices(root, "nas"), blockdev.SimBlockDevices(root, "vm")
    assert isinstance(vm_bd, BlockDevices)
    assert not nas_bd.in_use("/dev/zvol/tank/v")
    _attach(root)
    assert nas_bd.in_use("/dev/zvol/tank/v")                 # LIO holds its backing device
    assert not vm_bd.in_use("/dev/sdb")
    mapper = dm.SimDeviceMapper(root, "vm")
    mapper.create("lin", f"0 {4 * MIB // 512} linear /dev/sdb 0")
    assert vm_bd.in_use("/dev/sdb")
    assert not vm_bd.in_use("/dev/mapper/lin")
    hv = hypervisor.SimHypervisor(root)
    hv.start("vm", "guest", "/dev/mapper/lin", 512, 1)
    assert vm_bd.in_use("/dev/mapper/lin")
    assert blockdev.device_users(root, "vm", "/dev/mapper/lin") == ["domain guest"]
    hv.stop("vm", "guest")
    assert not vm_bd.in_use("/dev/mapper/lin")
    mapper.remove("lin")
    assert not vm_bd.in_use("/dev/sdb")


def test_a_stacking_cycle_is_a_clear_error(root):
    mapper = dm.SimDeviceMapper(root, "vm")
    sectors = 4 * MIB // 512
    mapper.create("a", f"0 {sectors} linear /dev/zvol/tank/local 0")
    mapper.create("b", f"0 {sectors} linear /dev/mapper/a 0")
    mapper.reload("a", f"0 {sectors} linear /dev/mapper/b 0")
    mapper.resume("a")
    dev = blockdev.open_device(root, "vm", "/dev/mapper/a")
    with pytest.raises(blockdev.DeviceIOError, match="stacked more than"):
        dev.read(0, 512)
