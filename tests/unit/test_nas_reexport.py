"""A NAS daemon starting after a reboot exports again the targets its containers use."""
import logging

import pytest

from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import NodeDrivers
from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import blockdev, dm, initiator, reboot, target, zfs
from imgstorage.drivers.tgt import TgtTarget
from imgstorage.nas import reexport
from imgstorage.nas.models import Base
from imgstorage.nas.states import TARGET_IN_USE, State
from imgstorage.nas.store import NasStore

from .nas_stub import put_row
from tests.unit.replay import ReplayRunner

NAS, VMC = "nas-0-0", "compute-0-1"
MIB = 1 << 20
LOG = "imgstorage.nas.reexport"


def iqn(zvol):
    return f"iqn.2001-04.com.{NAS}-{zvol}"


@pytest.fixture
def root(tmp_path):
    zfs.create_pool(tmp_path / "sim", NAS, "tank")
    return tmp_path / "sim"


@pytest.fixture
def store(tmp_path):
    engine = make_engine(str(tmp_path / "nas.db"))
    create_schema(engine, Base)
    return NasStore(engine)


def drivers(root, target_driver=None):
    return NodeDrivers(zfs=zfs.SimZfs(root, NAS),
                       target=target_driver or target.SimTarget(root, NAS),
                       initiator=initiator.SimInitiator(root, NAS),
                       dm=dm.SimDeviceMapper(root, NAS),
                       blockdev=blockdev.SimBlockDevices(root, NAS))


def me(root):
    return initiator.SimInitiator(root, VMC).initiator_name()


def add(root, store, zvol, state, chap=True, export=True, host=VMC):
    """A zvol in ``state`` as the daemon records it, exported as at map time."""
    zfs.SimZfs(root, NAS).create_zvol("tank", zvol, 4 * MIB, sparse=True)
    store.add(zvol, "tank", 4 * MIB)
    fields = dict(state=state, remotehost=host, iscsi_target=iqn(zvol), initiator=me(root),
                  bdev="/dev/sdb", chap_user=f"user-{zvol}" if chap else None,
                  chap_secret="secret-0123456" if chap else None)
    if state in ("local", "pulling", "unmapped"):
        fields.update(iscsi_target=None)
    put_row(store, zvol, **fields)
    if export and fields["iscsi_target"]:
        target.SimTarget(root, NAS).create_target(
            iqn(zvol), f"/dev/zvol/tank/{zvol}", me(root),
            ChapCredentials(f"user-{zvol}", "secret-0123456") if chap else None)


def test_the_set_is_the_states_that_keep_a_target():
    assert TARGET_IN_USE == {State.MAPPED, State.UPLOADING, State.MERGING, State.UNMAPPING}
    assert all(isinstance(s, State) for s in TARGET_IN_USE)


def test_after_a_reboot_every_target_in_use_comes_back_as_it_was(root, store, caplog):
    for zvol, st in (("a-vol", "mapped"), ("b-vol", "uploading"), ("c-vol", "merging"),
                     ("d-vol", "local"), ("e-vol", "pulling"), ("f-vol", "unmapped")):
        add(root, store, zvol, st, chap=zvol != "a-vol")
    before = target.read_targets(root, NAS)
    assert sorted(before) == [iqn("a-vol"), iqn("b-vol"), iqn("c-vol")]
    reboot.reboot(root, NAS)
    assert target.read_targets(root, NAS) == {}

    with caplog.at_level(logging.INFO, logger=LOG):
        report = reexport.reexport_targets(store, drivers(root))

    assert report.exported == ["a-vol", "b-vol", "c-vol"] and report.present == []
    assert target.read_targets(root, NAS) == before           # device, ACL and CHAP identical
    lines = [r.getMessage() for r in caplog.records]
    assert f"re-exported /dev/zvol/tank/b-vol as {iqn('b-vol')} to {me(root)} ({VMC}, " \
        "zvol uploading, CHAP)" in lines
    assert lines[-1].startswith("re-exported 3 targets of mapped zvols in ")
    assert lines[-1].endswith(" s; 0 were present")


def test_a_restart_without_a_reboot_changes_nothing(root, store, caplog, monkeypatch):
    add(root, store, "a-vol", "mapped")
    add(root, store, "b-vol", "merging")
    path = root / NAS / "target" / "targets.json"
    before = path.read_bytes(), path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(target.SimTarget, "create_target", lambda *a, **k: calls.append(a))
    with caplog.at_level(logging.INFO, logger=LOG):
        report = reexport.reexport_targets(store, drivers(root))
    assert report.present == ["a-vol", "b-vol"] and report.exported == [] and calls == []
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert caplog.records[-1].getMessage().endswith("re-exported 0 targets of mapped zvols in "
                                                     f"{report.seconds:.2f} s; 2 were present")


