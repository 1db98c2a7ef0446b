"""A container keeps its copy after the VM stopped, and starts from it again (simulated kernel).

No broker: the container service is driven directly and plays the NAS's
part by hand (the NAS is a simulated host with a pool, a zvol, its target,
and the streams ``zfs send`` makes), so each test sees exactly what the
container does with a kept copy: keep it, reuse it for an incremental copy,
give it up when anything does not match, and make room with it.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import pytest

from imgstorage import naming, syncsnaps
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.base import HOLD_TAG, ChapCredentials
from imgstorage.drivers.sim import blockdev, zfs as sim_zfs
from imgstorage.errors import DriverError, StateError
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService
from imgstorage.vm.states import Event

NAS, HOST, POOL, ZVOL = "nas-0-0", "compute-0-3", "tank", "vol1"
MIB = 1024 * 1024
SIZE = 16 * MIB
CHAP = ChapCredentials("imgstorage-0123abcd", "s3cret-s3cret-12")
TARGET = naming.target_iqn(NAS, ZVOL)


class World:
    """A NAS host with the zvol and its target, and a container service to drive."""

    def __init__(self, tmp_path, pool_size: int = 1 << 40):
        self.root = tmp_path / "sim"
        sim_zfs.create_pool(self.root, NAS, POOL, 1 << 40)
        sim_zfs.create_pool(self.root, HOST, POOL, pool_size)
        nas_cfg = from_dict({"name": NAS, "backend": "sim", "sim_root": str(self.root),
                             "db": str(tmp_path / "nas.db")})
        self.nas = node_drivers(nas_cfg).zfs
        self.nas_target = node_drivers(nas_cfg).target
        self.cfg = from_dict({"name": HOST, "backend": "sim", "sim_root": str(self.root),
                              "db": str(tmp_path / "vm.db")})
        self.told: List[Tuple[str, Dict]] = []
        self.vm = self.start()
        self.zvol(ZVOL)

    def start(self) -> VmService:
        engine = make_engine(self.cfg.db)
        create_schema(engine, VmBase)
        service = VmService(self.cfg, engine, node_drivers(self.cfg),
                            notify=lambda node, message: self.told.append((node, message)))
        service.recover()
        return service

    def zvol(self, zvol: str) -> None:
        self.nas.create_zvol(POOL, zvol, SIZE)
        self.nas_write(zvol, 0, b"N" * MIB)
        self.nas_target.create_target(naming.target_iqn(NAS, zvol),
                                      self.nas.device_path(POOL, zvol),
                                      self.vm.initiator_name(), CHAP)

    def nas_write(self, zvol: str, offset: int, data: bytes) -> None:
        blockdev.open_device(self.root, NAS, self.nas.device_path(POOL, zvol)).write(offset, data)

    def nas_read(self, zvol: str, offset: int, length: int) -> bytes:
        return blockdev.open_device(self.root, NAS, self.nas.device_path(POOL, zvol)).read(
            offset, length)

    def dev(self, path: str):
        return blockdev.open_device(self.root, HOST, path)

    def map(self, zvol: str = ZVOL, nas_node: str = NAS) -> str:
        return self.vm.map_zvol(zvol, naming.target_iqn(NAS, zvol), NAS, True, POOL, CHAP, 10,
                                volsize=SIZE, nas_node=nas_node)


def stream(src, src_pool, src_zvol, snap, base, dst, dst_pool, dst_zvol) -> int:
    """One ``zfs send | zfs receive``; the stream's length."""
    source = src.send(src_pool, src_zvol, snap, base)
    sink = dst.receive(dst_pool, dst_zvol, resumable=True)
    sent = 0
    while True:
        piece = source.read(1 << 16)
        if not piece:
            break
        sink.write(piece)
        sent += len(piece)
    source.close()
    sink.close()
    return sent


def upload(w: World, zvol: str = ZVOL, base: str = None) -> str:
    """The NAS->VM copy (from ``base`` if given) and the merge: the VM runs from its copy."""
    snap = syncsnaps.new_snapshot_name()
    w.nas.snapshot(POOL, zvol, snap)
    stream(w.nas, POOL, zvol, snap, base, w.vm.drivers.zfs, POOL, zvol)
    w.vm.start_merge(zvol, snap)
    while w.vm.row(zvol).state == "merging":
        w.vm.sync.tick()
    assert w.vm.row(zvol).state == "local"
    return snap


