"""A container whose host rebooted rebuilds its devices from its rows (simulated kernel).

No broker: the container service is driven directly, the NAS is a simulated
host with a pool, a zvol and the target its daemon would have made.  A
reboot is the simulated kernel's own (imgstorage-sim reboot), which drops
sessions and dm tables and keeps every zvol's bytes.
"""
from __future__ import annotations

import time

import pytest

from imgstorage import naming
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import blockdev, zfs as sim_zfs
from imgstorage.drivers.sim.reboot import reboot
from imgstorage.errors import StateError
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService
from imgstorage.vm.states import Event

NAS, HOST, POOL, ZVOL = "nas-0-0", "compute-0-3", "tank", "vol1"
MIB = 1024 * 1024
SIZE = 64 * MIB
CHAP = ChapCredentials("imgstorage-0123abcd", "s3cret-s3cret-12")
TARGET = naming.target_iqn(NAS, ZVOL)


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "sim"
    sim_zfs.create_pool(root, NAS, POOL, 1 << 40)
    sim_zfs.create_pool(root, HOST, POOL, 1 << 40)
    nas_cfg = from_dict({"name": NAS, "backend": "sim", "sim_root": str(root),
                         "db": str(tmp_path / "nas.db")})
    nas = node_drivers(nas_cfg)
    nas.zfs.create_zvol(POOL, ZVOL, SIZE)
    nas_disk = nas.zfs.device_path(POOL, ZVOL)
    blockdev.open_device(root, NAS, nas_disk).write(0, b"N" * MIB)

    cfg = from_dict({"name": HOST, "backend": "sim", "sim_root": str(root),
                     "db": str(tmp_path / "vm.db")})

    def start() -> VmService:
        engine = make_engine(cfg.db)
        create_schema(engine, VmBase)
        service = VmService(cfg, engine, node_drivers(cfg))
        service.recover()
        return service

    first = start()
    nas.target.create_target(TARGET, nas_disk, first.initiator_name(), CHAP)
    return root, nas, start, first


def dev(root, path: str):
    return blockdev.open_device(root, HOST, path)


def map_sync(service: VmService) -> str:
    return service.map_zvol(ZVOL, TARGET, NAS, True, POOL, CHAP, 10, volsize=SIZE)


def test_a_snapshot_device_comes_back_with_the_writes_made_before_the_reboot(world):
    root, _nas, start, service = world
    path = map_sync(service)
    dev(root, path).write(4096, b"V" * 8192)
    reboot(root, HOST)
    assert not service.drivers.dm.exists(f"{ZVOL}-snap")
    assert service.drivers.initiator.sessions() == []

    again = start()
    row = again.row(ZVOL)
    assert row.state == "snapshot" and row.last_error is None
    assert again.drivers.dm.exists(f"{ZVOL}-snap")
    data = dev(root, path).read(0, 3 * 8192)
    assert data == b"N" * 4096 + b"V" * 8192 + b"N" * (3 * 8192 - 4096 - 8192)
    dev(root, path).write(0, b"W" * 512)          # and it takes new writes
    assert dev(root, path).read(0, 512) == b"W" * 512


def test_a_local_device_comes_back_as_linear_over_the_local_copy(world):
    root, _nas, start, service = world
    path = map_sync(service)
    row = service.row(ZVOL)
    # the copy arrived and was merged (the local zvol stands in for the NAS's stream)
    local = service.drivers.zfs.device_path(POOL, ZVOL)
    dev(root, local).write(0, b"N" * MIB)
    dev(root, path).write(0, b"L" * 4096)
    service.start_merge(ZVOL)
    while service.row(ZVOL).state == "merging":
        service.sync.tick()
    assert service.row(ZVOL).state == "local"
    reboot(root, HOST)

    again = start()
    assert again.row(ZVOL).state == "local"
    assert again.drivers.dm.status(f"{ZVOL}-snap")[0].target_type == "linear"
    assert again.drivers.initiator.sessions() == []      # it needs no session any more
    assert dev(root, path).read(0, 8192) == b"L" * 4096 + b"N" * 4096
    assert row.devsize == again.row(ZVOL).devsize


