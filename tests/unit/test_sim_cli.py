"""imgstorage-sim: pools, listings and raw bytes; every failure one line, nothing changed."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgstorage.drivers.sim import cli, dm, hypervisor, initiator, target, zfs

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path):
    return tmp_path / "sim"


def run(root, *args, input=None):
    return CliRunner().invoke(cli.cli, ["--sim-root", str(root), *args], input=input)


def tree(root):
    """Every file under root with a digest of its content, to prove nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def cluster(root):
    assert run(root, "zpool", "create", "--host", "nas-0-0", "tank").exit_code == 0
    zfs.SimZfs(root, "nas-0-0").create_zvol("tank", "vm-1-vol", 4 * MIB, sparse=True)
    return root


def test_zpool_create_and_list(root):
    result = run(root, "zpool", "create", "--host", "nas-0-0", "--size", "2T", "tank")
    assert result.exit_code == 0 and result.stdout == ""
    assert zfs.SimZfs(root, "nas-0-0").list_pools() == ["tank"]
    again = run(root, "zpool", "create", "--host", "nas-0-0", "tank")
    assert again.exit_code == 1
    assert again.stderr == "imgstorage-sim: error: cannot create 'tank': pool already exists\n"
    listing = run(root, "zpool", "list", "--host", "nas-0-0")
    assert listing.exit_code == 0
    assert listing.stdout.splitlines() == ["NAME  SIZE  ALLOC  FREE  HEALTH",
                                           "tank    2T     0B    2T  ONLINE"]


def test_zfs_list(cluster):
    zfs.SimZfs(cluster, "nas-0-0").create_zvol("tank", "thick", 64 * MIB)
    result = run(cluster, "zfs", "list", "--host", "nas-0-0")
    assert result.exit_code == 0
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["NAME", "USED", "AVAIL", "REFER", "MOUNTPOINT"]
    assert [row[0] for row in lines[1:]] == ["tank", "tank/thick", "tank/vm-1-vol"]
    assert lines[1][4] == "/tank" and lines[2][4] == "-"
    assert lines[2][2] == "1024G"                                  # 1 TiB less the thick 64 MiB


def test_write_then_read_bytes_through_any_device(cluster):
    payload = bytes(range(256)) * 40 + b"\n\x00end"
    result = run(cluster, "write", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol",
                 "--offset", "1000", input=payload)
    assert result.exit_code == 0, result.stderr
    out = run(cluster, "read", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol",
              "--offset", "1000", "--length", str(len(payload)))
    assert out.exit_code == 0 and out.stdout_bytes == payload
    ini = initiator.SimInitiator(cluster, "compute-0-1")
    target.SimTarget(cluster, "nas-0-0").create_target(
        "iqn.2001-04.com.nas-0-0-vm-1-vol", "/dev/zvol/tank/vm-1-vol", ini.initiator_name())
    ini.login("iqn.2001-04.com.nas-0-0-vm-1-vol", "nas-0-0")
    seen = run(cluster, "read", "--host", "compute-0-1", "/dev/sdb", "--offset", "1000",
               "--length", "256")
    assert seen.exit_code == 0 and seen.stdout_bytes == bytes(range(256))


def test_listings_of_dm_sessions_and_domains(cluster):
    ini = initiator.SimInitiator(cluster, "compute-0-1")
    ini.initiator_name()                                            # the container's first act
    assert run(cluster, "iscsi", "sessions", "--host", "compute-0-1").stdout == "No active sessions\n"
    assert run(cluster, "dmsetup", "status", "--host", "compute-0-1").stdout == "No devices found\n"
    iqn = "iqn.2001-04.com.nas-0-0-vm-1-vol"
    target.SimTarget(cluster, "nas-0-0").create_target(iqn, "/dev/zvol/tank/vm-1-vol",
                                                       ini.initiator_name())
    ini.login(iqn, "nas-0-0")
    mapper = dm.SimDeviceMapper(cluster, "compute-0-1")
    mapper.create("lin", "0 8192 linear /dev/sdb 0")
    hypervisor.SimHypervisor(cluster).start("compute-0-1", "vm-1", "/dev/mapper/lin", 512, 1)
    sessions = run(cluster, "iscsi", "sessions", "--host", "compute-0-1")
    assert sessions.stdout == f"tcp: [1] nas-0-0:3260,1 {iqn} (non-flash) /dev/sdb\n"
    status = run(cluster, "dmsetup", "status", "--host", "compute-0-1")
    assert status.stdout == "lin: 0 8192 linear\n"
    assert run(cluster, "dmsetup", "status", "--host", "compute-0-1", "lin").stdout == status.stdout
    domains = run(cluster, "domains", "--host", "compute-0-1")
    assert domains.stdout.splitlines() == ["NAME  STATE    DISK", "vm-1  running  /dev/mapper/lin"]


