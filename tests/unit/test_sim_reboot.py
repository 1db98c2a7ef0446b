"""A simulated reboot: the kernel's memory goes, the disks and their bytes stay."""
import hashlib

import pytest
from click.testing import CliRunner

from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import blockdev, cli, dm, hypervisor, initiator, reboot, target, zfs
from imgstorage.errors import ValidationError

KIB, MIB = 1 << 10, 1 << 20
NAS, VMC = "nas-0-0", "compute-0-1"
IQN = "iqn.2001-04.com.nas-0-0-vm-1-vol"
SIZE = 4 * MIB
SECTORS = SIZE // 512


@pytest.fixture(autouse=True)
def no_merge_clock(monkeypatch):
    monkeypatch.setattr(dm, "policy", dm.MergePolicy(rate=0.0, suspend_timeout=0.0))


def disk_tree(root):
    """Every file that is not kernel memory, with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.parent.name != ".locks"
            and p.name not in ("targets.json", "sessions.json", "domains.json")
            and p.parent.name != "dm"}


@pytest.fixture
def cluster(tmp_path):
    """A NAS exporting vm-1-vol to a container that runs a VM on a dm snapshot over it."""
    root = tmp_path
    zfs.create_pool(root, NAS, "tank")
    nas = zfs.SimZfs(root, NAS)
    nas.create_zvol("tank", "vm-1-vol", SIZE, sparse=True)
    blockdev.open_device(root, NAS, "/dev/zvol/tank/vm-1-vol").write(0, b"N" * 64 * KIB)
    nas.snapshot("tank", "vm-1-vol", "base")
    nas.hold("tank", "vm-1-vol", "base")
    ini = initiator.SimInitiator(root, VMC)
    chap = ChapCredentials("user1", "secret-1")
    target.SimTarget(root, NAS).create_target(IQN, "/dev/zvol/tank/vm-1-vol",
                                              ini.initiator_name(), chap)
    ini.login(IQN, NAS, chap)
    zfs.create_pool(root, VMC, "tank")
    local = zfs.SimZfs(root, VMC)
    local.create_zvol("tank", "vm-1-vol-temp-write", SIZE, sparse=True)
    mapper = dm.SimDeviceMapper(root, VMC)
    mapper.create("vm-1-vol-snap",
                  f"0 {SECTORS} snapshot /dev/sdb /dev/zvol/tank/vm-1-vol-temp-write P 16")
    blockdev.open_device(root, VMC, "/dev/mapper/vm-1-vol-snap").write(8 * KIB, b"W" * 16 * KIB)
    hypervisor.SimHypervisor(root).start(VMC, "vm-1", "/dev/mapper/vm-1-vol-snap", 512, 1)
    return root


def test_a_container_reboot_drops_sessions_tables_and_domains_and_keeps_bytes(cluster):
    root = cluster
    before = disk_tree(root)
    name_file = (root / VMC / "iscsi" / "initiatorname").read_text()
    vm_disk = blockdev.open_device(root, VMC, "/dev/mapper/vm-1-vol-snap")

    report = reboot.reboot(root, VMC)

    assert report.sessions == [f"[1] {IQN} on {NAS}:3260 (/dev/sdb)"]
    assert report.dm_devices == ["vm-1-vol-snap"] and report.domains == ["vm-1"]
    assert report.targets == []
    assert initiator.SimInitiator(root, VMC).sessions() == []
    assert not dm.SimDeviceMapper(root, VMC).exists("vm-1-vol-snap")
    assert not (root / VMC / "dm" / ".locks" / "vm-1-vol-snap").exists()
    assert [(d.name, d.state) for d in hypervisor.SimHypervisor(root).domains(VMC)] == \
        [("vm-1", "shut off")]
    # the initiator's name, every zvol and every byte stay; the NAS is untouched
    assert (root / VMC / "iscsi" / "initiatorname").read_text() == name_file
    assert disk_tree(root) == before
    assert IQN in target.read_targets(root, NAS)
    # a device opened before the reboot fails like I/O on a removed device
    with pytest.raises(blockdev.DeviceIOError, match="removed"):
        vm_disk.read(0, 512)
    # nothing holds the temp-write zvol any more: it can be destroyed like after a reboot
    assert not blockdev.SimBlockDevices(root, VMC).in_use("/dev/zvol/tank/vm-1-vol-temp-write")


def test_the_cow_store_is_readable_after_the_table_is_recreated(cluster):
    root = cluster
    reboot.reboot(root, VMC)
    ini = initiator.SimInitiator(root, VMC)
    ini.login(IQN, NAS, ChapCredentials("user1", "secret-1"))       # the session comes back
    dm.SimDeviceMapper(root, VMC).create(
        "vm-1-vol-snap", f"0 {SECTORS} snapshot /dev/sdb /dev/zvol/tank/vm-1-vol-temp-write P 16")
    disk = blockdev.open_device(root, VMC, "/dev/mapper/vm-1-vol-snap")
    assert disk.read(0, 8 * KIB) == b"N" * 8 * KIB                   # from the origin
    assert disk.read(8 * KIB, 16 * KIB) == b"W" * 16 * KIB           # from the COW store
    assert disk.read(24 * KIB, 40 * KIB) == b"N" * 40 * KIB
    # the writes are still only in the store: the NAS disk has its own bytes
    assert blockdev.open_device(root, NAS, "/dev/zvol/tank/vm-1-vol").read(8 * KIB, 16) == b"N" * 16


def test_a_nas_reboot_drops_targets_and_keeps_snapshots_holds_and_bytes(cluster):
    root = cluster
    before = disk_tree(root)
    sd = blockdev.open_device(root, VMC, "/dev/sdb")

    report = reboot.reboot(root, NAS)

    assert report.targets == [IQN] and report.sessions == report.dm_devices == []
    assert target.SimTarget(root, NAS).list_targets() == []
    nas = zfs.SimZfs(root, NAS)
    assert nas.list_snapshots("tank", "vm-1-vol") == ["base"]
    assert nas.holds("tank", "vm-1-vol", "base") == ["imgstorage"]
    assert disk_tree(root) == before
    # the container's session survives, but its I/O fails until the target is back
    with pytest.raises(blockdev.DeviceIOError, match="connection to iSCSI target"):
        sd.read(0, 512)
    target.SimTarget(root, NAS).create_target(
        IQN, "/dev/zvol/tank/vm-1-vol", initiator.SimInitiator(root, VMC).initiator_name(),
        ChapCredentials("user1", "secret-1"))
    assert sd.read(0, 16) == b"N" * 16


def test_a_partial_resumable_receive_survives(cluster):
    root = cluster
    nas = zfs.SimZfs(root, NAS)
    source = nas.send("tank", "vm-1-vol", "base")
    sink = zfs.SimZfs(root, VMC).receive("tank", "copy", resumable=True)
    sink.write(source.read(4 * KIB))
    sink.abort()
    token = zfs.SimZfs(root, VMC).resume_token("tank", "copy")
    assert token
    reboot.reboot(root, VMC)
    assert zfs.SimZfs(root, VMC).resume_token("tank", "copy") == token


def test_an_unknown_host_changes_nothing(cluster):
    root = cluster
    before = sorted(str(p) for p in root.rglob("*"))
    with pytest.raises(ValidationError, match="unknown sim host 'nas-9-9'"):
        reboot.reboot(root, "nas-9-9")
    with pytest.raises(ValidationError):
        reboot.reboot(root, "../nas-0-0")
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_rebooting_twice_drops_nothing_more(cluster):
    reboot.reboot(cluster, VMC)
    again = reboot.reboot(cluster, VMC)
    assert again.sessions == again.dm_devices == again.domains == again.targets == []


# ------------------------------------------------------------------ the command
def run(root, *args):
    return CliRunner().invoke(cli.cli, ["--sim-root", str(root), *args])


def test_the_command_prints_what_it_dropped(cluster):
    result = run(cluster, "reboot", "--host", VMC)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"dropped iSCSI session [1] {IQN} on {NAS}:3260 (/dev/sdb)",
        "removed device-mapper device vm-1-vol-snap",
        "stopped domain vm-1",
        f"rebooted {VMC}: 0 targets, 1 sessions, 1 device-mapper devices, 1 running domains "
        "dropped; pools, zvols, snapshots and their bytes kept"]
    nas = run(cluster, "reboot", "--host", NAS)
    assert nas.exit_code == 0 and nas.stdout.splitlines()[0] == f"removed iSCSI target {IQN}"


def test_the_command_refuses_an_unknown_host_in_one_line(cluster):
    before = sorted(str(p) for p in cluster.rglob("*"))
    result = run(cluster, "reboot", "--host", "nas-9-9")
    assert result.exit_code != 0
    assert result.stderr.startswith("imgstorage-sim: error: unknown sim host 'nas-9-9'")
    assert len(result.stderr.splitlines()) == 1
    assert sorted(str(p) for p in cluster.rglob("*")) == before
    assert IQN in target.read_targets(cluster, NAS)


def test_the_command_explains_itself(cluster):
    result = run(cluster, "reboot", "--help")
    assert result.exit_code == 0
    assert "device-mapper" in result.stdout and "every byte" in result.stdout
