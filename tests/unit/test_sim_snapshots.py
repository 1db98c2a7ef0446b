"""Simulated ZFS snapshots: copy-on-write per 128 KiB block, whoever writes the volume."""
import multiprocessing
import os
import random

import pytest

from imgstorage.drivers.sim import blockdev, dm, initiator, snapshots, target, zfs
from imgstorage.errors import DriverError, ValidationError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BLOCK = zfs.VOLBLOCKSIZE
SIZE = 8 * MIB
IQN = "iqn.2001-04.com.nas-v"


@pytest.fixture
def nas(tmp_path):
    zfs.create_pool(tmp_path, "nas", "tank")
    driver = zfs.SimZfs(tmp_path, "nas")
    driver.create_zvol("tank", "v", SIZE, sparse=True)
    return driver


def dev(driver, path="/dev/zvol/tank/v"):
    return blockdev.open_device(driver.root, driver.host, path)


def snap_bytes(driver, snap, vol="v"):
    return dev(driver, f"/dev/zvol/tank/{vol}@{snap}").read(0, SIZE)


def volume(driver, vol="v"):
    return snapshots.Volume.of(driver.root, driver.host, "tank", vol)


def allocated(path):
    return path.stat().st_blocks * 512


class Model:
    """What the volume and each snapshot must read as, kept in memory."""

    def __init__(self, driver):
        self.driver = driver
        self.live = bytearray(SIZE)
        self.snaps = {}

    def write(self, offset, data):
        dev(self.driver).write(offset, data)
        self.live[offset:offset + len(data)] = data

    def discard(self, offset, length):
        volume(self.driver).discard(offset, length)
        self.live[offset:offset + length] = bytes(length)

    def snapshot(self, name):
        self.driver.snapshot("tank", "v", name)
        self.snaps[name] = bytes(self.live)

    def destroy(self, name):
        self.driver.destroy_snapshot("tank", "v", name)
        del self.snaps[name]

    def check(self):
        assert dev(self.driver).read(0, SIZE) == bytes(self.live)
        assert self.driver.list_snapshots("tank", "v") == list(self.snaps)
        for name, content in self.snaps.items():
            assert snap_bytes(self.driver, name) == content, name


def test_a_snapshot_of_64_gib_copies_nothing(tmp_path, nas):
    nas.create_zvol("tank", "big", 64 * GIB, sparse=True)
    dev(nas, "/dev/zvol/tank/big").write(40 * GIB, os.urandom(3 * MIB))
    nas.snapshot("tank", "big", "s1")
    folder = tmp_path / "nas" / "zfs" / "tank" / "big" / "snapshots" / "s1"
    assert (folder / "blocks").stat().st_size == 64 * GIB
    assert allocated(folder / "blocks") == 0 and allocated(folder / "changed") == 0
    assert nas.list_snapshots("tank", "big") == ["s1"]


