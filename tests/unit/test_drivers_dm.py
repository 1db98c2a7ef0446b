"""The device-mapper driver and table builders against recorded dmsetup output."""
from __future__ import annotations

import pytest

from imgstorage.drivers.base import DeviceMapperDriver, DmStatus
from imgstorage.drivers.dm import (Dmsetup, linear_table, parse_status, snapshot_merge_table,
                                   snapshot_table)
from imgstorage.errors import CommandError
from tests.unit.replay import ReplayRunner, load_fixture

SNAP = "compute-0-1-0-vol-snap"
ORIGIN = "/dev/sdc"
COW = "/dev/zvol/tank/compute-0-1-0-vol-temp-write"
LOCAL = "/dev/zvol/tank/compute-0-1-0-vol"
LENGTH = 35 * 2097152  # 35 GiB in 512-byte sectors


# ------------------------------------------------------------------ tables
def test_snapshot_table_is_persistent_with_8k_chunks():
    assert snapshot_table(LENGTH, ORIGIN, COW) == f"0 73400320 snapshot {ORIGIN} {COW} P 16"


def test_snapshot_merge_table_keeps_origin_and_cow():
    assert (snapshot_merge_table(LENGTH, LOCAL, COW, chunk=32)
            == f"0 73400320 snapshot-merge {LOCAL} {COW} P 32")


def test_linear_table_maps_the_whole_device_from_offset_zero():
    assert linear_table(LENGTH, LOCAL) == f"0 73400320 linear {LOCAL} 0"


@pytest.mark.parametrize("build", [
    lambda: snapshot_table(0, ORIGIN, COW),
    lambda: snapshot_table(LENGTH, "/dev/with space", COW),
    lambda: snapshot_table(LENGTH, ORIGIN, ""),
    lambda: snapshot_table(LENGTH, ORIGIN, COW, chunk=12),
    lambda: snapshot_merge_table(True, ORIGIN, COW),
    lambda: linear_table(-1, LOCAL),
    lambda: linear_table(LENGTH, "/dev/x\n1 2 error"),
])
def test_tables_refuse_values_that_would_corrupt_the_table(build):
    with pytest.raises(ValueError):
        build()


# ------------------------------------------------------------------ status
def test_status_of_every_device_keeps_each_line():
    runner = ReplayRunner().expect(["dmsetup", "status"], "dm/status_all.txt")
    statuses = Dmsetup(runner).status()
    assert statuses[:3] == [
        DmStatus(SNAP, 0, 73400320, "snapshot", "9099712/73400320 17760"),
        DmStatus("compute-0-2-0-vol-snap", 0, 20971520, "snapshot-merge", "16/20971520 16"),
        DmStatus("compute-0-3-0-vol-snap", 0, 41943040, "linear", ""),
    ]
    assert statuses[0].snapshot_figures() == (9099712, 73400320, 17760)
    assert statuses[1].snapshot_figures() == (16, 20971520, 16)
    assert statuses[2].snapshot_figures() is None


def test_status_keeps_failed_snapshot_states_in_args():
    statuses = {s.name: s for s in parse_status(load_fixture("dm/status_all.txt").stdout)}
    assert statuses["compute-0-4-0-vol-snap"].args == "Invalid"
    assert statuses["compute-0-5-0-vol-snap"].args == "Merge failed"
    assert statuses["compute-0-5-0-vol-snap"].target_type == "snapshot-merge"
    assert statuses["compute-0-6-0-vol-snap"].args == "Overflow"
    assert statuses["compute-0-4-0-vol-snap"].snapshot_figures() is None


def test_status_of_a_multi_target_device_gives_one_entry_per_target():
    statuses = [s for s in parse_status(load_fixture("dm/status_all.txt").stdout)
                if s.name == "vg0-root"]
    assert [(s.start, s.length) for s in statuses] == [(0, 41943040), (41943040, 8388608)]


def test_no_devices_found_is_an_empty_list():
    runner = ReplayRunner().expect(["dmsetup", "status"], "dm/status_none.txt")
    assert Dmsetup(runner).status() == []


def test_status_of_one_device_has_no_name_prefix():
    runner = ReplayRunner().expect(["dmsetup", "status", SNAP], "dm/status_one_snapshot.txt")
    assert Dmsetup(runner).status(SNAP) == [
        DmStatus(SNAP, 0, 73400320, "snapshot", "9099712/73400320 17760")]


