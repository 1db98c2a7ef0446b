"""The iSCSI initiator driver against recorded iscsiadm output."""
from __future__ import annotations

import pytest

from imgstorage.drivers.base import (ChapCredentials, DiscoveredTarget, InitiatorDriver,
                                     SessionInfo)
from imgstorage.drivers.iscsi import Iscsiadm, parse_sessions
from imgstorage.errors import CommandError, DriverError
from tests.unit.replay import ReplayRunner, load_fixture

IQN1 = "iqn.2001-04.com.nas-0-0-compute-0-1-0-vol"
IQN2 = "iqn.2001-04.com.nas-0-0-compute-0-2-0-vol"
IQN3 = "iqn.2001-04.com.nas-0-1-compute-0-3-0-vol"
PORTAL = "10.2.20.250"
NODE = ["iscsiadm", "-m", "node", "-T", IQN1, "-p", PORTAL]
SESSIONS = ["iscsiadm", "-m", "session", "-P", "3"]


def update(key, value):
    return NODE + ["--op", "update", "-n", key, "-v", value]


# ------------------------------------------------------------ initiator name
def test_initiator_name_skips_comments(tmp_path):
    path = tmp_path / "initiatorname.iscsi"
    path.write_text("## DO NOT EDIT OR REMOVE THIS FILE!\n"
                    "## If you remove this file, the iSCSI daemon will not start.\n"
                    "#InitiatorName=iqn.1993-08.org.debian:01:old\n"
                    "InitiatorName=iqn.1993-08.org.debian:01:3f2b9c1d7e5a\n")
    driver = Iscsiadm(ReplayRunner(), initiator_file=str(path))
    assert driver.initiator_name() == "iqn.1993-08.org.debian:01:3f2b9c1d7e5a"


def test_initiator_name_missing_line(tmp_path):
    path = tmp_path / "initiatorname.iscsi"
    path.write_text("# nothing here\n")
    with pytest.raises(DriverError, match="no InitiatorName"):
        Iscsiadm(ReplayRunner(), initiator_file=str(path)).initiator_name()


def test_initiator_name_unreadable_file(tmp_path):
    with pytest.raises(DriverError, match="cannot read the iSCSI initiator name"):
        Iscsiadm(ReplayRunner(), initiator_file=str(tmp_path / "absent")).initiator_name()


# ---------------------------------------------------------------- discovery
def test_discover_passes_a_host_name_through_unchanged():
    argv = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "nas-0-0.ibnet"]
    runner = ReplayRunner().expect(argv, "iscsi/discovery.txt")
    found = Iscsiadm(runner).discover("nas-0-0.ibnet")
    assert runner.argvs == [argv]
    assert found == [
        DiscoveredTarget("10.2.20.250:3260", 1, IQN1),
        DiscoveredTarget("10.2.20.250:3260", 1, IQN2),
        DiscoveredTarget("10.1.1.250:3260", 1, IQN1),
    ]


def test_discover_ipv6_portal():
    argv = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "[fe80::1]:3260"]
    runner = ReplayRunner().expect(argv, "iscsi/discovery_ipv6.txt")
    assert Iscsiadm(runner).discover("[fe80::1]:3260") == [
        DiscoveredTarget("[fe80::1]:3260", 1, IQN1)]


def test_discover_nothing_exported_is_empty():
    argv = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL]
    runner = ReplayRunner().expect(argv, "iscsi/discovery_no_portals.txt")
    assert Iscsiadm(runner).discover(PORTAL) == []


def test_discover_unreachable_portal_is_an_error():
    argv = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL]
    runner = ReplayRunner().expect(argv, "iscsi/discovery_refused.txt")
    with pytest.raises(CommandError) as err:
        Iscsiadm(runner).discover(PORTAL)
    assert err.value.returncode == 4
    assert "Could not perform SendTargets discovery" in str(err.value)


# -------------------------------------------------------------------- login
def test_login_without_chap_sets_no_auth_then_logs_in():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_ok.txt"))
    Iscsiadm(runner).login(IQN1, PORTAL)
    assert runner.argvs == [update("node.session.auth.authmethod", "None"), NODE + ["--login"]]


