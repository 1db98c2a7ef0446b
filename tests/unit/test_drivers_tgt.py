"""The tgt target driver against recorded tgtadm output."""
from __future__ import annotations

import pytest

from imgstorage import naming
from imgstorage.drivers.base import ChapCredentials, TargetDriver, TargetInfo
from imgstorage.drivers.tgt import TgtTarget, parse_show
from imgstorage.errors import CommandError, DriverError
from tests.unit.replay import ReplayRunner, load_fixture

TGT = ["tgtadm", "--lld", "iscsi"]
SHOW = TGT + ["--mode", "target", "--op", "show"]
IQN1 = "iqn.2001-04.com.nas-0-0-compute-0-1-0-vol"
IQN2 = "iqn.2001-04.com.nas-0-0-compute-0-2-0-vol"
NEW_IQN = "iqn.2001-04.com.nas-0-0-compute-0-9-0-vol"
DEV1 = "/dev/zvol/tank/compute-0-1-0-vol"
NEW_DEV = "/dev/zvol/tank/compute-0-9-0-vol"
INIT = "iqn.1993-08.org.debian:01:3f2b9c1d7e5a"


def new_target(tid, iqn=NEW_IQN):
    return TGT + ["--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn]


def new_lun(tid, device=NEW_DEV):
    return TGT + ["--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", "1", "-b", device]


def bind_initiator(tid, initiator=INIT):
    return TGT + ["--mode", "target", "--op", "bind", "--tid", str(tid), "-Q", initiator]


def delete_tid(tid):
    return TGT + ["--op", "delete", "--force", "--mode", "target", "--tid", str(tid)]


# ------------------------------------------------------------------ parsing
def test_show_parses_tids_devices_acls_accounts_and_nexus():
    first, second = parse_show(load_fixture("tgt/show_two.txt").stdout)
    assert (first.tid, first.iqn, first.device) == (1, IQN1, DEV1)
    assert first.luns == {0: None, 1: DEV1}
    assert first.acls == [INIT] and first.accounts == []
    assert first.connected == [INIT]
    assert (second.tid, second.iqn) == (2, IQN2)
    assert second.acls == ["10.2.20.1", "iqn.1993-08.org.debian:01:aa55aa55aa55"]
    assert second.initiator_acls == ["iqn.1993-08.org.debian:01:aa55aa55aa55"]
    assert second.accounts == ["compute-0-2-0-vol"]
    assert second.outgoing_account == "nas-out"
    assert second.connected == []


def test_show_survives_a_nameless_target_line_and_stray_text():
    nameless, named = parse_show(load_fixture("tgt/show_odd.txt").stdout)
    assert (nameless.tid, nameless.iqn, nameless.device) == (3, None, None)
    assert (named.tid, named.iqn, named.device, named.acls) == (7, IQN1, DEV1, [INIT])


def test_list_targets_reports_named_targets_with_initiator_acls():
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt")
    assert TgtTarget(runner).list_targets() == [
        TargetInfo(IQN1, DEV1, [INIT], 1),
        TargetInfo(IQN2, "/dev/zvol/tank/compute-0-2-0-vol",
                   ["iqn.1993-08.org.debian:01:aa55aa55aa55"], 2),
    ]
    assert runner.argvs == [SHOW]


def test_list_targets_skips_nameless_ones():
    runner = ReplayRunner().expect(SHOW, "tgt/show_odd.txt")
    assert [t.tid for t in TgtTarget(runner).list_targets()] == [7]


def test_no_tgt_daemon_is_an_error():
    runner = ReplayRunner().expect(SHOW, "tgt/tgtd_down.txt")
    with pytest.raises(CommandError, match="Transport endpoint is not connected"):
        TgtTarget(runner).list_targets()


# ----------------------------------------------------------------- creating
def test_create_takes_the_next_tid_and_binds_the_initiator_name():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(new_target(3), "tgt/ok.txt")
              .expect(new_lun(3), "tgt/ok.txt")
              .expect(bind_initiator(3), "tgt/ok.txt"))
    TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT)
    assert runner.argvs == [SHOW, new_target(3), new_lun(3), bind_initiator(3)]


def test_first_target_gets_tid_1():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_empty.txt")
              .expect(new_target(1), "tgt/ok.txt")
              .expect(new_lun(1), "tgt/ok.txt")
              .expect(bind_initiator(1), "tgt/ok.txt"))
    TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT)
    runner.assert_all_used()


def test_a_nameless_target_still_holds_its_tid():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_odd.txt")
              .expect(new_target(8), "tgt/ok.txt")
              .expect(new_lun(8), "tgt/ok.txt")
              .expect(bind_initiator(8), "tgt/ok.txt"))
    TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT)
    runner.assert_all_used()


def test_create_with_chap_makes_and_binds_an_account():
    account = TGT + ["--mode", "account", "--op", "new", "--user", "vm9", "--password", "pw9"]
    bind = TGT + ["--op", "bind", "--mode", "account", "--tid", "1", "--user", "vm9"]
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_empty.txt")
              .expect(new_target(1), "tgt/ok.txt")
              .expect(new_lun(1), "tgt/ok.txt")
              .expect(bind_initiator(1), "tgt/ok.txt")
              .expect(account, "tgt/ok.txt")
              .expect(bind, "tgt/ok.txt"))
    TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT, ChapCredentials("vm9", "pw9"))
    assert runner.argvs[-2:] == [account, bind]


