"""The real drivers against output recorded on a real kernel (``real_*`` fixtures).

These fixtures were recorded inside the kernel tier's guests (tests/kernel/run
--record): Debian bookworm, kernel 6.1, open-iscsi 2.1.8 against the LIO
target, dmsetup 1.02.185, zfsutils-linux 2.1.11, psmisc's fuser.  The other
driver tests use fixtures written from the tools' documentation; these pin
what the tools really printed, including where it differed.
"""
from __future__ import annotations

import pytest

from imgstorage.drivers.blockdev import RealBlockDevices
from imgstorage.drivers.dm import Dmsetup, parse_status
from imgstorage.drivers.iscsi import Iscsiadm, parse_discovery, parse_sessions
from imgstorage.drivers.zfs import (ReceiveInterrupted, ReceiveMismatch, ZfsCli,
                                   is_receive_mismatch, parse_holds, parse_send_size,
                                   parse_snapshot_list, parse_zfs_list, stream_error)
from imgstorage.errors import CommandError, NotFoundError
from imgstorage.vm.sync import merged
from tests.unit.replay import ReplayRunner, load_fixture

IQN = "iqn.2001-04.com.nas-0-0-kdirect"
SNAP_DEV = "ksync-snap"
GIB = 1 << 30
SECTORS = GIB // 512


# ------------------------------------------------------------------ iSCSI
def test_real_discovery_names_the_portal_by_address_even_when_asked_by_name():
    found = parse_discovery(load_fixture("iscsi/real_discovery.txt").stdout)
    assert [(t.portal, t.tpgt, t.iqn) for t in found] == [("10.77.0.1:3260", 1, IQN)]


def test_real_session_of_a_lio_target_has_its_disk_on_lun_0():
    sessions = parse_sessions(load_fixture("iscsi/real_sessions_p3.txt").stdout)
    assert [(s.iqn, s.portal, s.sid, s.device) for s in sessions] == [
        (IQN, "10.77.0.1:3260", 1, "sda")]


def test_real_no_sessions_is_exit_21_not_an_error():
    runner = ReplayRunner().expect(["iscsiadm", "-m", "session", "-P", "3"],
                                   "iscsi/real_sessions_none.txt")
    assert Iscsiadm(runner).sessions() == []


def test_real_second_login_is_exit_15_and_accepted():
    node = ["iscsiadm", "-m", "node", "-T", IQN, "-p", "nas-0-0"]
    runner = (ReplayRunner()
              .expect(node + ["--op", "update", "-n", "node.session.auth.authmethod", "-v", "None"])
              .expect(node + ["--login"], "iscsi/real_login_already.txt"))
    Iscsiadm(runner).login(IQN, "nas-0-0")


def test_real_logout_without_session_is_exit_21_and_accepted():
    runner = ReplayRunner().expect(["iscsiadm", "-m", "node", "-T", IQN, "--logout"],
                                   "iscsi/real_logout_no_session.txt")
    Iscsiadm(runner).logout(IQN)


# --------------------------------------------------------- device mapper
SMALL = 64 * 1024 * 1024 // 512      # the 64 MiB device of the by-hand recordings


@pytest.mark.parametrize("fixture, length, kind, figures", [
    ("dm/real_status_snapshot.txt", SECTORS, "snapshot", (16304, SECTORS, 48)),
    ("dm/real_status_merging.txt", SECTORS, "snapshot-merge", (16304, SECTORS, 48)),
    ("dm/real_status_linear.txt", SECTORS, "linear", None),
    # empty: the header chunk and one exception area, 2 x 16 sectors
    ("dm/real_status_snapshot_empty.txt", SMALL, "snapshot", (32, SMALL, 32)),
    # merged: back to exactly that, whatever the number of areas used before
    ("dm/real_status_merged.txt", SMALL, "snapshot-merge", (32, SMALL, 32)),
])
def test_real_status_lines(fixture, length, kind, figures):
    (status,) = parse_status(load_fixture(fixture).stdout, SNAP_DEV)
    assert (status.start, status.length, status.target_type) == (0, length, kind)
    assert status.snapshot_figures() == figures


