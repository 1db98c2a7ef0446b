"""The ZFS drivers against recorded output of zfs, zpool and udevadm."""
from __future__ import annotations

import errno
import os
import sys
import types

import pytest

from imgstorage.drivers import zfs as zfs_mod
from imgstorage.drivers.base import ZfsDriver, ZvolInfo
from imgstorage.drivers.zfs import LibZfsCoreZfs, ZfsCli, make_zfs
from imgstorage.errors import CommandError, DriverError, NotFoundError
from tests.unit.replay import ReplayRunner

LIST = ["zfs", "list", "-Hp", "-o", "name,volsize,used,refer", "-t", "volume"]
CREATE = ["zfs", "create", "-o", "primarycache=metadata", "-o", "volblocksize=128K"]
GIB35 = 35 * (1 << 30)
DEV = "/dev/zvol/tank/compute-0-1-0-vol"
SETTLE = ["udevadm", "settle", "--timeout=30", f"--exit-if-exists={DEV}"]


class FakeClock:
    """Time that only moves when the driver sleeps, so no test waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def cli(runner, exists=lambda path: True, clock=None):
    clock = clock or FakeClock()
    return ZfsCli(runner, path_exists=exists, sleep=clock.sleep, clock=clock.clock)


# -------------------------------------------------------------------- pools
def test_list_pools_reads_one_name_per_line():
    runner = ReplayRunner().expect(["zpool", "list", "-Hp", "-o", "name"], "zfs/zpool_list.txt")
    assert cli(runner).list_pools() == ["tank", "ssd"]


def test_no_pools_is_an_empty_list():
    runner = ReplayRunner().expect(["zpool", "list", "-Hp", "-o", "name"], "zfs/zpool_list_empty.txt")
    assert cli(runner).list_pools() == []


def test_pool_exists_checks_the_pool_list():
    runner = ReplayRunner().expect(["zpool", "list", "-Hp", "-o", "name"], "zfs/zpool_list.txt",
                                   times=None)
    driver = cli(runner)
    assert driver.pool_exists("ssd") is True
    assert driver.pool_exists("nopool") is False


# ------------------------------------------------------------------ listing
def test_list_zvols_of_a_pool_parses_tab_separated_bytes():
    runner = ReplayRunner().expect(LIST + ["-r", "tank"], "zfs/list_volumes_tank.txt")
    zvols = cli(runner).list_zvols("tank")
    assert zvols == [
        ZvolInfo("tank/compute-0-1-0-vol", 37580963840, 38738493440, 4831838208),
        ZvolInfo("tank/compute-0-2-0-vol", 10737418240, 11072962560, 57344),
        ZvolInfo("tank/compute-0-2-0-vol-temp-write", 10737418240, 106496, 106496),
    ]
    assert zvols[2].pool == "tank" and zvols[2].zvol == "compute-0-2-0-vol-temp-write"
    assert runner.argvs == [LIST + ["-r", "tank"]]


def test_list_zvols_of_every_pool_has_no_dataset_argument():
    runner = ReplayRunner().expect(LIST, "zfs/list_volumes_all.txt")
    names = [z.name for z in cli(runner).list_zvols()]
    assert names == ["ssd/compute-0-3-0-vol", "tank/compute-0-1-0-vol"]


def test_list_zvols_of_a_missing_pool_is_empty():
    runner = ReplayRunner().expect(LIST + ["-r", "nopool"], "zfs/list_pool_missing.txt")
    assert cli(runner).list_zvols("nopool") == []


def test_list_zvols_of_a_pool_without_volumes_is_empty():
    runner = ReplayRunner().expect(LIST + ["-r", "empty"], "zfs/list_volumes_none.txt")
    assert cli(runner).list_zvols("empty") == []


def test_unreadable_lines_are_skipped_not_fatal():
    runner = ReplayRunner().expect(LIST + ["-r", "tank"],
                                   stdout="garbage line\ntank/v\t131072\t-\t4096\n")
    assert cli(runner).list_zvols("tank") == [ZvolInfo("tank/v", 131072, 0, 4096)]


def test_get_zvol_lists_exactly_that_dataset():
    runner = ReplayRunner().expect(LIST + ["tank/compute-0-1-0-vol"], "zfs/list_volume_one.txt")
    info = cli(runner).get_zvol("tank", "compute-0-1-0-vol")
    assert info == ZvolInfo("tank/compute-0-1-0-vol", GIB35, 38738493440, 4831838208)


def test_get_zvol_of_a_missing_dataset_is_none():
    runner = ReplayRunner().expect(LIST + ["tank/nosuch"], "zfs/list_volume_missing.txt")
    assert cli(runner).get_zvol("tank", "nosuch") is None


def test_get_zvol_of_a_filesystem_reports_the_tool_error():
    runner = ReplayRunner().expect(LIST + ["tank/home"], "zfs/list_not_a_volume.txt")
    with pytest.raises(CommandError) as err:
        cli(runner).get_zvol("tank", "home")
    assert "operation not applicable to datasets of this type" in str(err.value)


# ----------------------------------------------------------------- creating
def test_create_builds_the_original_options_with_bytes():
    runner = ReplayRunner().expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"],
                                   "zfs/create_ok.txt")
    cli(runner).create_zvol("tank", "compute-0-1-0-vol", GIB35)
    # The device was already there: no need to wait for udev.
    assert runner.argvs == [CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"]]


def test_create_sparse_adds_s_before_the_name():
    argv = CREATE + ["-V", str(GIB35), "-s", "tank/compute-0-1-0-vol-temp-write"]
    runner = ReplayRunner().expect(argv, "zfs/create_ok.txt")
    cli(runner).create_zvol("tank", "compute-0-1-0-vol-temp-write", GIB35, sparse=True)
    assert runner.argvs == [argv]


def test_create_waits_for_udev_to_make_the_device_link():
    appeared = []
    runner = (ReplayRunner()
              .expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"], "zfs/create_ok.txt")
              .expect(SETTLE, "zfs/udevadm_settle.txt", on_run=lambda argv: appeared.append(True)))
    clock = FakeClock()
    cli(runner, exists=lambda path: path == DEV and bool(appeared), clock=clock).create_zvol(
        "tank", "compute-0-1-0-vol", GIB35)
    assert runner.argvs[-1] == SETTLE
    assert clock.sleeps == []


def test_create_polls_until_the_device_appears():
    checks = iter([False, False, False, True])
    runner = (ReplayRunner()
              .expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"], "zfs/create_ok.txt")
              .expect(SETTLE, "zfs/udevadm_settle.txt"))
    clock = FakeClock()
    cli(runner, exists=lambda path: next(checks), clock=clock).create_zvol(
        "tank", "compute-0-1-0-vol", GIB35)
    assert clock.sleeps == [zfs_mod.POLL_INTERVAL, zfs_mod.POLL_INTERVAL]


def test_create_gives_up_when_the_device_never_appears():
    runner = (ReplayRunner()
              .expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"], "zfs/create_ok.txt")
              .expect(SETTLE, "zfs/udevadm_settle.txt"))
    clock = FakeClock()
    with pytest.raises(DriverError) as err:
        cli(runner, exists=lambda path: False, clock=clock).create_zvol(
            "tank", "compute-0-1-0-vol", GIB35)
    assert DEV in str(err.value) and "did not appear" in str(err.value)
    assert 29.0 <= sum(clock.sleeps) <= 31.0


def test_create_survives_a_node_without_udevadm():
    runner = (ReplayRunner()
              .expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"], "zfs/create_ok.txt")
              .expect(SETTLE, not_found=True))
    checks = iter([False, True])
    cli(runner, exists=lambda path: next(checks)).create_zvol("tank", "compute-0-1-0-vol", GIB35)
    assert runner.argvs[-1] == SETTLE


def test_create_in_a_missing_pool_surfaces_zfs_stderr():
    runner = ReplayRunner().expect(CREATE + ["-V", str(GIB35), "nopool/compute-0-1-0-vol"],
                                   "zfs/create_no_pool.txt")
    with pytest.raises(CommandError) as err:
        cli(runner).create_zvol("nopool", "compute-0-1-0-vol", GIB35)
    assert "no such pool 'nopool'" in str(err.value)
    assert err.value.returncode == 1


def test_create_over_an_existing_dataset_fails():
    runner = ReplayRunner().expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"],
                                   "zfs/create_exists.txt")
    with pytest.raises(CommandError, match="dataset already exists"):
        cli(runner).create_zvol("tank", "compute-0-1-0-vol", GIB35)


@pytest.mark.parametrize("size", [0, -131072, 1000, 131072 + 512])
def test_create_refuses_sizes_zfs_would_reject(size):
    runner = ReplayRunner()
    with pytest.raises(DriverError, match="128 KiB"):
        cli(runner).create_zvol("tank", "v", size)
    assert runner.calls == []


# --------------------------------------------------------------- destroying
def test_destroy_is_recursive_by_default():
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/compute-0-1-0-vol"],
                                   "zfs/destroy_ok.txt")
    cli(runner).destroy("tank", "compute-0-1-0-vol")
    assert runner.argvs == [["zfs", "destroy", "-r", "tank/compute-0-1-0-vol"]]


def test_destroy_without_recursion():
    runner = ReplayRunner().expect(["zfs", "destroy", "tank/compute-0-1-0-vol-temp-write"],
                                   "zfs/destroy_ok.txt")
    cli(runner).destroy("tank", "compute-0-1-0-vol-temp-write", recursive=False)
    runner.assert_all_used()


def test_destroy_of_a_missing_dataset_is_not_found():
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/nosuch"], "zfs/destroy_missing.txt")
    with pytest.raises(NotFoundError, match="tank/nosuch"):
        cli(runner).destroy("tank", "nosuch")


def test_destroy_of_a_busy_zvol_reports_why():
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/compute-0-1-0-vol"],
                                   "zfs/destroy_busy.txt")
    with pytest.raises(CommandError, match="dataset is busy"):
        cli(runner).destroy("tank", "compute-0-1-0-vol")


def test_device_path_and_protocol():
    driver = cli(ReplayRunner())
    assert driver.device_path("tank", "v") == "/dev/zvol/tank/v"
    assert isinstance(driver, ZfsDriver)


# -------------------------------------------------------------- libzfs_core
class FakeZFSError(Exception):
    """What pyzfs raises: an exception carrying the kernel's errno."""

    def __init__(self, code: int, name: bytes) -> None:
        self.errno = code
        super().__init__(f"[Errno {code}] {os.strerror(code)}: {name!r}")