def test_conflicts_and_lost_volumes_are_reported_and_do_not_stop_the_others(root, store, caplog):
    add(root, store, "a-vol", "mapped")
    add(root, store, "b-vol", "mapped")
    add(root, store, "c-vol", "uploading")
    add(root, store, "d-vol", "mapped", export=False)
    add(root, store, "e-vol", "mapped", export=False)
    reboot.reboot(root, NAS)
    # someone else exported b-vol's name for another initiator; c-vol's volume is gone
    target.SimTarget(root, NAS).create_target(iqn("b-vol"), "/dev/zvol/tank/b-vol",
                                              "iqn.2005-03.org.open-iscsi:intruder")
    zfs.SimZfs(root, NAS).destroy("tank", "c-vol")
    store.update("e-vol", initiator=None)
    with caplog.at_level(logging.INFO, logger=LOG):
        report = reexport.reexport_targets(store, drivers(root))
    assert report.exported == ["a-vol", "d-vol"]
    assert report.conflicts == ["b-vol"] and report.missing == ["c-vol"]
    assert report.failed == ["e-vol"]
    assert target.read_targets(root, NAS)[iqn("b-vol")]["acls"] == \
        ["iqn.2005-03.org.open-iscsi:intruder"]                 # left as it was
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("exists with other settings" in e and "b-vol" in e for e in errors)
    assert any("GONE" in e and "c-vol" in e for e in errors)
    assert any("e-vol" in e and "no initiator" in e for e in errors)
    assert errors[-1] == ("targets of mapped zvols not exported again: 1 exist with other "
                          "settings; 1 have lost their volume; 1 failed")


def test_a_driver_failure_on_one_target_is_logged_and_the_rest_go_on(root, store, caplog):
    add(root, store, "a-vol", "mapped")
    add(root, store, "b-vol", "mapped")
    reboot.reboot(root, NAS)
    real = target.SimTarget(root, NAS)

    class Flaky:
        def list_targets(self):
            return real.list_targets()

        def create_target(self, name, *args):
            if name == iqn("a-vol"):
                from imgstorage.errors import DriverError
                raise DriverError("configfs said no")
            real.create_target(name, *args)

    with caplog.at_level(logging.INFO, logger=LOG):
        report = reexport.reexport_targets(store, drivers(root, Flaky()), settle=0)
    assert report.failed == ["a-vol"] and report.exported == ["b-vol"]
    assert any("configfs said no" in r.getMessage() for r in caplog.records)


def test_an_export_that_fails_while_the_device_links_settle_is_tried_again(root, store, caplog,
                                                                            monkeypatch):
    add(root, store, "a-vol", "mapped")
    add(root, store, "b-vol", "mapped")
    reboot.reboot(root, NAS)
    real = target.SimTarget(root, NAS)
    tries = []
    monkeypatch.setattr(reexport, "SETTLE_POLL", 0.01)

    class Settling:
        def list_targets(self):
            return real.list_targets()

        def create_target(self, name, *args):
            tries.append(name)
            if name == iqn("a-vol") and tries.count(name) < 3:
                from imgstorage.errors import DriverError
                raise DriverError("/dev/zvol/tank/a-vol: No such file or directory")
            real.create_target(name, *args)

    with caplog.at_level(logging.INFO, logger=LOG):
        report = reexport.reexport_targets(store, drivers(root, Settling()), settle=10)
    assert report.failed == [] and sorted(report.exported) == ["a-vol", "b-vol"]
    assert tries.count(iqn("a-vol")) == 3 and tries.count(iqn("b-vol")) == 1
    assert set(target.read_targets(root, NAS)) == {iqn("a-vol"), iqn("b-vol")}


# ------------------------------------------------------------- the real tgt driver
TGT = ["tgtadm", "--lld", "iscsi"]
SHOW = TGT + ["--mode", "target", "--op", "show"]
T_IQN = "iqn.2001-04.com.nas-0-0-compute-0-1-0-vol"
T_DEV = "/dev/zvol/tank/compute-0-1-0-vol"
T_INIT = "iqn.1993-08.org.debian:01:3f2b9c1d7e5a"


def tgt_row(root, store):
    zfs.SimZfs(root, NAS).create_zvol("tank", "compute-0-1-0-vol", 4 * MIB, sparse=True)
    store.add("compute-0-1-0-vol", "tank", 4 * MIB)
    put_row(store, "compute-0-1-0-vol", state="mapped", remotehost="vm-container-0-1",
                 iscsi_target=T_IQN, initiator=T_INIT)


def test_tgt_after_a_reboot_gets_the_same_lun_and_acl(root, store):
    tgt_row(root, store)
    runner = (ReplayRunner().expect(SHOW, "tgt/show_empty.txt", times=None)
              .expect(TGT + ["--mode", "target", "--op", "new", "--tid", "1", "-T", T_IQN], "tgt/ok.txt")
              .expect(TGT + ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
                             "-b", T_DEV], "tgt/ok.txt")
              .expect(TGT + ["--mode", "target", "--op", "bind", "--tid", "1", "-Q", T_INIT],
                      "tgt/ok.txt"))
    report = reexport.reexport_targets(store, drivers(root, TgtTarget(runner)))
    assert report.exported == ["compute-0-1-0-vol"]
    assert runner.argvs[-3:] == [
        TGT + ["--mode", "target", "--op", "new", "--tid", "1", "-T", T_IQN],
        TGT + ["--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1", "-b", T_DEV],
        TGT + ["--mode", "target", "--op", "bind", "--tid", "1", "-Q", T_INIT]]


def test_tgt_target_already_there_is_left_alone(root, store):
    tgt_row(root, store)
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt")
    report = reexport.reexport_targets(store, drivers(root, TgtTarget(runner)))
    assert report.present == ["compute-0-1-0-vol"] and report.exported == []
    assert runner.argvs == [SHOW]                              # one listing, no change
