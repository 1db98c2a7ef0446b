"""What kept copies need from ZFS: a snapshot's guid, rollback, a pool's free space, holds."""
from __future__ import annotations

from typing import List, Tuple

import pytest

from imgstorage import syncsnaps
from imgstorage.drivers.base import HOLD_TAG, KEPT_TAG
from imgstorage.drivers.sim import zfs as simzfs
from imgstorage.drivers.sim.blockdev import open_device
from imgstorage.drivers.zfs import ZfsCli
from imgstorage.errors import CommandError, DriverError, NotFoundError
from tests.unit.replay import ReplayRunner, load_fixture

MIB = 1 << 20


def cli(runner) -> ZfsCli:
    return ZfsCli(runner, path_exists=lambda path: True)


# ------------------------------------------------------------- the real tools
# Recorded on the real kernel by tests/kernel/run --record (the warm-restart scenario):
# each fixture's own command line is the argv the driver must build.
def recorded(name: str) -> Tuple[List[str], str]:
    fixture = f"zfs/{name}.txt"
    return load_fixture(fixture).command.split(), fixture


def snapshot_of(argv: List[str]) -> Tuple[str, str, str]:
    dataset, snap = argv[-1].split("@")
    pool, zvol = dataset.split("/", 1)
    return pool, zvol, snap


def test_guid_of_a_snapshot_is_the_same_on_the_host_that_received_it():
    argv, fixture = recorded("real_get_guid")
    guid = cli(ReplayRunner().expect(argv, fixture)).snapshot_guid(*snapshot_of(argv))
    assert guid > 0 and str(guid) == load_fixture(fixture).stdout.strip()
    argv, fixture = recorded("real_get_guid_received")
    assert cli(ReplayRunner().expect(argv, fixture)).snapshot_guid(*snapshot_of(argv)) == guid


def test_guid_of_a_missing_snapshot_is_not_found():
    argv, fixture = recorded("real_get_guid_missing")
    with pytest.raises(NotFoundError, match="dataset does not exist"):
        cli(ReplayRunner().expect(argv, fixture)).snapshot_guid(*snapshot_of(argv))


def test_guid_that_is_not_a_number_is_an_error():
    runner = ReplayRunner().expect(
        ["zfs", "get", "-Hp", "-o", "value", "guid", "tank/vm-disk@s"], stdout="-\n")
    with pytest.raises(DriverError, match="no guid"):
        cli(runner).snapshot_guid("tank", "vm-disk", "s")


def test_recursive_rollback():
    argv, fixture = recorded("real_rollback_ok")
    assert argv[:3] == ["zfs", "rollback", "-r"]
    cli(ReplayRunner().expect(argv, fixture)).rollback(*snapshot_of(argv), recursive=True)


def test_rollback_past_a_later_snapshot_needs_recursive():
    argv, fixture = recorded("real_rollback_later")
    assert argv[:2] == ["zfs", "rollback"] and "-r" not in argv
    with pytest.raises(CommandError, match="more recent snapshots"):
        cli(ReplayRunner().expect(argv, fixture)).rollback(*snapshot_of(argv))


def test_rollback_past_a_held_snapshot_is_refused():
    argv, fixture = recorded("real_rollback_held")
    with pytest.raises(CommandError, match="busy"):
        cli(ReplayRunner().expect(argv, fixture)).rollback(*snapshot_of(argv), recursive=True)


def test_rollback_to_a_missing_snapshot_is_not_found():
    argv, fixture = recorded("real_rollback_missing")
    with pytest.raises(NotFoundError, match="dataset does not exist"):
        cli(ReplayRunner().expect(argv, fixture)).rollback(*snapshot_of(argv), recursive=True)


def test_pool_available():
    argv, fixture = recorded("real_get_available")
    free = cli(ReplayRunner().expect(argv, fixture)).pool_available(argv[-1])
    assert free > 0 and str(free) == load_fixture(fixture).stdout.strip()
    argv, fixture = recorded("real_get_available_missing")
    with pytest.raises(NotFoundError, match="dataset does not exist"):
        cli(ReplayRunner().expect(argv, fixture)).pool_available(argv[-1])


def test_the_hold_of_a_kept_copy():
    argv, fixture = recorded("real_holds_kept")
    assert argv[:3] == ["zfs", "holds", "-H"]
    tags = cli(ReplayRunner().expect(argv, fixture)).holds(*snapshot_of(argv))
    assert KEPT_TAG in tags, tags