def test_real_linear_status_ends_in_a_space_and_has_no_args():
    text = load_fixture("dm/real_status_linear.txt").stdout
    assert text == "0 2097152 linear \n"
    assert parse_status(text, SNAP_DEV)[0].args == ""


def test_real_merge_is_done_when_only_metadata_is_left():
    merging = parse_status(load_fixture("dm/real_status_merging.txt").stdout, SNAP_DEV)[0]
    done = parse_status(load_fixture("dm/real_status_merged.txt").stdout, SNAP_DEV)[0]
    assert not merged(merging.snapshot_figures())
    assert merged(done.snapshot_figures())


def test_real_status_of_every_device_is_prefixed_by_its_name():
    (status,) = parse_status(load_fixture("dm/real_status_all.txt").stdout)
    assert (status.name, status.target_type, status.args) == (SNAP_DEV, "snapshot",
                                                              "16304/2097152 48")


def test_real_table_names_devices_by_number_not_by_path():
    # What was created with /dev/sda and /dev/zvol/... reads back as major:minor:
    # a table can never be compared with the paths it was made from.
    runner = (ReplayRunner()
              .expect(["dmsetup", "table", SNAP_DEV], "dm/real_table_snapshot.txt")
              .expect(["dmsetup", "table", "kdm-snap"], "dm/real_table_linear.txt"))
    assert Dmsetup(runner).table(SNAP_DEV) == "0 2097152 snapshot 8:0 230:16 P 16"
    assert Dmsetup(runner).table("kdm-snap") == "0 131072 linear 230:0 0"


def test_real_busy_remove_is_reported_while_the_device_exists():
    runner = (ReplayRunner()
              .expect(["dmsetup", "remove", "--retry", "kdm-snap"], "dm/real_remove_busy.txt")
              .expect(["dmsetup", "info", "kdm-snap"], stdout="Name: kdm-snap\n"))
    with pytest.raises(CommandError, match="Device or resource busy"):
        Dmsetup(runner).remove("kdm-snap")


def test_real_create_of_a_taken_name_fails():
    rec = load_fixture("dm/real_create_exists.txt")
    assert rec.returncode == 1 and "Device or resource busy" in rec.stderr


def test_real_missing_device():
    runner = (ReplayRunner()
              .expect(["dmsetup", "info", "nosuchdevice"], "dm/real_info_missing.txt")
              .expect(["dmsetup", "status", "nosuchdevice"], "dm/real_status_missing.txt"))
    dm = Dmsetup(runner)
    assert dm.exists("nosuchdevice") is False
    assert dm.status("nosuchdevice") == []


# -------------------------------------------------------------------- ZFS
def test_real_volume_list():
    zvols = parse_zfs_list(load_fixture("zfs/real_list_volumes.txt").stdout)
    assert [(z.name, z.volsize) for z in zvols] == [("tank/kdirect", GIB)]
    # A thick zvol: its refreservation counts as used, a little over its size.
    assert zvols[0].used > GIB


def test_real_missing_zvol_is_none():
    runner = ReplayRunner().expect(
        ["zfs", "list", "-Hp", "-o", "name,volsize,used,refer", "-t", "volume", "tank/nosuchvol"],
        "zfs/real_get_missing.txt")
    assert ZfsCli(runner).get_zvol("tank", "nosuchvol") is None


def test_real_destroy_of_an_exported_zvol_is_busy():
    runner = ReplayRunner().expect(["zfs", "destroy", "tank/kdirect"], "zfs/real_destroy_busy.txt")
    with pytest.raises(CommandError, match="dataset is busy"):
        ZfsCli(runner).destroy("tank", "kdirect", recursive=False)