def test_login_with_chap_stores_credentials_first():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "CHAP"), "iscsi/node_update_ok.txt")
              .expect(update("node.session.auth.username", "vm1"), "iscsi/node_update_ok.txt")
              .expect(update("node.session.auth.password", "s3cret-pass"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_ok.txt"))
    Iscsiadm(runner).login(IQN1, PORTAL, ChapCredentials("vm1", "s3cret-pass"))
    assert runner.argvs == [
        update("node.session.auth.authmethod", "CHAP"),
        update("node.session.auth.username", "vm1"),
        update("node.session.auth.password", "s3cret-pass"),
        NODE + ["--login"],
    ]


def test_login_refused_credentials_exit_24():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_auth_failure.txt"))
    with pytest.raises(DriverError) as err:
        Iscsiadm(runner).login(IQN1, PORTAL)
    assert "authorization failure" in str(err.value) and IQN1 in str(err.value)


def test_login_when_already_logged_in_is_fine():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_already.txt"))
    Iscsiadm(runner).login(IQN1, PORTAL)
    runner.assert_all_used()


def test_login_without_a_node_record_says_discover_first():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_no_record.txt"))
    with pytest.raises(DriverError, match="discover the portal first"):
        Iscsiadm(runner).login(IQN1, PORTAL)


def test_update_without_a_node_record_says_discover_first():
    runner = ReplayRunner().expect(update("node.session.auth.authmethod", "CHAP"),
                                   "iscsi/node_update_no_record.txt")
    with pytest.raises(DriverError, match="discover the portal first"):
        Iscsiadm(runner).login(IQN1, PORTAL, ChapCredentials("vm1", "pw"))
    assert len(runner.calls) == 1


def test_a_failed_password_update_never_shows_the_password():
    runner = (ReplayRunner()
              .expect(update("node.session.auth.authmethod", "CHAP"), "iscsi/node_update_ok.txt")
              .expect(update("node.session.auth.username", "vm1"), "iscsi/node_update_ok.txt")
              .expect(update("node.session.auth.password", "s3cret-pass"),
                      stderr="iscsiadm: Could not execute operation on all records: "
                             "encountered iSCSI database failure\n",
                      returncode=6))
    with pytest.raises(DriverError) as err:
        Iscsiadm(runner).login(IQN1, PORTAL, ChapCredentials("vm1", "s3cret-pass"))
    assert "s3cret-pass" not in str(err.value)
    assert "node.session.auth.password" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ------------------------------------------------------------------- logout
def test_logout_with_portal():
    runner = ReplayRunner().expect(NODE + ["--logout"], "iscsi/logout_ok.txt")
    Iscsiadm(runner).logout(IQN1, PORTAL)
    assert runner.argvs == [NODE + ["--logout"]]


def test_logout_without_session_counts_as_logged_out():
    argv = ["iscsiadm", "-m", "node", "-T", IQN1, "--logout"]
    runner = ReplayRunner().expect(argv, "iscsi/logout_no_session.txt")
    Iscsiadm(runner).logout(IQN1)
    assert runner.argvs == [argv]


def test_logout_other_failures_are_errors():
    argv = ["iscsiadm", "-m", "node", "-T", IQN1, "--logout"]
    runner = ReplayRunner().expect(argv, stderr="iscsiadm: Could not logout of all requested sessions\n",
                                   returncode=8)
    with pytest.raises(CommandError, match="Could not logout"):
        Iscsiadm(runner).logout(IQN1)


# ----------------------------------------------------------------- sessions
def test_sessions_map_targets_to_disks():
    runner = ReplayRunner().expect(SESSIONS, "iscsi/sessions_p3.txt")
    assert Iscsiadm(runner).sessions() == [
        SessionInfo(IQN1, "10.2.20.250:3260", "sdc", 1),
        SessionInfo(IQN2, "10.2.20.250:3260", "sdd", 2),
        SessionInfo(IQN3, "[fe80::1]:3260", None, 3),
    ]


def test_sessions_of_older_open_iscsi_without_flash_marker():
    assert parse_sessions(load_fixture("iscsi/sessions_p3_old.txt").stdout) == [
        SessionInfo(IQN1, "10.2.20.250:3260", "sdb", 7)]


def test_one_target_line_can_cover_two_sessions():
    text = (f"Target: {IQN1} (non-flash)\n"
            "\tCurrent Portal: 10.2.20.250:3260,1\n"
            "\t\tSID: 4\n"
            "\t\t\tAttached scsi disk sde\t\tState: running\n"
            "\tCurrent Portal: 10.1.1.250:3260,1\n"
            "\t\tSID: 5\n"
            "\t\t\tAttached scsi disk sdf\t\tState: running\n")
    assert parse_sessions(text) == [SessionInfo(IQN1, "10.2.20.250:3260", "sde", 4),
                                    SessionInfo(IQN1, "10.1.1.250:3260", "sdf", 5)]


def test_no_active_sessions_is_empty():
    runner = ReplayRunner().expect(SESSIONS, "iscsi/sessions_none.txt")
    assert Iscsiadm(runner).sessions() == []


def test_sessions_other_failures_are_errors():
    runner = ReplayRunner().expect(SESSIONS, stderr="iscsiadm: can not connect to iSCSI daemon (111)!\n",
                                   returncode=20)
    with pytest.raises(CommandError, match="can not connect to iSCSI daemon"):
        Iscsiadm(runner).sessions()


def test_implements_the_protocol():
    assert isinstance(Iscsiadm(ReplayRunner()), InitiatorDriver)


def test_chap_password_is_marked_secret_for_the_runner():
    from imgstorage.drivers.base import ChapCredentials
    from imgstorage.drivers.iscsi import Iscsiadm
    from .replay import ReplayRunner
    iqn, portal = "iqn.2001-04.com.nas-0-0-vol1", "nas-0-0"
    node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
    runner = ReplayRunner()
    for key, value in (("authmethod", "CHAP"), ("username", "u1"), ("password", "s3cret-s3cret")):
        runner.expect(node + ["--op", "update", "-n", f"node.session.auth.{key}", "-v", value])
    runner.expect(node + ["--login"])
    Iscsiadm(runner).login(iqn, portal, ChapCredentials("u1", "s3cret-s3cret"))
    assert runner.redacted == ["s3cret-s3cret"]


# ------------------------------------------------------- a map's time budget
DISCOVER = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", PORTAL]


def test_discover_and_login_are_bounded_by_the_callers_time():
    runner = (ReplayRunner()
              .expect(DISCOVER, "iscsi/real_discovery.txt")
              .expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
              .expect(NODE + ["--login"], "iscsi/login_ok.txt"))
    driver = Iscsiadm(runner)
    assert driver.discover(PORTAL, timeout=7.5)
    driver.login(IQN1, PORTAL, timeout=4.25)
    runner.assert_all_used()
    timeouts = {tuple(call.argv): call.timeout for call in runner.calls}
    assert timeouts[tuple(DISCOVER)] == 7.5
    assert timeouts[tuple(NODE + ["--login"])] == 4.25


def test_without_a_budget_the_runners_own_timeout_applies():
    from imgstorage.runner import DEFAULT_TIMEOUT
    runner = ReplayRunner().expect(DISCOVER, "iscsi/real_discovery.txt")
    Iscsiadm(runner).discover(PORTAL)
    assert runner.calls[0].timeout == DEFAULT_TIMEOUT


@pytest.mark.parametrize("step", ["discovery", "login"])
def test_a_step_that_outlasts_the_budget_is_one_clear_error(step):
    runner = ReplayRunner()
    if step == "discovery":
        runner.expect(DISCOVER, timed_out=True)
    else:
        runner.expect(update("node.session.auth.authmethod", "None"), "iscsi/node_update_ok.txt")
        runner.expect(NODE + ["--login"], timed_out=True)
    driver = Iscsiadm(runner)
    with pytest.raises(DriverError) as err:
        if step == "discovery":
            driver.discover(PORTAL, timeout=2.0)
        else:
            driver.login(IQN1, PORTAL, timeout=2.0)
    assert not isinstance(err.value, CommandError)
    assert str(err.value).endswith("did not finish within 2.0 s")
    assert step in str(err.value) and "\n" not in str(err.value)