def stop(w: World, zvol: str = ZVOL, keep: bool = True) -> str:
    """The unmap and the final pull; with ``keep`` the NAS asks the container to keep it."""
    assert w.vm.unmap_zvol(zvol, naming.target_iqn(NAS, zvol), 5) == {"local": True}
    ours = syncsnaps.ours(w.nas, POOL, zvol)
    snap = syncsnaps.new_snapshot_name()
    w.vm.snapshot_for_pull(zvol, snap, ours[-1])
    stream(w.vm.drivers.zfs, POOL, zvol, snap, ours[-1], w.nas, POOL, zvol)
    assert w.vm.del_local(zvol, keep=snap if keep else None) is keep
    return snap


def dropped(w: World) -> List[Tuple[str, Dict]]:
    """What the container told its NAS about kept copies it destroyed."""
    return [(node, m) for node, m in w.told if m["action"] == "kept_dropped"]


def guid(zfs, zvol: str, snap: str) -> int:
    return zfs.snapshot_guid(POOL, zvol, snap)


@pytest.fixture
def w(tmp_path):
    return World(tmp_path)


def kept_world(w: World) -> str:
    path = w.map()
    upload(w)
    w.dev(path).write(MIB, b"V" * 8192)
    return stop(w)


# ---------------------------------------------------------------- keeping
def test_the_copy_is_kept_as_of_the_final_pull_with_only_that_snapshot(w):
    snap = kept_world(w)
    row = w.vm.row(ZVOL)
    assert (row.state, row.kept_snapshot, row.iscsi_target) == ("kept", snap, None)
    zfs = w.vm.drivers.zfs
    assert zfs.list_snapshots(POOL, ZVOL) == [snap]
    assert zfs.holds(POOL, ZVOL, snap) == [HOLD_TAG]
    assert guid(zfs, ZVOL, snap) == guid(w.nas, ZVOL, snap)
    listed = w.vm.list_dev()[ZVOL]
    assert (listed["state"], listed["status"], listed["device"]) == ("kept", "kept", None)
    assert listed["time"] == row.kept_since and listed["size"] == SIZE // naming.GIB
    # asked again (a NAS that restarted before it heard the answer): still kept
    assert w.vm.del_local(ZVOL, keep=snap) is True


def test_a_copy_whose_newest_snapshot_is_not_the_nas_one_is_destroyed(w):
    path = w.map()
    upload(w)
    w.dev(path).write(0, b"X")
    assert w.vm.unmap_zvol(ZVOL, TARGET, 5) == {"local": True}
    assert w.vm.del_local(ZVOL, keep="IMG-STORAGE-20000101T000000-000000") is False
    assert w.vm.row(ZVOL) is None
    assert w.vm.drivers.zfs.get_zvol(POOL, ZVOL) is None


def test_without_keep_nothing_changes(w):
    path = w.map()
    upload(w)
    w.dev(path).write(0, b"X")
    stop(w, keep=False)
    assert w.vm.row(ZVOL) is None and w.vm.drivers.zfs.get_zvol(POOL, ZVOL) is None


def test_an_unmap_of_a_kept_copy_finds_nothing_to_let_go(w):
    snap = kept_world(w)
    assert w.vm.unmap_zvol(ZVOL, TARGET, 5) == {"local": False}
    assert w.vm.row(ZVOL).state == "kept"
    assert w.vm.drivers.zfs.list_snapshots(POOL, ZVOL) == [snap]


def test_the_nas_removing_the_zvol_destroys_the_kept_copy(w):
    kept_world(w)
    assert w.vm.del_local(ZVOL) is False
    assert w.vm.row(ZVOL) is None and w.vm.drivers.zfs.get_zvol(POOL, ZVOL) is None
    assert dropped(w) == []                 # the NAS asked: nothing to tell it


