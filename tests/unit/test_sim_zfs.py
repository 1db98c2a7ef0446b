"""Simulated ZFS: pools as folders, zvols as sparse files, the real tool's error texts."""
import json
import multiprocessing
import os

import pytest

from imgstorage.drivers.base import ZfsDriver, ZvolInfo
from imgstorage.drivers.sim import blockdev, initiator, target, zfs
from imgstorage.errors import DriverError, ValidationError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture
def nas(tmp_path):
    zfs.create_pool(tmp_path, "nas", "tank")
    return zfs.SimZfs(tmp_path, "nas")


def test_driver_satisfies_protocol(nas):
    assert isinstance(nas, ZfsDriver)


def test_pools_come_from_the_administrator_only(tmp_path, nas):
    assert nas.list_pools() == ["tank"]
    assert nas.pool_exists("tank") and not nas.pool_exists("data")
    with pytest.raises(DriverError, match=r"^cannot create 'tank': pool already exists$"):
        zfs.create_pool(tmp_path, "nas", "tank")
    zfs.create_pool(tmp_path, "nas", "data")
    assert nas.list_pools() == ["data", "tank"]
    assert zfs.SimZfs(tmp_path, "elsewhere").list_pools() == []


def test_a_64_gib_sparse_zvol_costs_nothing(tmp_path, nas):
    nas.create_zvol("tank", "big", 64 * GIB, sparse=True)
    folder = tmp_path / "nas" / "zfs" / "tank" / "big"
    st = (folder / "data").stat()
    assert st.st_size == 64 * GIB
    assert st.st_blocks * 512 < MIB
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["volsize"] == 64 * GIB
    assert meta["volblocksize"] == 128 * KIB
    assert meta["sparse"] is True
    assert isinstance(meta["creation"], int) and meta["creation"] > 0
    assert (folder / "snapshots").is_dir()
    info = nas.get_zvol("tank", "big")
    assert info == ZvolInfo(name="tank/big", volsize=64 * GIB, used=info.used, refer=info.used)
    assert info.pool == "tank" and info.zvol == "big" and info.used < MIB


def test_used_and_refer_are_the_allocated_bytes(nas):
    nas.create_zvol("tank", "v", 16 * MIB, sparse=True)
    before = nas.get_zvol("tank", "v")
    dev = blockdev.open_device(nas.root, "nas", "/dev/zvol/tank/v")
    dev.write(4 * MIB, os.urandom(MIB))
    after = nas.get_zvol("tank", "v")
    assert after.used == after.refer
    assert after.used >= before.used + MIB
    assert after.volsize == 16 * MIB


def test_thick_zvols_reserve_their_size(tmp_path):
    zfs.create_pool(tmp_path, "nas", "small", size=GIB)
    driver = zfs.SimZfs(tmp_path, "nas")
    driver.create_zvol("small", "a", 768 * MIB)
    with pytest.raises(DriverError, match=r"^cannot create 'small/b': out of space$"):
        driver.create_zvol("small", "b", 512 * MIB)
    driver.create_zvol("small", "b", 512 * MIB, sparse=True)
    assert driver.pool_usage("small")["avail"] == GIB - 768 * MIB
    assert [z.name for z in driver.list_zvols("small")] == ["small/a", "small/b"]


def test_errors_read_like_zfs(nas):
    with pytest.raises(DriverError, match=r"^cannot create 'nopool/v': no such pool 'nopool'$"):
        nas.create_zvol("nopool", "v", GIB)
    nas.create_zvol("tank", "v", GIB)
    with pytest.raises(DriverError, match=r"^cannot create 'tank/v': dataset already exists$"):
        nas.create_zvol("tank", "v", 2 * GIB)
    assert nas.get_zvol("tank", "v").volsize == GIB
    with pytest.raises(DriverError, match=r"^cannot open 'tank/nov': dataset does not exist$"):
        nas.destroy("tank", "nov")
    with pytest.raises(DriverError, match="multiple of volume block size"):
        nas.create_zvol("tank", "odd", GIB + 512)
    with pytest.raises(DriverError, match="cannot be zero"):
        nas.create_zvol("tank", "zero", 0)
    assert nas.get_zvol("tank", "odd") is None and nas.get_zvol("tank", "zero") is None


