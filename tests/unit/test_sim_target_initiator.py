"""Simulated iSCSI: targets with ACLs on the NAS, sessions and /dev/sdX on containers."""
import pytest

from imgstorage.drivers.base import (ChapCredentials, DiscoveredTarget, InitiatorDriver,
                                     SessionInfo, TargetDriver, TargetInfo)
from imgstorage.drivers.sim import blockdev, initiator, target, zfs
from imgstorage.errors import DriverError, ValidationError

MIB = 1 << 20
T1, T2, T3 = ("iqn.2001-04.com.nas-0-0-vm-1-vol", "iqn.2001-04.com.nas-0-0-vm-2-vol",
              "iqn.2001-04.com.nas-0-0-vm-3-vol")
ME = "iqn.2005-03.org.open-iscsi:compute-0-1"


@pytest.fixture
def root(tmp_path):
    zfs.create_pool(tmp_path, "nas-0-0", "tank")
    nas = zfs.SimZfs(tmp_path, "nas-0-0")
    for n in (1, 2, 3):
        nas.create_zvol("tank", f"vm-{n}-vol", 4 * MIB, sparse=True)
    return tmp_path


@pytest.fixture
def tgt(root):
    return target.SimTarget(root, "nas-0-0")


@pytest.fixture
def ini(root):
    return initiator.SimInitiator(root, "compute-0-1")


def test_drivers_satisfy_protocols(tgt, ini):
    assert isinstance(tgt, TargetDriver) and isinstance(ini, InitiatorDriver)


def test_initiator_name_is_kept_in_a_file(root, ini):
    assert ini.initiator_name() == ME
    path = root / "compute-0-1" / "iscsi" / "initiatorname"
    assert path.read_text() == f"InitiatorName={ME}\n"
    path.write_text("## set by the administrator\nInitiatorName=iqn.2005-03.org.open-iscsi:custom\n")
    assert initiator.SimInitiator(root, "compute-0-1").initiator_name() == \
        "iqn.2005-03.org.open-iscsi:custom"


def test_target_registry(root, tgt):
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", ME)
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", ME)           # same settings: no-op
    chap = ChapCredentials("user1", "secret-1")
    tgt.create_target(T2, "/dev/zvol/tank/vm-2-vol", ME, chap)
    assert tgt.list_targets() == [TargetInfo(iqn=T1, device="/dev/zvol/tank/vm-1-vol", acls=[ME]),
                                  TargetInfo(iqn=T2, device="/dev/zvol/tank/vm-2-vol", acls=[ME])]
    stored = target.read_targets(root, "nas-0-0")
    assert stored[T2]["chap"] == {"userid": "user1", "password": "secret-1"}
    assert stored[T1]["chap"] is None
    with pytest.raises(DriverError, match="already exists with other settings"):
        tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", "iqn.2005-03.org.open-iscsi:other")
    with pytest.raises(DriverError, match="already exported by"):
        tgt.create_target(T3, "/dev/zvol/tank/vm-1-vol", ME)
    tgt.delete_target(T1)
    tgt.delete_target(T1)                                               # idempotent
    assert [t.iqn for t in tgt.list_targets()] == [T2]


def test_target_needs_an_existing_device(root, tgt):
    with pytest.raises(DriverError, match="does not exist on nas-0-0"):
        tgt.create_target(T1, "/dev/zvol/tank/nope", ME)
    with pytest.raises(DriverError):
        tgt.create_target(T1, "/dev/sdq", ME)
    with pytest.raises(ValidationError):
        tgt.create_target("not-an-iqn", "/dev/zvol/tank/vm-1-vol", ME)
    with pytest.raises(ValidationError):
        tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", "bad initiator")
    assert tgt.list_targets() == []
    assert target.SimTarget(root, "ghost").list_targets() == []
    target.SimTarget(root, "ghost").delete_target(T1)
    assert not (root / "ghost").exists()


def test_discovery(root, tgt, ini):
    tgt.create_target(T2, "/dev/zvol/tank/vm-2-vol", ME)
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", "iqn.2005-03.org.open-iscsi:other")
    assert ini.discover("nas-0-0") == [DiscoveredTarget("nas-0-0:3260", 1, T1),
                                       DiscoveredTarget("nas-0-0:3260", 1, T2)]
    assert ini.discover("nas-0-0.ibnet:3261")[0].portal == "nas-0-0.ibnet:3261"
    with pytest.raises(DriverError, match=r"^cannot make connection to nas-9-9: No route to host$"):
        ini.discover("nas-9-9")
    for bad in ("", "nas-0-0:port", "nas-0-0:70000", "nas-0-0:\u00b2", "nas-0-0\n", "../nas",
                "nas 0", "nas;rm"):
        with pytest.raises(ValidationError):
            ini.discover(bad)


def test_portal_convention():
    assert initiator.parse_portal("nas-0-0") == ("nas-0-0", "nas-0-0", 3260)
    assert initiator.parse_portal("nas-0-0.ibnet:3262") == ("nas-0-0", "nas-0-0.ibnet", 3262)