# ---------------------------------------------------------------- reusing
def test_a_sync_map_from_the_same_nas_reuses_the_copy_and_receives_only_the_changes(w):
    snap = kept_world(w)
    w.nas_write(ZVOL, 4 * MIB, b"C" * 65536)          # the VM ran on the NAS meanwhile
    path = w.map()
    row = w.vm.row(ZVOL)
    assert (row.state, row.kept_snapshot, row.iscsi_target) == ("snapshot", snap, TARGET)
    state = w.vm.receive_state(ZVOL)
    assert (state["base"], state["base_guid"]) == (snap, guid(w.nas, ZVOL, snap))
    # the VM reads the NAS's disk, changes included, and writes into its temp store
    assert w.dev(path).read(4 * MIB, 4) == b"CCCC"
    w.dev(path).write(2 * MIB, b"T" * 4096)
    # written since, by nobody we know: the rollback throws it away
    w.dev(w.vm.drivers.zfs.device_path(POOL, ZVOL)).write(8 * MIB, b"?" * 4096)
    w.vm.kept.prepare_base(w.vm.row(ZVOL), snap, guid(w.nas, ZVOL, snap))
    new = syncsnaps.new_snapshot_name()
    w.nas.snapshot(POOL, ZVOL, new)
    sent = stream(w.nas, POOL, ZVOL, new, snap, w.vm.drivers.zfs, POOL, ZVOL)
    assert sent < 256 * 1024                           # the change, not the disk
    w.vm.start_merge(ZVOL, new)
    assert w.vm.row(ZVOL).kept_snapshot is None
    while w.vm.row(ZVOL).state == "merging":
        w.vm.sync.tick()
    d = w.dev(path)
    assert d.read(0, 4) == b"NNNN" and d.read(MIB, 8192) == b"V" * 8192
    assert d.read(4 * MIB, 65536) == b"C" * 65536 and d.read(2 * MIB, 4096) == b"T" * 4096
    assert d.read(8 * MIB, 4096) == bytes(4096)


def test_a_failed_reuse_keeps_the_copy_as_it_was(w):
    snap = kept_world(w)
    w.nas_target.delete_target(TARGET)                  # the attach will fail
    with pytest.raises(DriverError, match="Could not find iSCSI target"):
        w.map()
    row = w.vm.row(ZVOL)
    assert (row.state, row.kept_snapshot) == ("kept", snap)
    zfs = w.vm.drivers.zfs
    assert zfs.get_zvol(POOL, f"{ZVOL}-temp-write") is None
    assert zfs.list_snapshots(POOL, ZVOL) == [snap]


def test_an_attach_cut_by_a_restart_goes_back_to_kept(w):
    snap = kept_world(w)
    w.vm.store.transition(ZVOL, Event.REUSE, iscsi_target=TARGET)   # the daemon died here
    again = w.start()
    assert (again.row(ZVOL).state, again.row(ZVOL).kept_snapshot) == ("kept", snap)
    assert again.drivers.zfs.list_snapshots(POOL, ZVOL) == [snap]


@pytest.mark.parametrize("how", ["guid", "snapshot", "name"])
def test_a_base_that_does_not_match_destroys_the_copy_for_a_full_one(w, how):
    snap = kept_world(w)
    w.map()
    zfs = w.vm.drivers.zfs
    nas_guid = guid(w.nas, ZVOL, snap)
    name = snap
    if how == "guid":
        nas_guid += 2
    elif how == "snapshot":
        zfs.release(POOL, ZVOL, snap, HOLD_TAG)
        zfs.destroy_snapshot(POOL, ZVOL, snap)
    else:
        name = syncsnaps.new_snapshot_name()
    with pytest.raises(StateError, match="a full copy follows"):
        w.vm.kept.prepare_base(w.vm.row(ZVOL), name, nas_guid)
    assert w.vm.row(ZVOL).kept_snapshot is None
    assert zfs.list_snapshots(POOL, ZVOL) == []
    assert w.vm.receive_state(ZVOL).get("base") is None
    # the full copy lands as on any first start
    new = syncsnaps.new_snapshot_name()
    w.nas.snapshot(POOL, ZVOL, new)
    stream(w.nas, POOL, ZVOL, new, None, zfs, POOL, ZVOL)
    assert zfs.snapshot_guid(POOL, ZVOL, new) == guid(w.nas, ZVOL, new)


def test_the_nas_asking_for_a_fresh_copy_replaces_the_kept_one(w):
    kept_world(w)
    w.map()
    w.vm.kept.forget_base(w.vm.row(ZVOL), "the NAS has no snapshot in common with it")
    zfs = w.vm.drivers.zfs
    assert zfs.list_snapshots(POOL, ZVOL) == [] and zfs.get_zvol(POOL, ZVOL).volsize == SIZE
    assert w.dev(zfs.device_path(POOL, ZVOL)).read(MIB, 4) == bytes(4)
    w.vm.kept.forget_base(w.vm.row(ZVOL), "again")        # nothing left to forget