@pytest.mark.parametrize("bad", ["../x", "a/b", "a b", "a;b", "", ".hidden", "x\n"])
def test_bad_names_change_nothing(tmp_path, nas, bad):
    before = sorted(p.name for p in (tmp_path / "nas" / "zfs" / "tank").iterdir())
    with pytest.raises(ValidationError):
        nas.create_zvol("tank", bad, GIB)
    with pytest.raises(ValidationError):
        nas.create_zvol(bad, "v", GIB)
    assert sorted(p.name for p in (tmp_path / "nas" / "zfs" / "tank").iterdir()) == before


def test_listing_is_sorted_and_per_pool(tmp_path, nas):
    zfs.create_pool(tmp_path, "nas", "data")
    for pool, vol in [("tank", "b"), ("tank", "a"), ("data", "c")]:
        nas.create_zvol(pool, vol, GIB, sparse=True)
    assert [z.name for z in nas.list_zvols()] == ["data/c", "tank/a", "tank/b"]
    assert [z.name for z in nas.list_zvols("tank")] == ["tank/a", "tank/b"]
    with pytest.raises(DriverError, match=r"^cannot open 'nope': dataset does not exist$"):
        nas.list_zvols("nope")
    assert nas.get_zvol("nope", "a") is None


def test_destroy_removes_the_volume(tmp_path, nas):
    nas.create_zvol("tank", "v", GIB, sparse=True)
    nas.destroy("tank", "v")
    assert nas.get_zvol("tank", "v") is None
    assert list((tmp_path / "nas" / "zfs" / "tank").iterdir()) == [
        tmp_path / "nas" / "zfs" / "tank" / ".pool.json"]
    nas.create_zvol("tank", "v", 2 * GIB)            # the name is free again
    assert nas.get_zvol("tank", "v").volsize == 2 * GIB


def test_destroy_refuses_a_volume_that_is_exported(tmp_path, nas):
    nas.create_zvol("tank", "v", GIB, sparse=True)
    tgt = target.SimTarget(tmp_path, "nas")
    tgt.create_target("iqn.2001-04.com.nas-v", "/dev/zvol/tank/v",
                      initiator.NAME_PREFIX + "compute-0-1")
    with pytest.raises(DriverError, match=r"^cannot destroy 'tank/v': dataset is busy$"):
        nas.destroy("tank", "v")
    assert nas.get_zvol("tank", "v") is not None
    tgt.delete_target("iqn.2001-04.com.nas-v")
    nas.destroy("tank", "v")
    assert nas.get_zvol("tank", "v") is None


def test_snapshots_are_children(tmp_path, nas):
    nas.create_zvol("tank", "v", GIB, sparse=True)
    nas.snapshot("tank", "v", "s1")
    with pytest.raises(DriverError, match=r"^cannot destroy 'tank/v': volume has children$"):
        nas.destroy("tank", "v", recursive=False)
    assert nas.list_snapshots("tank", "v") == ["s1"]
    nas.destroy("tank", "v", recursive=True)
    assert nas.get_zvol("tank", "v") is None


def test_device_path(nas):
    assert nas.device_path("tank", "vm-1-vol") == "/dev/zvol/tank/vm-1-vol"
    with pytest.raises(ValidationError):
        nas.device_path("tank", "../etc")


def _race(root, barrier, results, name):
    barrier.wait()
    try:
        zfs.SimZfs(root, "nas").create_zvol("tank", name, GIB, sparse=True)
        results.put("ok")
    except DriverError as exc:
        results.put(str(exc))


def test_concurrent_processes_create_one_zvol_once(tmp_path, nas):
    ctx = multiprocessing.get_context("fork")
    count = 6
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results, "same"))
             for _ in range(count)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert outcomes.count("ok") == 1
    assert outcomes.count("cannot create 'tank/same': dataset already exists") == count - 1
    assert [z.name for z in nas.list_zvols()] == ["tank/same"]
    leftovers = [p.name for p in (tmp_path / "nas" / "zfs" / "tank").iterdir()
                 if p.name.startswith(".") and p.name not in (".pool.json",)]
    assert leftovers == []