def test_an_existing_account_is_replaced_to_set_its_password():
    account = TGT + ["--mode", "account", "--op", "new", "--user", "vm9", "--password", "pw9"]
    drop = TGT + ["--op", "delete", "--mode", "account", "--user", "vm9"]
    bind = TGT + ["--op", "bind", "--mode", "account", "--tid", "1", "--user", "vm9"]
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_empty.txt")
              .expect(new_target(1), "tgt/ok.txt")
              .expect(new_lun(1), "tgt/ok.txt")
              .expect(bind_initiator(1), "tgt/ok.txt")
              .expect(account, "tgt/account_exists.txt")
              .expect(drop, "tgt/ok.txt")
              .expect(account, "tgt/ok.txt")
              .expect(bind, "tgt/ok.txt"))
    TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT, ChapCredentials("vm9", "pw9"))
    assert runner.argvs[-4:] == [account, drop, account, bind]


def test_a_failed_account_never_shows_the_password_and_rolls_back():
    account = TGT + ["--mode", "account", "--op", "new", "--user", "vm9", "--password", "pw-secret"]
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_empty.txt")
              .expect(new_target(1), "tgt/ok.txt")
              .expect(new_lun(1), "tgt/ok.txt")
              .expect(bind_initiator(1), "tgt/ok.txt")
              .expect(account, stderr="tgtadm: too many accounts\n", returncode=22)
              .expect(delete_tid(1), "tgt/ok.txt"))
    with pytest.raises(DriverError) as err:
        TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT, ChapCredentials("vm9", "pw-secret"))
    assert "pw-secret" not in str(err.value) and "too many accounts" in str(err.value)
    assert runner.argvs[-1] == delete_tid(1)


def test_a_failed_lun_removes_the_half_made_target():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(new_target(3), "tgt/ok.txt")
              .expect(new_lun(3), "tgt/invalid_request.txt")
              .expect(delete_tid(3), "tgt/ok.txt"))
    with pytest.raises(CommandError, match="invalid request"):
        TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT)
    assert runner.argvs == [SHOW, new_target(3), new_lun(3), delete_tid(3)]


def test_a_target_that_appeared_meanwhile_is_reported():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(new_target(3), "tgt/target_exists.txt"))
    with pytest.raises(CommandError, match="this target already exists"):
        TgtTarget(runner).create_target(NEW_IQN, NEW_DEV, INIT)
    assert len(runner.calls) == 2


def test_creating_the_same_export_again_changes_nothing():
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt")
    TgtTarget(runner).create_target(IQN1, DEV1, INIT)
    assert runner.argvs == [SHOW]


def test_the_same_name_for_another_device_or_initiator_is_refused():
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt", times=None)
    driver = TgtTarget(runner)
    with pytest.raises(DriverError, match="already exists"):
        driver.create_target(IQN1, NEW_DEV, INIT)
    with pytest.raises(DriverError, match="already exists"):
        driver.create_target(IQN1, DEV1, "iqn.1993-08.org.debian:01:other")
    assert runner.argvs == [SHOW, SHOW]


def test_an_existing_target_open_to_an_address_is_not_adopted():
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt")
    with pytest.raises(DriverError, match="10.2.20.1"):
        TgtTarget(runner).create_target(IQN2, "/dev/zvol/tank/compute-0-2-0-vol",
                                        "iqn.1993-08.org.debian:01:aa55aa55aa55")
    assert runner.argvs == [SHOW]


# ----------------------------------------------------------------- deleting
def test_delete_finds_the_tid_and_forces():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(delete_tid(1), "tgt/ok.txt"))
    TgtTarget(runner).delete_target(IQN1)
    assert runner.argvs == [SHOW, delete_tid(1)]


def test_delete_drops_the_targets_own_chap_account():
    drop = TGT + ["--op", "delete", "--mode", "account", "--user", "compute-0-2-0-vol"]
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(delete_tid(2), "tgt/ok.txt")
              .expect(drop, "tgt/no_account.txt"))
    TgtTarget(runner).delete_target(IQN2)
    assert runner.argvs == [SHOW, delete_tid(2), drop]


def test_delete_of_an_absent_target_is_fine():
    runner = ReplayRunner().expect(SHOW, "tgt/show_two.txt")
    TgtTarget(runner).delete_target(NEW_IQN)
    assert runner.argvs == [SHOW]


def test_delete_racing_another_delete_is_fine():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(delete_tid(1), "tgt/no_target.txt"))
    TgtTarget(runner).delete_target(IQN1)
    runner.assert_all_used()


def test_delete_failing_otherwise_is_an_error():
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_two.txt")
              .expect(delete_tid(1), stderr="tgtadm: this target is still active\n", returncode=22))
    with pytest.raises(CommandError, match="still active"):
        TgtTarget(runner).delete_target(IQN1)


def test_implements_the_protocol():
    assert isinstance(TgtTarget(ReplayRunner()), TargetDriver)


@pytest.mark.parametrize("zvol", ["Vol1", "a_b"])
def test_the_target_name_of_any_zvol_reaches_tgtadm_as_the_nas_derived_it(zvol):
    """tgt keeps a target name as given; the NAS derives one both targets keep unchanged."""
    iqn = naming.target_iqn("nas-0-0", zvol)
    assert iqn == iqn.lower() and "_" not in iqn
    runner = (ReplayRunner()
              .expect(SHOW, "tgt/show_empty.txt")
              .expect(new_target(1, iqn), "tgt/ok.txt")
              .expect(new_lun(1), "tgt/ok.txt")
              .expect(bind_initiator(1), "tgt/ok.txt"))
    TgtTarget(runner).create_target(iqn, NEW_DEV, INIT)
    assert runner.argvs[1] == new_target(1, iqn)