def test_an_unmap_before_the_changes_arrived_keeps_the_copy_at_its_snapshot(w):
    snap = kept_world(w)
    path = w.map()
    w.dev(path).write(3 * MIB, b"F" * 8192)              # flushed home through iSCSI
    w.vm.kept.prepare_base(w.vm.row(ZVOL), snap, guid(w.nas, ZVOL, snap))
    new = syncsnaps.new_snapshot_name()
    w.nas.snapshot(POOL, ZVOL, new)
    stream(w.nas, POOL, ZVOL, new, snap, w.vm.drivers.zfs, POOL, ZVOL)  # arrived, not merged
    assert w.vm.unmap_zvol(ZVOL, TARGET, 10) == {"local": False}
    row = w.vm.row(ZVOL)
    assert (row.state, row.kept_snapshot) == ("kept", snap)
    zfs = w.vm.drivers.zfs
    assert zfs.list_snapshots(POOL, ZVOL) == [snap]
    assert zfs.get_zvol(POOL, f"{ZVOL}-temp-write") is None
    assert w.nas_read(ZVOL, 3 * MIB, 8192) == b"F" * 8192


@pytest.mark.parametrize("how", ["direct", "other NAS"])
def test_a_map_the_copy_cannot_serve_destroys_it_and_tells_its_nas(w, how):
    snap = kept_world(w)
    if how == "direct":
        w.vm.map_zvol(ZVOL, TARGET, NAS, False, None, CHAP, 10)
        assert w.vm.row(ZVOL).state == "attached"
    else:
        w.map(nas_node="nas-0-1")
        assert w.vm.row(ZVOL).kept_snapshot is None
        assert w.vm.drivers.zfs.list_snapshots(POOL, ZVOL) == []
    assert dropped(w) == [(NAS, {"action": "kept_dropped", "zvol": ZVOL, "host": HOST,
                             "snapshot": snap})]


# ------------------------------------------------------------- making room
def test_a_new_copy_that_does_not_fit_destroys_kept_copies_oldest_first(tmp_path):
    w = World(tmp_path, pool_size=2 * SIZE + SIZE // 2)
    for zvol in ("old", "young"):
        w.zvol(zvol)
        path = w.map(zvol)
        upload(w, zvol)
        w.dev(path).write(0, b"Y")
        stop(w, zvol)
    assert [r.zvol for r in w.vm.rows() if r.state == "kept"] == ["old", "young"]
    w.zvol("new")
    w.map("new")                                          # needs SIZE; half of it is free
    assert w.vm.row("old") is None and w.vm.drivers.zfs.get_zvol(POOL, "old") is None
    assert w.vm.row("young").state == "kept"
    assert [m["zvol"] for _n, m in dropped(w)] == ["old"]


def test_a_new_copy_that_cannot_fit_at_all_fails_as_before(tmp_path):
    w = World(tmp_path, pool_size=SIZE // 2)
    with pytest.raises(DriverError, match="out of space"):
        w.map()
    assert w.vm.row(ZVOL) is None


# ---------------------------------------------------------------- restarts
def test_a_kept_row_whose_zvol_went_is_dropped_at_start(w):
    snap = kept_world(w)
    zfs = w.vm.drivers.zfs
    syncsnaps.let_go(zfs, POOL, ZVOL)
    zfs.destroy(POOL, ZVOL)
    again = w.start()
    assert again.row(ZVOL) is None
    assert dropped(w)[-1][1]["snapshot"] == snap


def test_a_kept_copy_survives_a_restart(w):
    snap = kept_world(w)
    again = w.start()
    assert (again.row(ZVOL).state, again.row(ZVOL).kept_snapshot) == ("kept", snap)
    assert dropped(w) == []


def test_clean_destroys_a_kept_copy_and_tells_the_nas(w):
    kept_world(w)
    out = w.vm.clean_zvol(ZVOL, None)
    assert out["done"] == [f"destroyed {POOL}/{ZVOL}"]
    assert w.vm.row(ZVOL) is None
    assert [m["zvol"] for _n, m in dropped(w)] == [ZVOL]