def test_login_assigns_disks_and_is_idempotent(root, tgt, ini):
    for n, iqn in enumerate((T1, T2, T3), 1):
        tgt.create_target(iqn, f"/dev/zvol/tank/vm-{n}-vol", ME)
    ini.login(T1, "nas-0-0")
    ini.login(T2, "nas-0-0.ibnet")
    ini.login(T1, "nas-0-0")                                            # no-op
    assert ini.sessions() == [SessionInfo(T1, "nas-0-0:3260", "sdb", 1),
                              SessionInfo(T2, "nas-0-0.ibnet:3260", "sdc", 2)]
    ini.logout(T1, "nas-0-0")
    ini.logout(T1, "nas-0-0")                                           # idempotent
    ini.logout(T1)
    ini.login(T3, "nas-0-0")                                            # lowest free name again
    assert [(s.iqn, s.device, s.sid) for s in ini.sessions()] == [(T2, "sdc", 2), (T3, "sdb", 3)]
    other = initiator.SimInitiator(root, "compute-0-2")
    assert other.sessions() == []


def test_login_checks_target_acl_and_chap(root, tgt, ini):
    with pytest.raises(DriverError, match="target not found"):
        ini.login(T1, "nas-0-0")
    with pytest.raises(DriverError, match="No route to host"):
        ini.login(T1, "nas-1-1")
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", "iqn.2005-03.org.open-iscsi:compute-0-2")
    with pytest.raises(DriverError, match="authorization failure"):
        ini.login(T1, "nas-0-0")
    tgt.create_target(T2, "/dev/zvol/tank/vm-2-vol", ME, ChapCredentials("u", "right"))
    with pytest.raises(DriverError, match="authorization failure"):
        ini.login(T2, "nas-0-0")
    with pytest.raises(DriverError, match="authorization failure"):
        ini.login(T2, "nas-0-0", ChapCredentials("u", "wrong"))
    assert ini.sessions() == []
    ini.login(T2, "nas-0-0", ChapCredentials("u", "right"))
    assert [s.iqn for s in ini.sessions()] == [T2]


def test_io_through_the_session_and_a_dead_link(root, tgt, ini):
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", ME)
    ini.login(T1, "nas-0-0")
    sdb = blockdev.open_device(root, "compute-0-1", "/dev/sdb")
    sdb.write(4096, b"through iSCSI")
    nas_dev = blockdev.open_device(root, "nas-0-0", "/dev/zvol/tank/vm-1-vol")
    assert nas_dev.read(4096, 13) == b"through iSCSI"
    tgt.delete_target(T1)
    with pytest.raises(blockdev.DeviceIOError, match="connection to iSCSI target .* lost"):
        sdb.read(4096, 13)
    with pytest.raises(blockdev.DeviceIOError):
        sdb.write(0, b"lost")
    assert nas_dev.read(0, 4) == bytes(4)
    assert [s.iqn for s in ini.sessions()] == [T1]                      # still listed, as iscsiadm does
    ini.logout(T1)
    with pytest.raises(blockdev.DeviceIOError, match="logged out"):
        sdb.read(0, 1)
    with pytest.raises(DriverError, match="No such device"):
        blockdev.open_device(root, "compute-0-1", "/dev/sdb")


def test_a_login_from_an_unknown_host_portal_changes_nothing(root, ini):
    with pytest.raises(DriverError):
        ini.login(T1, "ghost")
    assert not (root / "ghost").exists()
    with pytest.raises(ValidationError):
        ini.logout("nonsense")


def test_a_slow_login_is_cut_by_its_timeout_and_leaves_no_session(root, tgt, ini, monkeypatch):
    import time
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", ME)
    monkeypatch.setenv(initiator.LOGIN_DELAY_ENV, "0.6")
    started = time.monotonic()
    with pytest.raises(DriverError, match=r"login to .* did not finish within 0\.2 s"):
        ini.login(T1, "nas-0-0", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 0.6
    assert ini.sessions() == []
    started = time.monotonic()
    ini.login(T1, "nas-0-0", timeout=5)                   # time enough: it lands
    assert time.monotonic() - started >= 0.6
    assert [s.iqn for s in ini.sessions()] == [T1]


def test_a_slow_login_finds_a_target_deleted_meanwhile_gone(root, tgt, ini, monkeypatch):
    """The target is looked at when the login lands, not when it began."""
    import threading
    tgt.create_target(T1, "/dev/zvol/tank/vm-1-vol", ME)
    monkeypatch.setenv(initiator.LOGIN_DELAY_ENV, "0.5")
    timer = threading.Timer(0.1, tgt.delete_target, [T1])
    timer.start()
    with pytest.raises(DriverError, match="target not found"):
        ini.login(T1, "nas-0-0")
    timer.join()
    assert ini.sessions() == []
