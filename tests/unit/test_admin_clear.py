"""imgstorageadmin's "remove mapping" on a NAS goes through the NAS's store.

It used to write the row itself and leave ``transfer_snapshot`` set, so a
zvol cleared in the middle of a pull could later resume that stale pull (or
send a stale copy to its next container).
"""
from __future__ import annotations

import io

import pytest

from admin import imgstorageadmin
from imgstorage.config import from_dict
from imgstorage.drivers.base import ChapCredentials
from imgstorage.errors import DriverError, StateError
from imgstorage.nas.store import NasStore

from .nas_stub import put_row

POOL, ZVOL, MIB = "tank", "vol1", 1 << 20


@pytest.fixture
def admin(tmp_path):
    from imgstorage.drivers.sim import zfs as sim_zfs
    root = tmp_path / "sim"
    sim_zfs.create_pool(root, "nas-0-0", POOL, 1 << 40)
    cfg = from_dict({"name": "nas-0-0", "backend": "sim", "sim_root": str(root),
                     "db": str(tmp_path / "nas.db"), "log_file": str(tmp_path / "admin.log")})
    console = imgstorageadmin.Console(io.StringIO(), io.StringIO(), io.StringIO())
    return imgstorageadmin.build(cfg, "nas", console)


def partial_pull(zfs) -> None:
    """Half of an incremental stream received into the zvol, as a cut pull leaves it."""
    from imgstorage.drivers.sim import blockdev
    zfs.create_zvol(POOL, "src", 4 * MIB)
    blockdev.open_device(zfs.root, zfs.host, zfs.device_path(POOL, "src")).write(
        0, bytes(range(256)) * 4096)
    zfs.snapshot(POOL, "src", "s1")
    stream = zfs.send(POOL, "src", "s1")
    data = b""
    while True:
        piece = stream.read(1 << 16)
        if not piece:
            break
        data += piece
    stream.close()
    sink = zfs.receive(POOL, ZVOL, resumable=True)
    sink.write(data[:len(data) * 3 // 4])
    with pytest.raises(DriverError):
        sink.close()


def test_remove_mapping_forgets_the_transfer_and_its_partial_receive(admin):
    store = NasStore(admin.engine)
    zfs = admin.drivers.zfs
    partial_pull(zfs)
    assert zfs.resume_token(POOL, ZVOL)
    store.add(ZVOL, POOL, 4 * MIB)
    chap = ChapCredentials("imgstorage-0123abcd", "s3cret-s3cret-12")
    put_row(store, ZVOL, state="pulling", remotehost="compute-0-3", remotepool=POOL, sync=True,
            transfer_snapshot="imgstorage-2026-pull", chap_user=chap.userid,
            chap_secret=chap.password, failures=3, last_error="NAS<-VM sync: cut")

    out = admin.clear_mapping(ZVOL)
    assert out == f"{ZVOL}: mapping removed (pulling -> unmapped)"
    row = store.get(ZVOL)
    assert row.state == "unmapped"
    assert row.transfer_snapshot is None          # no stale pull to resume
    assert (row.remotehost, row.remotepool, row.chap_user, row.chap_secret) == (None,) * 4
    assert (row.failures, row.last_error, row.prior_state) == (0, None, None)
    assert zfs.resume_token(POOL, ZVOL) is None   # nor its partial receive


def test_remove_mapping_of_an_unknown_zvol_is_one_error_and_changes_nothing(admin):
    with pytest.raises(imgstorageadmin.AdminError, match="no zvol nope in the database"):
        admin.clear_mapping("nope")


def test_a_zvol_being_deleted_has_no_mapping_to_remove(admin):
    store = NasStore(admin.engine)
    store.add(ZVOL, POOL, 4 * MIB)
    put_row(store, ZVOL, state="deleting")
    with pytest.raises(imgstorageadmin.AdminError, match="is being deleted"):
        admin.clear_mapping(ZVOL)
    assert store.get(ZVOL).state == "deleting"
    with pytest.raises(StateError):
        store.clean(ZVOL)