@pytest.mark.parametrize("fixture,kind,figures", [
    ("dm/status_one_merging.txt", "snapshot-merge", (2123456, 73400320, 17760)),
    ("dm/status_one_merged.txt", "snapshot-merge", (17760, 73400320, 17760)),
    ("dm/status_one_linear.txt", "linear", None),
    ("dm/status_one_invalid.txt", "snapshot", None),
])
def test_status_through_a_merge(fixture, kind, figures):
    runner = ReplayRunner().expect(["dmsetup", "status", SNAP], fixture)
    [status] = Dmsetup(runner).status(SNAP)
    assert status.target_type == kind
    assert status.snapshot_figures() == figures


def test_status_of_a_missing_device_is_empty():
    runner = ReplayRunner().expect(["dmsetup", "status", "nosuch-snap"], "dm/status_missing.txt")
    assert Dmsetup(runner).status("nosuch-snap") == []


def test_status_without_a_kernel_driver_is_an_error():
    runner = ReplayRunner().expect(["dmsetup", "status"],
                                   stderr=load_fixture("dm/no_kernel_driver.txt").stderr,
                                   returncode=1)
    with pytest.raises(CommandError, match="Command failed"):
        Dmsetup(runner).status()


# ------------------------------------------------------------------ changes
def test_create_reload_suspend_resume_argv():
    table = snapshot_table(LENGTH, ORIGIN, COW)
    merge = snapshot_merge_table(LENGTH, LOCAL, COW)
    runner = (ReplayRunner()
              .expect(["dmsetup", "create", SNAP, "--table", table], "dm/ok.txt")
              .expect(["dmsetup", "suspend", SNAP], "dm/ok.txt")
              .expect(["dmsetup", "reload", SNAP, "--table", merge], "dm/ok.txt")
              .expect(["dmsetup", "resume", SNAP], "dm/ok.txt"))
    dm = Dmsetup(runner)
    dm.create(SNAP, table)
    dm.suspend(SNAP)
    dm.reload(SNAP, merge)
    dm.resume(SNAP)
    assert runner.argvs == [
        ["dmsetup", "create", SNAP, "--table", f"0 73400320 snapshot {ORIGIN} {COW} P 16"],
        ["dmsetup", "suspend", SNAP],
        ["dmsetup", "reload", SNAP, "--table", f"0 73400320 snapshot-merge {LOCAL} {COW} P 16"],
        ["dmsetup", "resume", SNAP],
    ]


def test_create_over_a_busy_name_surfaces_dmsetup_stderr():
    table = snapshot_table(LENGTH, ORIGIN, COW)
    runner = ReplayRunner().expect(["dmsetup", "create", SNAP, "--table", table], "dm/create_busy.txt")
    with pytest.raises(CommandError, match="Device or resource busy"):
        Dmsetup(runner).create(SNAP, table)


def test_remove_retries_in_dmsetup():
    runner = ReplayRunner().expect(["dmsetup", "remove", "--retry", SNAP], "dm/ok.txt")
    Dmsetup(runner).remove(SNAP)
    assert runner.argvs == [["dmsetup", "remove", "--retry", SNAP]]


def test_remove_of_a_device_already_gone_succeeds():
    runner = (ReplayRunner()
              .expect(["dmsetup", "remove", "--retry", "nosuch-snap"], "dm/remove_missing.txt")
              .expect(["dmsetup", "info", "nosuch-snap"], "dm/info_missing.txt"))
    Dmsetup(runner).remove("nosuch-snap")
    runner.assert_all_used()


def test_remove_of_a_busy_device_fails():
    runner = (ReplayRunner()
              .expect(["dmsetup", "remove", "--retry", SNAP], "dm/remove_busy.txt")
              .expect(["dmsetup", "info", SNAP], "dm/info_ok.txt"))
    with pytest.raises(CommandError, match="Device or resource busy"):
        Dmsetup(runner).remove(SNAP)


def test_table_returns_the_kernel_view():
    runner = ReplayRunner().expect(["dmsetup", "table", SNAP], "dm/table_snapshot.txt")
    assert Dmsetup(runner).table(SNAP) == "0 73400320 snapshot 8:32 230:16 P 16"


def test_exists_follows_dmsetup_info():
    runner = (ReplayRunner()
              .expect(["dmsetup", "info", SNAP], "dm/info_ok.txt")
              .expect(["dmsetup", "info", "nosuch-snap"], "dm/info_missing.txt"))
    dm = Dmsetup(runner)
    assert dm.exists(SNAP) is True
    assert dm.exists("nosuch-snap") is False


def test_exists_without_a_kernel_driver_is_an_error_not_a_no():
    runner = ReplayRunner().expect(["dmsetup", "info", SNAP], "dm/no_kernel_driver.txt")
    with pytest.raises(CommandError, match="Failure to communicate|Command failed"):
        Dmsetup(runner).exists(SNAP)


def test_implements_the_protocol():
    assert isinstance(Dmsetup(ReplayRunner()), DeviceMapperDriver)