def test_real_snapshot_list_and_send_estimate():
    snaps = parse_snapshot_list(load_fixture("zfs/real_list_snapshots.txt").stdout, "tank/ksync")
    assert len(snaps) == 1 and snaps[0].startswith("IMG-STORAGE-")
    # zfs send -nP over-estimates: this stream really was 25492440 bytes.
    assert parse_send_size(load_fixture("zfs/real_send_estimate.txt").stdout) == 26019040


def test_real_incremental_estimate_names_its_base_by_snapshot_name_only():
    text = load_fixture("zfs/real_send_estimate_incremental.txt").stdout
    assert text.splitlines()[0].split("\t")[:3] == ["incremental", "s1", "tank/ks-a@s2"]
    assert parse_send_size(text) == 1090016


@pytest.mark.parametrize("fixture, mismatch", [
    # zfs wraps this one over two lines: the words must be matched across the break
    ("zfs/real_receive_base_mismatch.txt", True),
    ("zfs/real_receive_full_over_history.txt", True),
    ("zfs/real_receive_truncated.txt", False),
])
def test_real_receive_refusals(fixture, mismatch):
    rec = load_fixture(fixture)
    assert rec.returncode == 1
    err = stream_error(["zfs", "receive", "-F", "tank/x"], rec.returncode, rec.stderr)
    assert isinstance(err, ReceiveMismatch) is mismatch
    assert is_receive_mismatch(Exception(rec.stderr)) is mismatch


def test_real_destroy_of_a_cow_zvol_right_after_the_switch_succeeds():
    # No holder lingers once the new table is resumed: no retry is needed there.
    runner = ReplayRunner().expect(["zfs", "destroy", "tank/kdm-cow"],
                                   "zfs/real_destroy_cow_held.txt")
    ZfsCli(runner).destroy("tank", "kdm-cow", recursive=False)


# ------------------------------------------------- resumable streams, holds
TOKEN_GET = ["zfs", "get", "-H", "-o", "value", "receive_resume_token"]


@pytest.mark.parametrize("cut, token_fixture, zvol", [
    # a full stream into a new zvol: the zvol itself is left, inconsistent
    ("zfs/real_receive_resumable_cut.txt", "zfs/real_resume_token_new.txt", "ksr-b"),
    # an incremental: the zvol keeps its data, the partial state is ksr-b/%recv
    ("zfs/real_receive_resumable_cut_incremental.txt", "zfs/real_resume_token_incremental.txt",
     "ksr-b"),
    # a full stream into an existing zvol without snapshots (-s with -F): ksr-d/%recv
    ("zfs/real_receive_resumable_cut_existing.txt", "zfs/real_resume_token_existing.txt",
     "ksr-d"),
])
def test_real_cut_resumable_receive_leaves_its_token_on_the_zvol(cut, token_fixture, zvol):
    rec = load_fixture(cut)
    assert rec.command.endswith(f"zfs receive -s -F tank/{zvol}") and rec.returncode == 1
    assert rec.stderr.splitlines()[1] == "Partially received snapshot is saved."
    assert isinstance(stream_error(["zfs"], rec.returncode, rec.stderr), ReceiveInterrupted)
    runner = ReplayRunner().expect(TOKEN_GET + [f"tank/{zvol}"], token_fixture)
    token = ZfsCli(runner).resume_token("tank", zvol)
    assert rec.stderr.splitlines()[-1] == f"    zfs send -t {token}"


def test_real_token_property_without_partial_state_and_without_the_zvol():
    assert load_fixture("zfs/real_resume_token_none.txt").stdout == "-\n"
    runner = (ReplayRunner()
              .expect(TOKEN_GET + ["tank/ksr-b"], "zfs/real_resume_token_none.txt")
              .expect(TOKEN_GET + ["tank/ksr-b"], "zfs/real_resume_token_missing.txt"))
    assert ZfsCli(runner).resume_token("tank", "ksr-b") is None
    assert ZfsCli(runner).resume_token("tank", "ksr-b") is None