def fake_lzc(*, create_error=None, destroy_error=None, datasets=(b"tank",)):
    calls = []

    def lzc_create(name, ds_type="zfs", props=None, key=None):
        calls.append(("create", name, ds_type, props))
        if create_error is not None:
            raise create_error

    def lzc_destroy(name):
        calls.append(("destroy", name))
        if destroy_error is not None:
            raise destroy_error

    def lzc_exists(name):
        calls.append(("exists", name))
        return name in datasets

    return types.SimpleNamespace(lzc_create=lzc_create, lzc_destroy=lzc_destroy,
                                 lzc_exists=lzc_exists, calls=calls,
                                 exceptions=types.SimpleNamespace(ZFSError=FakeZFSError))


def lzc_driver(runner, lzc):
    return LibZfsCoreZfs(runner, lzc, path_exists=lambda path: True)


def test_lzc_creates_sparse_zvols_with_the_original_properties():
    lzc = fake_lzc()
    runner = ReplayRunner()
    lzc_driver(runner, lzc).create_zvol("tank", "v-temp-write", GIB35, sparse=True)
    assert lzc.calls == [("create", b"tank/v-temp-write", "zvol",
                          {b"volsize": GIB35, b"volblocksize": 131072, b"primarycache": 1})]
    assert runner.calls == []