@pytest.mark.parametrize("args", [
    ["zpool", "create", "--host", "nas-0-0", "ta/nk"],
    ["zpool", "create", "--host", "nas-0-0", "t;nk"],
    ["zpool", "create", "--host", "nas-0-0", ".."],
    ["zpool", "create", "--host", "nas 0", "tank2"],
    ["zpool", "create", "--host", "../x", "tank2"],
    ["zpool", "create", "--host", "nas-0-0", "--size", "-5G", "tank2"],
    ["zpool", "create", "--host", "nas-0-0", "tank"],
    ["zpool", "list", "--host", "ghost"],
    ["zfs", "list", "--host", "ghost"],
    ["zfs", "list"],
    ["write", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--offset", "-1"],
    ["write", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--offset", str(4 * MIB - 2)],
    ["write", "--host", "nas-0-0", "/dev/zvol/tank/../vm-1-vol"],
    ["write", "--host", "nas-0-0", "/dev/zvol/tank/vm 1"],
    ["write", "--host", "ghost", "/dev/zvol/tank/vm-1-vol"],
    ["read", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--length", "-1"],
    ["read", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--offset", "-1", "--length", "1"],
    ["read", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--length", "x"],
    ["read", "--host", "nas-0-0", "/dev/zvol/tank/vm-1-vol", "--length", str(4 * MIB + 1)],
    ["read", "--host", "nas-0-0", "/etc/passwd", "--length", "1"],
    ["dmsetup", "status", "--host", "nas-0-0", "no;such"],
    ["dmsetup", "status", "--host", "nas-0-0", "nosuch"],
    ["iscsi", "sessions", "--host", "gh ost"],
    ["domains", "--host", "ghost"],
    ["zfs", "snapshots", "--host", "nas-0-0", "tank"],
    ["zfs", "snapshots", "--host", "nas-0-0", "tank/nosuch"],
    ["zfs", "release", "--host", "nas-0-0", "imgstorage", "tank/vm-1-vol"],
    ["zfs", "release", "--host", "nas-0-0", "imgstorage", "tank/vm-1-vol@nosuch"],
    ["zfs", "destroy", "--host", "nas-0-0", "tank/vm-1-vol@nosuch"],
    ["zfs", "destroy", "--host", "nas-0-0", "tank/../x@s"],
    ["nonsense"],
])
def test_bad_input_is_one_line_and_changes_nothing(cluster, args):
    before = tree(cluster)
    result = run(cluster, *args, input=b"data")
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imgstorage-sim: error: ")
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert tree(cluster) == before


@pytest.mark.parametrize("command", [[], ["zpool"], ["zpool", "create"], ["zpool", "list"],
                                     ["zfs"], ["zfs", "list"], ["write"], ["read"], ["dmsetup"],
                                     ["dmsetup", "status"], ["iscsi"], ["iscsi", "sessions"],
                                     ["domains"], ["zfs", "snapshots"], ["zfs", "release"],
                                     ["zfs", "destroy"]])
def test_help_on_every_command(command):
    result = CliRunner().invoke(cli.cli, [*command, "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")


def test_snapshots_their_holds_release_and_destroy(cluster):
    driver = zfs.SimZfs(cluster, "nas-0-0")
    driver.snapshot("tank", "vm-1-vol", "s1")
    driver.hold("tank", "vm-1-vol", "s1", "imgstorage-kept")
    guid = driver.snapshot_guid("tank", "vm-1-vol", "s1")
    out = run(cluster, "zfs", "snapshots", "--host", "nas-0-0", "tank/vm-1-vol").stdout
    assert out.split() == ["NAME", "GUID", "HOLDS", "tank/vm-1-vol@s1", str(guid),
                           "imgstorage-kept"]
    held = run(cluster, "zfs", "destroy", "--host", "nas-0-0", "tank/vm-1-vol@s1")
    assert held.exit_code == 1 and "busy" in held.stderr
    assert run(cluster, "zfs", "release", "--host", "nas-0-0", "imgstorage-kept",
               "tank/vm-1-vol@s1").exit_code == 0
    assert run(cluster, "zfs", "destroy", "--host", "nas-0-0", "tank/vm-1-vol@s1").exit_code == 0
    assert driver.list_snapshots("tank", "vm-1-vol") == []
    out = run(cluster, "zfs", "snapshots", "--host", "nas-0-0", "tank/vm-1-vol").stdout
    assert out == "no datasets available\n"


def test_a_bare_group_shows_its_commands(root):
    result = run(root, "zpool")
    assert result.exit_code == 0
    assert "create" in result.stdout and "list" in result.stdout and result.stderr == ""


def test_sim_root_from_the_node_configuration(tmp_path, monkeypatch):
    conf = tmp_path / "imgstorage.conf"
    conf.write_text(json.dumps({"name": "nas-0-0", "backend": "sim",
                                "sim_root": str(tmp_path / "cluster")}))
    monkeypatch.setenv("IMGSTORAGE_CONF", str(conf))
    result = CliRunner().invoke(cli.cli, ["zpool", "create", "--host", "nas-0-0", "tank"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "cluster" / "nas-0-0" / "zfs" / "tank" / ".pool.json").is_file()
    conf.write_text(json.dumps({"name": "nas-0-0", "backend": "real"}))
    refused = CliRunner().invoke(cli.cli, ["zfs", "list", "--host", "nas-0-0"])
    assert refused.exit_code == 1
    assert "pass --sim-root" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_nicenum_reads_like_zfs():
    assert [cli.nicenum(v) for v in (0, 512, 96 * 1024, int(3.6 * (1 << 30)),
                                      int(37.1 * (1 << 30)), 231 * (1 << 30) + 12345,
                                      int(1.61 * (1 << 40)))] == \
        ["0B", "512B", "96K", "3.60G", "37.1G", "231G", "1.61T"]


def test_the_console_script_in_a_real_process(root):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "from imgstorage.drivers.sim.cli import main; main()"
    ok = subprocess.run([sys.executable, "-c", code, "--sim-root", str(root), "zpool", "create",
                         "--host", "nas-0-0", "tank"], env=env, capture_output=True, timeout=60)
    assert ok.returncode == 0 and ok.stderr == b""
    bad = subprocess.run([sys.executable, "-c", code, "--sim-root", str(root), "read", "--host",
                          "nas-0-0", "/dev/zvol/tank/none", "--length", "1"],
                         env=env, capture_output=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == b""
    assert bad.stderr.decode().splitlines() == [
        "imgstorage-sim: error: cannot open /dev/zvol/tank/none: No such device on nas-0-0"]