@pytest.mark.parametrize("fixture", ["zfs/real_receive_resumable_refused.txt",
                                     "zfs/real_receive_resumable_refused_incremental.txt"])
def test_real_new_stream_is_refused_while_partial_state_exists(fixture):
    rec = load_fixture(fixture)
    assert rec.returncode == 1
    assert rec.stderr.endswith('destination tank/ksr-b contains partially-complete state from '
                               '"zfs receive -s".\n')
    assert not is_receive_mismatch(Exception(rec.stderr))


@pytest.mark.parametrize("fixture, size, what", [
    ("zfs/real_send_resume_estimate.txt", 4472952, ["full", "tank/ksr-a@s1"]),
    ("zfs/real_send_resume_estimate_incremental.txt", 3323480,
     ["incremental", "tank/ksr-a@s1", "tank/ksr-a@s2"]),
])
def test_real_resume_estimate_prints_the_token_contents_first(fixture, size, what):
    text = load_fixture(fixture).stdout
    lines = text.splitlines()
    assert lines[:2] == ["resume token contents:", "nvlist version: 0"]
    # unlike a plain incremental estimate, the base is named in full
    assert lines[-2].split("\t")[:-1] == what and lines[-1] == f"size\t{size}"
    assert parse_send_size(text) == size


def test_real_resumed_streams_completed():
    for name in ("zfs/real_send_resume.txt", "zfs/real_send_resume_incremental.txt"):
        rec = load_fixture(name)
        assert rec.returncode == 0 and rec.stderr == "", name


def test_real_resume_of_a_destroyed_snapshot_exits_255():
    rec = load_fixture("zfs/real_send_resume_gone.txt")
    assert rec.returncode == 255
    assert rec.stdout.startswith("resume token contents:\n")
    assert "size\t" not in rec.stdout


@pytest.mark.parametrize("fixture, code", [
    ("zfs/real_receive_abort.txt", 0), ("zfs/real_receive_abort_existing.txt", 0),
    ("zfs/real_receive_abort_none.txt", 1), ("zfs/real_receive_abort_missing.txt", 2),
])
def test_real_receive_abort_exit_codes_and_the_driver_takes_them_all(fixture, code):
    rec = load_fixture(fixture)
    assert rec.returncode == code
    name = rec.command.split()[-1]
    runner = ReplayRunner().expect(["zfs", "receive", "-A", name], fixture)
    ZfsCli(runner).abort_resume(*name.split("/"))
    runner.assert_all_used()


def test_real_holds_line_has_a_minute_timestamp():
    line = load_fixture("zfs/real_holds.txt").stdout
    name, tag, stamp = line.rstrip("\n").split("\t")
    assert (name, tag) == ("tank/ksr-a@s1", "imgstorage")
    assert len(stamp.split()) == 5 and stamp.split()[3].count(":") == 1   # "Tue Nov 24 16:38 2026"
    assert parse_holds(line, name) == ["imgstorage"]
    assert load_fixture("zfs/real_holds_none.txt").stdout == ""


def test_real_hold_and_release_twice_fail_in_zfs_and_not_in_the_driver():
    snap = "tank/ksr-a@s1"
    assert load_fixture("zfs/real_hold_exists.txt").returncode == 1
    assert load_fixture("zfs/real_release_none.txt").returncode == 1
    runner = (ReplayRunner()
              .expect(["zfs", "hold", "imgstorage", snap], "zfs/real_hold.txt")
              .expect(["zfs", "hold", "imgstorage", snap], "zfs/real_hold_exists.txt")
              .expect(["zfs", "release", "imgstorage", snap], "zfs/real_release.txt")
              .expect(["zfs", "release", "imgstorage", snap], "zfs/real_release_none.txt"))
    driver = ZfsCli(runner)
    driver.hold("tank", "ksr-a", "s1")
    driver.hold("tank", "ksr-a", "s1")
    driver.release("tank", "ksr-a", "s1")
    driver.release("tank", "ksr-a", "s1")
    runner.assert_all_used()


