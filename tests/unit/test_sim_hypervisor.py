"""Simulated hypervisor: running domains hold their disks."""
import pytest

from imgstorage.drivers.base import DomainInfo, HypervisorDriver
from imgstorage.drivers.sim import blockdev, hypervisor, zfs
from imgstorage.errors import DriverError, ValidationError

MIB = 1 << 20
DISK = "/dev/zvol/tank/vm-1-vol"


@pytest.fixture
def hv(tmp_path):
    zfs.create_pool(tmp_path, "compute-0-1", "tank")
    zfs.SimZfs(tmp_path, "compute-0-1").create_zvol("tank", "vm-1-vol", 4 * MIB, sparse=True)
    return hypervisor.SimHypervisor(tmp_path)


def test_driver_satisfies_protocol(hv):
    assert isinstance(hv, HypervisorDriver)


def test_start_stop_and_list(tmp_path, hv):
    assert hv.domains("compute-0-1") == []
    hv.start("compute-0-1", "vm-1", DISK, 2048, 2)
    assert hv.domains("compute-0-1") == [DomainInfo("vm-1", "running", (DISK,))]
    stored = hypervisor.read_domains(tmp_path, "compute-0-1")["vm-1"]
    assert (stored["memory_mb"], stored["cpus"]) == (2048, 2)
    with pytest.raises(DriverError, match=r"^Requested operation is not valid: "
                                          r"Domain 'vm-1' is already active$"):
        hv.start("compute-0-1", "vm-1", DISK, 2048, 2)
    hv.stop("compute-0-1", "vm-1")
    hv.stop("compute-0-1", "vm-1")                                  # already off: nothing to do
    assert hv.domains("compute-0-1") == [DomainInfo("vm-1", "shut off", (DISK,))]
    hv.start("compute-0-1", "vm-1", DISK, 1024, 1)                  # a shut-off domain starts again
    assert hv.domains("compute-0-1")[0].state == "running"


def test_a_running_domain_holds_its_disk(tmp_path, hv):
    devices = blockdev.SimBlockDevices(tmp_path, "compute-0-1")
    assert not devices.in_use(DISK)
    hv.start("compute-0-1", "vm-1", DISK, 512, 1)
    assert devices.in_use(DISK)
    with pytest.raises(DriverError, match="dataset is busy"):
        zfs.SimZfs(tmp_path, "compute-0-1").destroy("tank", "vm-1-vol")
    hv.stop("compute-0-1", "vm-1")
    assert not devices.in_use(DISK)


def test_errors(tmp_path, hv):
    with pytest.raises(DriverError, match="Cannot access storage file '/dev/sdb'"):
        hv.start("compute-0-1", "vm-2", "/dev/sdb", 512, 1)
    with pytest.raises(DriverError, match="Cannot access storage file"):
        hv.start("compute-0-1", "vm-2", "/dev/zvol/tank/other", 512, 1)
    with pytest.raises(DriverError, match=r"^failed to get domain 'vm-2'$"):
        hv.stop("compute-0-1", "vm-2")
    with pytest.raises(DriverError, match="no such host"):
        hv.start("compute-9-9", "vm-2", DISK, 512, 1)
    with pytest.raises(DriverError, match="no such host"):
        hv.domains("compute-9-9")
    for memory, cpus in ((0, 1), (512, 0), (-1, 1), (True, 1), ("512", 1)):
        with pytest.raises(ValidationError):
            hv.start("compute-0-1", "vm-2", DISK, memory, cpus)
    for name in ("vm 2", "../vm", "vm;2", "vm-2\n"):
        with pytest.raises(ValidationError):
            hv.start("compute-0-1", name, DISK, 512, 1)
    assert hv.domains("compute-0-1") == []
    assert not (tmp_path / "compute-9-9").exists()