def test_a_direct_session_logs_in_again_with_its_chap_credentials(world):
    root, _nas, start, service = world
    bdev = service.map_zvol(ZVOL, TARGET, NAS, False, None, CHAP, 10)
    reboot(root, HOST)
    again = start()
    assert again.row(ZVOL).state == "attached"
    assert again.row(ZVOL).bdev == bdev                  # the same disk name as before
    assert dev(root, bdev).read(0, 4) == b"NNNN"


def test_a_device_whose_local_copy_is_gone_is_broken_and_nothing_is_destroyed(world):
    root, _nas, start, service = world
    map_sync(service)
    reboot(root, HOST)
    service.drivers.zfs.destroy(POOL, f"{ZVOL}-temp-write")
    again = start()
    row = again.row(ZVOL)
    assert row.state == "broken" and row.prior_state == "snapshot"
    assert "tank/vol1-temp-write is gone" in row.last_error
    assert again.drivers.zfs.get_zvol(POOL, ZVOL) is not None     # the copy is kept
    listed = again.list_dev()[ZVOL]
    assert (listed["state"], listed["status"]) == ("broken", "broken")
    assert "is gone" in listed["error"]
    with pytest.raises(StateError, match="is broken on compute-0-3: tank/vol1-temp-write is gone"):
        again.unmap_zvol(ZVOL, TARGET, 5)


def test_a_restart_without_a_reboot_changes_nothing(world):
    root, _nas, start, service = world
    path = map_sync(service)
    before = (service.drivers.dm.table(f"{ZVOL}-snap"), service.drivers.initiator.sessions())
    again = start()
    assert (again.drivers.dm.table(f"{ZVOL}-snap"), again.drivers.initiator.sessions()) == before
    assert again.row(ZVOL).state == "snapshot"
    assert dev(root, path).read(0, 4) == b"NNNN"


def test_a_nas_that_is_not_back_yet_is_tried_again(world):
    root, nas, start, service = world
    map_sync(service)
    reboot(root, HOST)
    reboot(root, NAS)                               # the whole rack lost power
    again = start()
    row = again.row(ZVOL)
    assert row.state == "snapshot" and "rebuild" in row.last_error
    assert not again.drivers.dm.exists(f"{ZVOL}-snap")
    # the NAS daemon re-exports its target; the next attempt succeeds
    nas.target.create_target(TARGET, nas.zfs.device_path(POOL, ZVOL), again.initiator_name(),
                             CHAP)
    again.rebuilder._retry_at[ZVOL] = 0.0
    again.rebuilder.retry_due()
    assert again.drivers.dm.exists(f"{ZVOL}-snap")
    assert again.row(ZVOL).last_error is None


def test_a_merge_recorded_but_not_loaded_is_started_at_restart(world):
    root, _nas, start, service = world
    map_sync(service)
    # the daemon died between recording the merge and loading its table
    service.store.transition(ZVOL, Event.MERGE)
    again = start()
    assert again.drivers.dm.status(f"{ZVOL}-snap")[0].target_type == "snapshot-merge"


def merged_and_recorded(service: VmService) -> None:
    """The copy arrived and merged; the monitor recorded it (``switching``) and then died."""
    local = service.drivers.zfs.device_path(POOL, ZVOL)
    dev(service.drivers.zfs.root, local).write(0, b"N" * MIB)
    service.start_merge(ZVOL)
    figures = service.sync.merge_figures(ZVOL)
    while figures[0] != figures[2]:
        service.drivers.dm.merge_step(f"{ZVOL}-snap", 1 << 16)
        figures = service.sync.merge_figures(ZVOL)
    service.store.transition(ZVOL, Event.MERGED)