def test_lzc_leaves_thick_zvols_to_the_command():
    lzc = fake_lzc()
    runner = ReplayRunner().expect(CREATE + ["-V", str(GIB35), "tank/compute-0-1-0-vol"],
                                   "zfs/create_ok.txt")
    lzc_driver(runner, lzc).create_zvol("tank", "compute-0-1-0-vol", GIB35)
    assert lzc.calls == []
    runner.assert_all_used()


def test_lzc_missing_pool_reads_like_zfs_create():
    lzc = fake_lzc(create_error=FakeZFSError(errno.ENOENT, b"nopool/v"))
    with pytest.raises(DriverError) as err:
        lzc_driver(ReplayRunner(), lzc).create_zvol("nopool", "v", GIB35, sparse=True)
    assert str(err.value) == "cannot create 'nopool/v': no such pool 'nopool'"
    assert ("exists", b"nopool") in lzc.calls


def test_lzc_missing_parent_in_an_existing_pool():
    lzc = fake_lzc(create_error=FakeZFSError(errno.ENOENT, b"tank/a/v"))
    with pytest.raises(DriverError, match="parent does not exist"):
        lzc_driver(ReplayRunner(), lzc).create_zvol("tank", "a/v", GIB35, sparse=True)


def test_lzc_existing_dataset_reads_like_zfs_create():
    lzc = fake_lzc(create_error=FakeZFSError(errno.EEXIST, b"tank/v"))
    with pytest.raises(DriverError, match="cannot create 'tank/v': dataset already exists"):
        lzc_driver(ReplayRunner(), lzc).create_zvol("tank", "v", GIB35, sparse=True)