def test_snapshot_content_survives_later_writes(nas):
    m = Model(nas)
    m.write(0, os.urandom(3 * BLOCK + 17))
    m.write(5 * MIB + 3, b"tail of the disk")
    m.snapshot("s1")
    m.write(BLOCK - 5, b"across a block boundary")      # two blocks, partly
    m.write(2 * MIB, os.urandom(BLOCK))                 # a hole, whole block
    m.write(7 * MIB + 100, b"into a hole, partly")
    m.check()
    m.snapshot("s2")
    m.write(0, os.urandom(SIZE // 2))                     # everything s2 had there
    m.write(BLOCK - 5, b"again")
    m.discard(5 * MIB, BLOCK)
    m.check()
    m.snapshot("s3")
    m.check()


def test_snapshot_reads_stay_right_through_random_histories(nas):
    rng = random.Random(1234)
    m = Model(nas)
    serial = 0
    for step in range(120):
        roll = rng.random()
        if roll < 0.55:
            offset = rng.randrange(SIZE - 1)
            length = min(rng.choice([1, 100, 5000, BLOCK, 3 * BLOCK + 7]), SIZE - offset)
            m.write(offset, rng.randbytes(length) if rng.random() < 0.8 else bytes(length))
        elif roll < 0.65:
            first = rng.randrange(SIZE // BLOCK)
            m.discard(first * BLOCK, min(rng.randrange(1, 4) * BLOCK, SIZE - first * BLOCK))
        elif roll < 0.85 or not m.snaps:
            serial += 1
            m.snapshot(f"s{serial}")
        else:
            m.destroy(rng.choice(list(m.snaps)))
        if step % 10 == 9:
            m.check()
    m.check()


@pytest.mark.parametrize("victim", ["s1", "s2", "s3"])
def test_destroying_any_snapshot_keeps_the_others(nas, victim):
    m = Model(nas)
    for i, name in enumerate(["s1", "s2", "s3"]):
        m.write(i * BLOCK, os.urandom(2 * BLOCK))         # overlapping: each keeps something
        m.write(6 * MIB + i, bytes([i + 1]) * 10)
        m.snapshot(name)
    m.write(0, os.urandom(4 * BLOCK))
    m.destroy(victim)
    m.check()
    m.write(BLOCK // 2, os.urandom(BLOCK))                # writes after the merge too
    m.check()
    for name in list(m.snaps):
        m.destroy(name)
    m.check()


def test_changed_sets_are_the_blocks_written_between_snapshots(nas):
    vol = volume(nas)
    dev(nas).write(0, os.urandom(SIZE))
    nas.snapshot("tank", "v", "a")
    dev(nas).write(3 * BLOCK + 10, b"x")
    nas.snapshot("tank", "v", "b")
    dev(nas).write(10 * BLOCK, os.urandom(2 * BLOCK))
    vol.discard(40 * BLOCK, BLOCK)
    nas.snapshot("tank", "v", "c")
    dev(nas).write(63 * BLOCK, b"y")                       # after c: in nobody's range
    assert vol.changed_between("a", "b") == {3}
    assert vol.changed_between("b", "c") == {10, 11, 40}
    assert vol.changed_between("a", "c") == {3, 10, 11, 40}
    nas.destroy_snapshot("tank", "v", "b")                 # merged into a: a..c unchanged
    assert vol.changed_between("a", "c") == {3, 10, 11, 40}


def test_writes_through_a_dm_device_over_the_zvol_are_copied_on_write(tmp_path, nas):
    m = Model(nas)
    m.write(0, os.urandom(SIZE))
    m.snapshot("s1")
    mapper = dm.SimDeviceMapper(tmp_path, "nas")
    mapper.create("lin", f"0 {SIZE // 512} linear /dev/zvol/tank/v 0")
    through = dev(nas, "/dev/mapper/lin")
    data = os.urandom(3 * BLOCK)
    through.write(BLOCK + 999, data)
    m.live[BLOCK + 999:BLOCK + 999 + len(data)] = data
    m.check()


def test_a_dm_merge_into_the_zvol_keeps_its_snapshot(tmp_path, monkeypatch, nas):
    monkeypatch.setattr(dm, "policy", dm.MergePolicy(rate=0.0))
    nas.create_zvol("tank", "cow", SIZE, sparse=True)
    m = Model(nas)
    m.write(0, os.urandom(SIZE // 2))
    m.snapshot("before")
    mapper = dm.SimDeviceMapper(tmp_path, "nas")
    table = f"0 {SIZE // 512} %s /dev/zvol/tank/v /dev/zvol/tank/cow P 16"
    mapper.create("s", table % "snapshot")
    pattern = os.urandom(300 * KIB)
    dev(nas, "/dev/mapper/s").write(MIB + 5, pattern)
    m.check()                                               # the COW took it, not the zvol
    mapper.suspend("s")
    mapper.reload("s", table % "snapshot-merge")
    mapper.resume("s")
    assert mapper.merge_step("s", 10_000) > 0
    m.live[MIB + 5:MIB + 5 + len(pattern)] = pattern
    m.check()                                               # merged into the zvol, snapshot intact


def test_writes_from_a_vm_over_iscsi_are_copied_on_write(tmp_path, nas):
    zfs.create_pool(tmp_path, "vm", "tank")
    m = Model(nas)
    m.write(0, os.urandom(SIZE))
    m.snapshot("s1")
    ini = initiator.SimInitiator(tmp_path, "vm")
    target.SimTarget(tmp_path, "nas").create_target(IQN, "/dev/zvol/tank/v", ini.initiator_name())
    ini.login(IQN, "nas")
    (session,) = ini.sessions()
    data = os.urandom(BLOCK + 3)
    blockdev.open_device(tmp_path, "vm", f"/dev/{session.device}").write(4 * MIB - 1, data)
    m.live[4 * MIB - 1:4 * MIB - 1 + len(data)] = data
    m.check()


def test_zero_blocks_are_holes_and_snapshots_count_as_used(tmp_path, nas):
    data = tmp_path / "nas" / "zfs" / "tank" / "v" / "data"
    dev(nas).write(0, os.urandom(4 * BLOCK))
    dev(nas).write(BLOCK, bytes(BLOCK))                    # a whole block of zeros
    dev(nas).write(2 * BLOCK, bytes(100))                  # zeros into data: still data
    assert allocated(data) == 3 * BLOCK
    nas.snapshot("tank", "v", "s1")
    before = nas.get_zvol("tank", "v")
    assert before.used == before.refer == 3 * BLOCK
    dev(nas).write(3 * BLOCK, bytes(BLOCK))                # kept by s1, a hole in the volume
    after = nas.get_zvol("tank", "v")
    assert after.refer == 2 * BLOCK and after.used == 3 * BLOCK
    assert snap_bytes(nas, "s1")[3 * BLOCK:4 * BLOCK] != bytes(BLOCK)


def test_snapshots_list_in_creation_order(nas):
    for name in ["zz", "aa", "m:1", "b.2-x_y"]:
        nas.snapshot("tank", "v", name)
    assert nas.list_snapshots("tank", "v") == ["zz", "aa", "m:1", "b.2-x_y"]
    nas.destroy_snapshot("tank", "v", "aa")
    nas.snapshot("tank", "v", "aa")
    assert nas.list_snapshots("tank", "v") == ["zz", "m:1", "b.2-x_y", "aa"]


def test_errors_read_like_zfs(nas):
    nas.snapshot("tank", "v", "s")
    with pytest.raises(DriverError, match=r"^cannot create snapshot 'tank/v@s': "
                                          r"dataset already exists$"):
        nas.snapshot("tank", "v", "s")
    with pytest.raises(DriverError, match=r"^cannot open 'tank/nov': dataset does not exist$"):
        nas.snapshot("tank", "nov", "s")
    with pytest.raises(DriverError, match=r"^could not find any snapshots to destroy; "
                                          r"check snapshot names\.$"):
        nas.destroy_snapshot("tank", "v", "nope")
    with pytest.raises(DriverError, match=r"^could not find any snapshots to destroy"):
        nas.destroy_snapshot("tank", "nov", "s")
    with pytest.raises(DriverError, match=r"^cannot open 'tank/nov': dataset does not exist$"):
        nas.list_snapshots("tank", "nov")
    with pytest.raises(DriverError, match=r"^cannot destroy 'tank/v': volume has children$"):
        nas.destroy("tank", "v", recursive=False)
    assert nas.list_snapshots("tank", "v") == ["s"]


def test_a_host_that_does_not_exist_has_no_snapshots_and_gets_no_folder(tmp_path):
    ghost = zfs.SimZfs(tmp_path, "ghost")
    with pytest.raises(DriverError, match="dataset does not exist"):
        ghost.snapshot("tank", "v", "s")
    with pytest.raises(DriverError, match="could not find any snapshots"):
        ghost.destroy_snapshot("tank", "v", "s")
    with pytest.raises(DriverError, match="dataset does not exist"):
        ghost.send_size("tank", "v", "s")
    with pytest.raises(DriverError, match="dataset does not exist"):
        ghost.rollback("tank", "v", "s")
    assert not (tmp_path / "ghost").exists()


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "a@b", ".x", "../x", "x\n", "-x"])
def test_bad_snapshot_names_are_refused(tmp_path, nas, bad):
    with pytest.raises(ValidationError):
        nas.snapshot("tank", "v", bad)
    with pytest.raises(ValidationError):
        nas.destroy_snapshot("tank", "v", bad)
    assert nas.list_snapshots("tank", "v") == []
    assert os.listdir(tmp_path / "nas" / "zfs" / "tank" / "v" / "snapshots") == []


def test_destroying_the_zvol_destroys_its_snapshots(tmp_path, nas):
    nas.snapshot("tank", "v", "s1")
    nas.snapshot("tank", "v", "s2")
    nas.destroy("tank", "v")
    assert nas.get_zvol("tank", "v") is None
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    assert nas.list_snapshots("tank", "v") == []


def test_an_exported_snapshot_is_busy(tmp_path, nas):
    dev(nas).write(0, b"hello")
    nas.snapshot("tank", "v", "s1")
    assert dev(nas, "/dev/zvol/tank/v@s1").read(0, 5) == b"hello"
    with pytest.raises(blockdev.DeviceIOError, match="Read-only"):
        dev(nas, "/dev/zvol/tank/v@s1").write(0, b"x")
    tgt = target.SimTarget(tmp_path, "nas")
    tgt.create_target(IQN, "/dev/zvol/tank/v@s1", initiator.NAME_PREFIX + "vm")
    with pytest.raises(DriverError, match=r"^cannot destroy snapshot tank/v@s1: dataset is busy$"):
        nas.destroy_snapshot("tank", "v", "s1")
    with pytest.raises(DriverError, match=r"^cannot destroy 'tank/v': dataset is busy$"):
        nas.destroy("tank", "v")
    tgt.delete_target(IQN)
    nas.destroy_snapshot("tank", "v", "s1")
    with pytest.raises(DriverError, match="No such device"):
        dev(nas, "/dev/zvol/tank/v@s1")


def test_rollback_to_the_most_recent_snapshot(nas):
    m = Model(nas)
    m.write(0, os.urandom(SIZE // 2))
    m.snapshot("s1")
    m.write(BLOCK, os.urandom(5 * BLOCK))
    m.snapshot("s2")
    kept = bytes(m.live)
    m.write(3 * MIB, os.urandom(MIB))
    m.discard(0, BLOCK)
    with pytest.raises(DriverError, match="more recent snapshots"):
        nas.rollback("tank", "v", "s1")
    nas.rollback("tank", "v", "s2")
    m.live[:] = kept
    m.check()
    m.write(7, b"after the rollback")
    m.check()


def _hammer(root, barrier, seed):
    """Walk the blocks in the same order as the others, so first writes to a block collide."""
    rng = random.Random(seed)
    device = blockdev.open_device(root, "nas", "/dev/zvol/tank/v")
    barrier.wait()
    for b in range(SIZE // BLOCK):
        device.write(b * BLOCK + rng.randrange(BLOCK - 64), rng.randbytes(64))


def test_processes_writing_at_once_never_spoil_a_snapshot(tmp_path, nas):
    m = Model(nas)
    m.write(0, os.urandom(SIZE))
    m.snapshot("s1")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), barrier, seed)) for seed in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert snap_bytes(nas, "s1") == m.snaps["s1"]
    assert volume(nas).changed_between("s1", "s1") == set()
    nas.snapshot("tank", "v", "s2")
    assert volume(nas).changed_between("s1", "s2") == set(range(SIZE // BLOCK))