@pytest.mark.parametrize("rebooted", [False, True], ids=["killed", "rebooted"])
def test_a_switch_to_the_local_copy_cut_short_is_finished_at_start(world, rebooted):
    root, _nas, start, service = world
    path = map_sync(service)
    dev(root, path).write(0, b"L" * 4096)
    merged_and_recorded(service)
    assert service.row(ZVOL).state == "switching"
    if rebooted:
        reboot(root, HOST)
    again = start()
    assert again.row(ZVOL).state == "local"
    assert again.drivers.dm.status(f"{ZVOL}-snap")[0].target_type == "linear"
    assert again.drivers.zfs.get_zvol(POOL, f"{ZVOL}-temp-write") is None
    assert again.drivers.initiator.sessions() == []
    assert dev(root, path).read(0, 8192) == b"L" * 4096 + b"N" * 4096
    # and the unmap that used to answer "still merging" hands the copy over
    assert again.unmap_zvol(ZVOL, TARGET, 5) == {"local": True}
    assert again.row(ZVOL).state == "detached_local"


def test_a_flush_recorded_done_is_torn_down_at_start(world):
    root, nas, start, service = world
    path = map_sync(service)
    dev(root, path).write(0, b"F" * 8192)
    # the unmap's flush finished and was recorded; the daemon died before the teardown
    service.store.transition(ZVOL, Event.FLUSH)
    assert service.sync.flush_to_nas(service.row(ZVOL), time.monotonic() + 10)
    service.store.transition(ZVOL, Event.FLUSHED)
    again = start()
    assert again.row(ZVOL) is None
    assert not again.drivers.dm.exists(f"{ZVOL}-snap")
    assert again.drivers.initiator.sessions() == []
    assert again.drivers.zfs.get_zvol(POOL, ZVOL) is None
    assert again.drivers.zfs.get_zvol(POOL, f"{ZVOL}-temp-write") is None
    nas_disk = nas.zfs.device_path(POOL, ZVOL)
    assert blockdev.open_device(root, NAS, nas_disk).read(0, 8192 + 4096) == \
        b"F" * 8192 + b"N" * 4096


def test_a_flush_cut_by_a_reboot_resumes_and_every_write_reaches_the_nas(world, monkeypatch):
    from imgstorage.drivers.sim import dm as sim_dm
    root, nas, start, service = world
    path = map_sync(service)
    writes = bytes(range(256)) * 64                  # 16 KiB: two chunks and a bit
    dev(root, path).write(8192 * 3, writes)
    monkeypatch.setattr(sim_dm.policy, "rate", 0.0)   # the merge makes no progress by itself
    with pytest.raises(StateError, match="still writing the VM's changes back"):
        service.unmap_zvol(ZVOL, TARGET, 1)
    assert service.row(ZVOL).state == "flushing"
    service.drivers.dm.merge_step(f"{ZVOL}-snap", 1)  # one chunk went home before the reboot
    reboot(root, HOST)
    again = start()
    status = again.drivers.dm.status(f"{ZVOL}-snap")[0]
    assert status.target_type == "snapshot-merge"
    assert again.row(ZVOL).state == "flushing"
    monkeypatch.setattr(sim_dm.policy, "rate", 1e6)
    assert again.unmap_zvol(ZVOL, TARGET, 10) == {"local": False}
    assert again.row(ZVOL) is None
    nas_disk = nas.zfs.device_path(POOL, ZVOL)
    got = blockdev.open_device(root, NAS, nas_disk).read(0, 8192 * 3 + len(writes) + 4096)
    assert got == b"N" * (8192 * 3) + writes + b"N" * 4096


def test_a_row_of_an_older_release_learns_its_chap_from_a_repeated_map_and_rebuilds(world):
    root, _nas, start, service = world
    bdev = service.map_zvol(ZVOL, TARGET, NAS, False, None, CHAP, 10)
    service.store.update(ZVOL, chap_user=None, chap_secret=None)   # as an older release kept it
    assert service.map_zvol(ZVOL, TARGET, NAS, False, None, CHAP, 10) == bdev
    assert (service.row(ZVOL).chap_user, service.row(ZVOL).chap_secret) == (CHAP.userid,
                                                                         CHAP.password)
    reboot(root, HOST)
    again = start()
    assert again.row(ZVOL).last_error is None
    assert dev(root, bdev).read(0, 4) == b"NNNN"