@pytest.mark.parametrize("fixture", ["zfs/real_hold_missing.txt", "zfs/real_holds_missing.txt",
                                     "zfs/real_release_missing.txt"])
def test_real_missing_snapshot_for_holds(fixture):
    rec = load_fixture(fixture)
    argv = rec.command.split()
    runner = ReplayRunner().expect(argv, fixture)
    pool, rest = argv[-1].split("/", 1)
    zvol, snap = rest.split("@")
    call = {"hold": ZfsCli.hold, "holds": ZfsCli.holds, "release": ZfsCli.release}[argv[1]]
    with pytest.raises(NotFoundError, match="dataset does not exist"):
        call(ZfsCli(runner), pool, zvol, snap)


def test_real_held_snapshot_blocks_both_destroys_with_the_same_words():
    single = load_fixture("zfs/real_destroy_snapshot_held.txt")
    recursive = load_fixture("zfs/real_destroy_recursive_held.txt")
    assert single.stderr == recursive.stderr == \
        "cannot destroy snapshot tank/ksr-a@s1: dataset is busy\n"
    runner = (ReplayRunner()
              .expect(["zfs", "destroy", "tank/ksr-a@s1"], "zfs/real_destroy_snapshot_held.txt")
              .expect(["zfs", "destroy", "-r", "tank/ksr-a"],
                      "zfs/real_destroy_recursive_held.txt"))
    with pytest.raises(CommandError, match="dataset is busy"):
        ZfsCli(runner).destroy_snapshot("tank", "ksr-a", "s1")
    with pytest.raises(CommandError, match="dataset is busy"):
        ZfsCli(runner).destroy("tank", "ksr-a")


# ------------------------------------------------------------ block layer
def test_real_size_of_an_iscsi_disk():
    runner = ReplayRunner().expect(["blockdev", "--getsize64", "/dev/sda"],
                                   "blockdev/real_getsize64.txt")
    assert RealBlockDevices(runner).size_bytes("/dev/sda") == GIB


def test_real_udev_probe_of_a_new_disk_is_not_a_user(tmp_path):
    """Right after a login fuser finds udev-worker and scsi_id on the disk: settle, ask again."""
    runner = (ReplayRunner()
              .expect(["fuser", "-s", "/dev/sda"], "blockdev/real_fuser_udev_probe.txt")
              .expect(["udevadm", "settle", "--timeout=10"], "blockdev/real_udevadm_settle.txt")
              .expect(["fuser", "-s", "/dev/sda"], "blockdev/real_fuser_after_settle.txt"))
    assert RealBlockDevices(runner, sysfs_root=str(tmp_path))._fuser("/dev/sda") is False


def test_without_udevadm_a_process_found_by_fuser_counts():
    runner = (ReplayRunner()
              .expect(["fuser", "-s", "/dev/sda"], "blockdev/real_fuser_udev_probe.txt")
              .expect(["udevadm", "settle", "--timeout=10"], not_found=True))
    assert RealBlockDevices(runner)._fuser("/dev/sda") is True


@pytest.mark.parametrize("fixture, busy", [("blockdev/real_fuser_in_use.txt", True),
                                           ("blockdev/real_fuser_after_settle.txt", False)])
def test_real_fuser_exit_status(fixture, busy):
    rec = load_fixture(fixture)
    device = rec.command.split()[-1]
    runner = ReplayRunner().expect(["fuser", "-s", device], fixture, times=None)
    if busy:   # a real holder is still there once udev has settled
        runner.expect(["udevadm", "settle", "--timeout=10"])
    assert RealBlockDevices(runner)._fuser(device) is busy