# -------------------------------------------------------------- the simulation
@pytest.fixture
def two(tmp_path):
    for host in ("nas", "vm"):
        simzfs.create_pool(tmp_path, host, "tank", 64 * MIB)
    return tmp_path, simzfs.SimZfs(tmp_path, "nas"), simzfs.SimZfs(tmp_path, "vm")


def copy(src, dst, snap, base=None):
    sink = dst.receive("tank", "v")
    source = src.send("tank", "v", snap, base)
    while True:
        piece = source.read(1 << 16)
        if not piece:
            break
        sink.write(piece)
    source.close()
    sink.close()


def test_a_received_snapshot_has_its_senders_guid(two):
    _root, nas, vm = two
    nas.create_zvol("tank", "v", 4 * MIB)
    nas.snapshot("tank", "v", "s1")
    copy(nas, vm, "s1")
    assert vm.snapshot_guid("tank", "v", "s1") == nas.snapshot_guid("tank", "v", "s1")
    vm.destroy_snapshot("tank", "v", "s1")
    vm.snapshot("tank", "v", "s1")                        # the same name, another snapshot
    assert vm.snapshot_guid("tank", "v", "s1") != nas.snapshot_guid("tank", "v", "s1")
    with pytest.raises(DriverError, match="dataset does not exist"):
        vm.snapshot_guid("tank", "v", "nope")


def test_recursive_rollback_drops_later_snapshots_and_writes(two):
    root, nas, _vm = two
    nas.create_zvol("tank", "v", 4 * MIB)
    dev = open_device(root, "nas", "/dev/zvol/tank/v")
    dev.write(0, b"A" * 4096)
    nas.snapshot("tank", "v", "s1")
    dev.write(0, b"B" * 4096)
    nas.snapshot("tank", "v", "s2")
    dev.write(0, b"C" * 4096)
    nas.hold("tank", "v", "s2", "someone")
    with pytest.raises(DriverError, match="busy"):
        nas.rollback("tank", "v", "s1", recursive=True)
    assert nas.list_snapshots("tank", "v") == ["s1", "s2"]    # nothing changed
    assert dev.read(0, 4) == b"CCCC"
    nas.release("tank", "v", "s2", "someone")
    with pytest.raises(DriverError, match="more recent snapshots"):
        nas.rollback("tank", "v", "s1")
    nas.rollback("tank", "v", "s1", recursive=True)
    assert nas.list_snapshots("tank", "v") == ["s1"]
    assert dev.read(0, 4096) == b"A" * 4096


def test_pool_available_counts_thick_zvols_whole_and_sparse_ones_by_use(two):
    _root, nas, _vm = two
    assert nas.pool_available("tank") == 64 * MIB
    nas.create_zvol("tank", "thick", 16 * MIB)
    nas.create_zvol("tank", "thin", 16 * MIB, sparse=True)
    assert nas.pool_available("tank") == 48 * MIB


# ------------------------------------------------------------------- holds
def test_trim_leaves_a_kept_base_and_let_go_releases_it(two):
    _root, nas, _vm = two
    nas.create_zvol("tank", "v", 4 * MIB, sparse=True)
    names = [f"{syncsnaps.SNAP_PREFIX}2026112{n}T000000-00000{n}" for n in range(6)]
    for name in names:
        nas.snapshot("tank", "v", name)
    nas.hold("tank", "v", names[0], KEPT_TAG)
    syncsnaps.settle(nas, "tank", "v", names[5])
    assert nas.list_snapshots("tank", "v") == [names[0]] + names[3:]
    syncsnaps.let_go(nas, "tank", "v")
    assert all(nas.holds("tank", "v", n) == [] for n in nas.list_snapshots("tank", "v"))
    nas.destroy("tank", "v")


def test_keep_only_leaves_the_base_alone_and_held(two):
    _root, nas, _vm = two
    nas.create_zvol("tank", "v", 4 * MIB, sparse=True)
    names = [f"{syncsnaps.SNAP_PREFIX}2026112{n}T000000-00000{n}" for n in range(4)]
    for name in names:
        nas.snapshot("tank", "v", name)
        nas.hold("tank", "v", name)
    nas.snapshot("tank", "v", "operators")
    syncsnaps.keep_only(nas, "tank", "v", names[3])
    assert nas.list_snapshots("tank", "v") == [names[3], "operators"]
    assert nas.holds("tank", "v", names[3]) == [HOLD_TAG]