def test_lzc_destroys_directly():
    lzc = fake_lzc()
    runner = ReplayRunner()
    lzc_driver(runner, lzc).destroy("tank", "v")
    assert lzc.calls == [("destroy", b"tank/v")]
    assert runner.calls == []


def test_lzc_destroy_of_a_missing_dataset_is_not_found():
    lzc = fake_lzc(destroy_error=FakeZFSError(errno.ENOENT, b"tank/v"))
    with pytest.raises(NotFoundError):
        lzc_driver(ReplayRunner(), lzc).destroy("tank", "v")


def test_lzc_destroy_with_snapshots_falls_back_to_zfs_destroy_r():
    lzc = fake_lzc(destroy_error=FakeZFSError(errno.EBUSY, b"tank/compute-0-1-0-vol"))
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/compute-0-1-0-vol"],
                                   "zfs/destroy_ok.txt")
    lzc_driver(runner, lzc).destroy("tank", "compute-0-1-0-vol")
    runner.assert_all_used()


def test_lzc_destroy_busy_without_recursion_is_an_error():
    lzc = fake_lzc(destroy_error=FakeZFSError(errno.EBUSY, b"tank/v"))
    runner = ReplayRunner()
    with pytest.raises(DriverError, match="cannot destroy 'tank/v'"):
        lzc_driver(runner, lzc).destroy("tank", "v", recursive=False)
    assert runner.calls == []


def test_lzc_driver_lists_through_the_command():
    runner = ReplayRunner().expect(LIST + ["tank/compute-0-1-0-vol"], "zfs/list_volume_one.txt")
    info = lzc_driver(runner, fake_lzc()).get_zvol("tank", "compute-0-1-0-vol")
    assert info is not None and info.volsize == GIB35


def test_make_zfs_prefers_libzfs_core_when_importable(monkeypatch):
    lzc = fake_lzc()
    monkeypatch.setitem(sys.modules, "libzfs_core", lzc)
    driver = make_zfs(ReplayRunner())
    assert type(driver) is LibZfsCoreZfs and driver.lzc is lzc


def test_make_zfs_falls_back_to_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "libzfs_core", None)  # import now raises ImportError
    assert type(make_zfs(ReplayRunner())) is ZfsCli
