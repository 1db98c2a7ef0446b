"""Block device size and in-use checks against a fake sysfs and recorded tools."""
from __future__ import annotations

import errno
import os

import pytest

from imgstorage.drivers.base import BlockDevices
from imgstorage.drivers.blockdev import RealBlockDevices
from imgstorage.errors import CommandError, DriverError
from tests.unit.replay import ReplayRunner


class Opener:
    """Stands in for os.open/os.close and remembers the flags it was given."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.opened = []
        self.closed = []

    def open(self, path: str, flags: int) -> int:
        self.opened.append((path, flags))
        if self.error:
            raise OSError(self.error, os.strerror(self.error), path)
        return 42

    def close(self, fd: int) -> None:
        self.closed.append(fd)


@pytest.fixture
def node(tmp_path):
    """A /dev with udev-style mapper links and a matching /sys/class/block."""
    dev, sys_block = tmp_path / "dev", tmp_path / "sys" / "class" / "block"
    (dev / "mapper").mkdir(parents=True)
    for name in ("sdc", "dm-0", "dm-3"):
        (dev / name).write_bytes(b"")
        (sys_block / name / "holders").mkdir(parents=True)
    (sys_block / "dm-0" / "dm").mkdir()
    (sys_block / "dm-0" / "dm" / "name").write_text("compute-0-1-0-vol-snap\n")
    (sys_block / "dm-3" / "dm").mkdir()
    (sys_block / "dm-3" / "dm" / "name").write_text("compute-0-2-0-vol-snap\n")
    os.symlink("../dm-0", dev / "mapper" / "compute-0-1-0-vol-snap")
    (dev / "mapper" / "compute-0-2-0-vol-snap").write_bytes(b"")  # a node, not a link
    return tmp_path


def devices(runner, node, opener=None):
    opener = opener or Opener()
    return RealBlockDevices(runner, sysfs_root=str(node / "sys"), opener=opener.open,
                            closer=opener.close)


# ------------------------------------------------------------------- sizes
def test_size_bytes_uses_getsize64(node):
    runner = ReplayRunner().expect(["blockdev", "--getsize64", "/dev/sdc"], "blockdev/getsize64.txt")
    assert devices(runner, node).size_bytes("/dev/sdc") == 37580963840
    assert runner.argvs == [["blockdev", "--getsize64", "/dev/sdc"]]


def test_size_of_a_missing_device_surfaces_blockdev_stderr(node):
    runner = ReplayRunner().expect(["blockdev", "--getsize64", "/dev/nosuch"],
                                   "blockdev/getsize64_missing.txt")
    with pytest.raises(CommandError, match="No such file or directory"):
        devices(runner, node).size_bytes("/dev/nosuch")


def test_size_that_is_not_a_number_is_an_error(node):
    runner = ReplayRunner().expect(["blockdev", "--getsize64", "/dev/sdc"], stdout="oops\n")
    with pytest.raises(DriverError, match="not a size"):
        devices(runner, node).size_bytes("/dev/sdc")


# ------------------------------------------------------------------ in use
def test_kernel_name_follows_mapper_links_and_nodes(node):
    bd = devices(ReplayRunner(), node)
    assert bd.kernel_name(str(node / "dev" / "mapper" / "compute-0-1-0-vol-snap")) == "dm-0"
    assert bd.kernel_name(str(node / "dev" / "mapper" / "compute-0-2-0-vol-snap")) == "dm-3"
    assert bd.kernel_name(str(node / "dev" / "sdc")) == "sdc"
    assert bd.kernel_name(str(node / "dev" / "mapper" / "unknown")) is None


def test_a_device_with_holders_is_in_use_without_asking_further(node):
    (node / "sys" / "class" / "block" / "dm-0" / "holders" / "dm-7").mkdir()
    runner, opener = ReplayRunner(), Opener()
    device = str(node / "dev" / "mapper" / "compute-0-1-0-vol-snap")
    assert devices(runner, node, opener).in_use(device) is True
    assert runner.calls == [] and opener.opened == []


def test_holders_found_for_a_mapper_node_that_is_not_a_link(node):
    (node / "sys" / "class" / "block" / "dm-3" / "holders" / "dm-9").mkdir()
    device = str(node / "dev" / "mapper" / "compute-0-2-0-vol-snap")
    assert devices(ReplayRunner(), node).in_use(device) is True


def test_an_exclusive_holder_makes_the_open_fail_with_ebusy(node):
    runner, opener = ReplayRunner(), Opener(error=errno.EBUSY)
    device = str(node / "dev" / "sdc")
    assert devices(runner, node, opener).in_use(device) is True
    assert opener.opened == [(device, os.O_RDONLY | os.O_EXCL)]
    assert runner.calls == []


def test_a_process_holding_it_open_is_found_by_fuser(node):
    device = str(node / "dev" / "mapper" / "compute-0-1-0-vol-snap")
    runner = (ReplayRunner()
              .expect(["fuser", "-s", device], "blockdev/fuser_in_use.txt", times=2)
              .expect(["udevadm", "settle", "--timeout=10"]))
    opener = Opener()
    assert devices(runner, node, opener).in_use(device) is True
    assert opener.closed == [42]
    # Asked again once udev settled: a probing udev worker is not a user.
    assert runner.argvs == [["fuser", "-s", device], ["udevadm", "settle", "--timeout=10"],
                            ["fuser", "-s", device]]


def test_nobody_uses_it(node):
    device = str(node / "dev" / "mapper" / "compute-0-1-0-vol-snap")
    runner = ReplayRunner().expect(["fuser", "-s", device], "blockdev/fuser_unused.txt")
    assert devices(runner, node).in_use(device) is False
    assert runner.argvs == [["fuser", "-s", device]]


def test_an_open_that_fails_otherwise_leaves_it_to_fuser(node):
    device = str(node / "dev" / "sdc")
    runner = ReplayRunner().expect(["fuser", "-s", device], "blockdev/fuser_unused.txt")
    assert devices(runner, node, Opener(error=errno.EACCES)).in_use(device) is False
    runner.assert_all_used()


def test_fuser_failing_is_an_error_not_a_no(node):
    device = str(node / "dev" / "sdc")
    runner = ReplayRunner().expect(["fuser", "-s", device], not_found=True)
    with pytest.raises(CommandError, match="command not found"):
        devices(runner, node).in_use(device)


def test_implements_the_protocol(node):
    assert isinstance(devices(ReplayRunner(), node), BlockDevices)
