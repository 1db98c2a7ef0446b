"""The snapshots sync mode keeps: the base is held, the rest trimmed, nobody else's touched."""
import pytest

from imgstorage import syncsnaps
from imgstorage.drivers.base import HOLD_TAG
from imgstorage.drivers.sim import zfs
from imgstorage.errors import DriverError


@pytest.fixture
def z(tmp_path):
    zfs.create_pool(tmp_path, "nas", "tank")
    driver = zfs.SimZfs(tmp_path, "nas")
    driver.create_zvol("tank", "v", 4 << 20, sparse=True)
    return driver


def snap(z, name):
    z.snapshot("tank", "v", name)
    return name


def test_settle_holds_the_new_base_releases_the_old_and_trims(z):
    theirs = snap(z, "before-upgrade")
    names = [snap(z, f"{syncsnaps.SNAP_PREFIX}2026112{n}T000000-00000{n}") for n in range(5)]
    z.hold("tank", "v", names[0])
    z.hold("tank", "v", names[1], "operator")          # somebody else's hold stays
    syncsnaps.settle(z, "tank", "v", names[4])
    left = z.list_snapshots("tank", "v")
    # the newest three of ours, the one another tag holds, and the operator's own snapshot
    assert left == [theirs, names[1], names[2], names[3], names[4]]
    assert z.holds("tank", "v", names[4]) == [HOLD_TAG]
    assert z.holds("tank", "v", names[1]) == ["operator"]
    assert all(z.holds("tank", "v", n) == [] for n in names[2:4])


def test_the_held_base_survives_a_stray_destroy(z):
    base = snap(z, syncsnaps.new_snapshot_name())
    syncsnaps.settle(z, "tank", "v", base)
    with pytest.raises(DriverError, match="dataset is busy"):
        z.destroy_snapshot("tank", "v", base)
    with pytest.raises(DriverError, match="dataset is busy"):
        z.destroy("tank", "v", recursive=True)
    assert z.list_snapshots("tank", "v") == [base]


def test_let_go_releases_our_holds_and_partial_receives_so_destroy_works(z):
    base = snap(z, syncsnaps.new_snapshot_name())
    syncsnaps.settle(z, "tank", "v", base)
    z.hold("tank", "v", base, "operator")
    syncsnaps.let_go(z, "tank", "v")
    assert z.holds("tank", "v", base) == ["operator"]     # only ours go
    z.release("tank", "v", base, "operator")
    z.destroy("tank", "v", recursive=True)
    assert z.get_zvol("tank", "v") is None
    syncsnaps.let_go(z, "tank", "v")                      # nothing left: no error


def test_snapshot_names_sort_by_time():
    a = syncsnaps.new_snapshot_name()
    assert a.startswith(syncsnaps.SNAP_PREFIX) and len(a) == len(syncsnaps.SNAP_PREFIX) + 22


def test_a_snapshot_name_says_up_to_when_writes_are_in_it():
    from imgstorage.syncsnaps import new_snapshot_name, taken_at
    import time as _time
    before = _time.time()
    name = new_snapshot_name()
    at = taken_at(name)
    assert at is not None and before - 1 < at <= _time.time()
    assert taken_at("IMG-STORAGE-20261129T210000-abcdef") == 1795986000.0
    assert taken_at("someone-elses") is None
    assert taken_at("IMG-STORAGE-notatime") is None
