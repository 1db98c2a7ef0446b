"""The rocks command line, without a broker: a fake RPC client and a fake hypervisor."""
from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
from click.testing import CliRunner

from imgstorage.drivers.base import DomainInfo
from imgstorage.errors import DriverError, NoSuchNode, RemoteError, RpcTimeout
from imgstorage.frontend import cli, commands_base, commands_storage
from imgstorage.frontend.commands_base import COMMANDS
from imgstorage.frontend.registry import Registry


# ------------------------------------------------------------------ fakes
class FakeRpc:
    """Stands in for RpcClient: checks each message against the script, answers canned replies."""

    def __init__(self) -> None:
        self.script: List[tuple] = []
        self.sent: List[tuple] = []
        self.closed = 0

    def expect(self, node: str, message: Dict[str, Any], reply: Optional[Dict[str, Any]] = None,
               error: Optional[Exception] = None) -> None:
        self.script.append((node, message, reply, error))

    def __call__(self, config) -> "FakeRpc":   # used as the RpcClient class
        self.config = config
        return self

    def __enter__(self) -> "FakeRpc":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.closed += 1

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        self.sent.append((node, message, timeout))
        assert self.script, f"unexpected request to {node}: {message}"
        want_node, want_message, reply, error = self.script.pop(0)
        assert (node, message) == (want_node, want_message)
        if error is not None:
            raise error
        return {"status": "success", **(reply or {})}


class FakeHypervisor:
    def __init__(self) -> None:
        self.states: Dict[str, Dict[str, str]] = {}
        self.calls: List[tuple] = []
        self.unreachable: set = set()
        self.fail_start: Optional[Exception] = None

    def start(self, host: str, vm: str, disk: str, memory_mb: int, cpus: int) -> None:
        self.calls.append(("start", host, vm, disk, memory_mb, cpus))
        if self.fail_start is not None:
            raise self.fail_start
        self.states.setdefault(host, {})[vm] = "running"

    def stop(self, host: str, vm: str) -> None:
        self.calls.append(("stop", host, vm))
        self.states[host][vm] = "shut off"

    def domains(self, host: str) -> List[DomainInfo]:
        self.calls.append(("domains", host))
        if host in self.unreachable:
            raise DriverError(f"failed to connect to the hypervisor on {host}")
        return [DomainInfo(name, state) for name, state in self.states.get(host, {}).items()]


@pytest.fixture
def conf(tmp_path, monkeypatch):
    path = tmp_path / "imgstorage.conf"
    path.write_text(json.dumps({"frontend_db": str(tmp_path / "frontend.db"), "timeout": 7}))
    monkeypatch.setenv("IMGSTORAGE_CONF", str(path))
    return path


@pytest.fixture
def db(conf):
    return json.loads(conf.read_text())["frontend_db"]


@pytest.fixture
def rpc(monkeypatch):
    fake = FakeRpc()
    monkeypatch.setattr(commands_base, "RpcClient", fake)
    yield fake
    assert fake.script == [], "expected requests were not sent"


@pytest.fixture
def hyp(monkeypatch):
    fake = FakeHypervisor()
    monkeypatch.setattr(commands_base, "hypervisor", lambda config: fake)
    return fake


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)      # click < 8.2
    except TypeError:
        return CliRunner()


def rocks(*words: str):
    return _runner().invoke(cli.cli, list(words))


def ok(*words: str) -> str:
    res = rocks(*words)
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    assert res.stderr == ""
    return res.stdout


def fails(*words: str, code: int = 1) -> str:
    """The one error line of a failing command."""
    res = rocks(*words)
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error - "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0][len("error - "):]


def dump(db: str) -> Dict[str, list]:
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(map(tuple, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        con.close()


@pytest.fixture
def cluster(conf, rpc, hyp):
    """The seed's cluster: a NAS, two containers, one VM on a NAS."""
    ok("add", "host", "nas-0-0", "appliance=nas")
    ok("add", "host", "compute-0-14", "appliance=vm-container")
    ok("add", "host", "compute-0-3", "appliance=vm-container")
    assert ok("add", "host", "vm", "compute-0-14", "compute") == \
        "added VM compute-0-14-0 on physical node compute-0-14\n"
    ok("set", "host", "vm", "nas", "compute-0-14-0", "nas=nas-0-0", "zpool=tank")
    return SimpleNamespace(rpc=rpc, hyp=hyp)


# ------------------------------------------------------------------- help
def test_help_lists_every_command_with_a_summary(conf):
    out = ok("--help")
    for name, spec in COMMANDS.items():
        assert name in out
        assert spec.summary.split()[0] in out
    assert "VERB NOUN" in out


def test_no_command_prints_the_help(conf):
    assert "Commands:" in ok()


def test_command_help_explains_arguments_parameters_and_example(conf):
    out = ok("add", "host", "storagemap", "--help")
    assert "rocks add host storagemap NAS ZPOOL VOLUME REMOTEHOST SIZE" in out
    for text in ("Arguments:", "REMOTEHOST", "Parameters:", "img_sync=BOOL", "remotepool=POOL",
                 "timeout=SECONDS", "output-format=table|json", "Example:",
                 "rocks add host storagemap nas-0-0 tank vol1 compute-0-3 10"):
        assert text in out


def test_longest_match_picks_the_right_command(conf):
    assert "rocks add host vm CONTAINER MEMBERSHIP" in ok("add", "host", "vm", "--help")
    assert "rocks add host NAME appliance=" in ok("add", "host", "--help")
    assert "rocks list host vm nas [VM...]" in ok("list", "host", "vm", "nas", "-h")


def test_partial_command_help_lists_the_matching_commands(conf):
    out = ok("remove", "--help")
    assert "remove host storagemap" in out and "add host" not in out


def test_unknown_and_incomplete_commands(conf):
    assert "unknown command 'frobnicate'" in fails("frobnicate", code=2)
    msg = fails("dump", "host", code=2)
    assert "unknown command 'dump host'" in msg and "'dump host vm nas'" in msg


# -------------------------------------------------------------- registry
def test_add_and_list_hosts(conf, hyp):
    ok("add", "host", "nas-0-0", "appliance=nas", "ip=10.1.1.1")
    ok("add", "host", "vm-container-0-14", "appliance=vm-container")
    out = ok("list", "host")
    assert out.splitlines() == [
        "HOST               APPLIANCE    IP       RACK RANK CONTAINER",
        "nas-0-0:           nas          10.1.1.1 0    0    ---------",
        "vm-container-0-14: vm-container -------- 0    14   ---------",
    ]
    ok("remove", "host", "nas-0-0")
    assert "nas-0-0" not in ok("list", "host", "output-format=json")


def test_add_host_requires_an_appliance(conf):
    assert "missing parameter appliance=" in fails("add", "host", "nas-0-0", code=2)


def test_seed_list_host_vm_nas(cluster):
    ok("add", "host", "vm-container-0-0", "appliance=vm-container")
    assert ok("add", "host", "vm", "vm-container-0-0", "compute") == \
        "added VM compute-0-0-0 on physical node vm-container-0-0\n"
    ok("set", "host", "vm", "nas", "compute-0-0-0", "nas=nas-0-0", "zpool=tank")
    assert ok("list", "host", "vm", "nas") == ("VM-HOST         NAS     ZPOOL\n"
                                              "compute-0-0-0:  nas-0-0 tank \n"
                                              "compute-0-14-0: nas-0-0 tank \n")
    assert ok("dump", "host", "vm", "nas") == (
        "rocks set host vm nas compute-0-0-0 nas=nas-0-0 zpool=tank\n"
        "rocks set host vm nas compute-0-14-0 nas=nas-0-0 zpool=tank\n")


def test_vm_naming_next_free_number_and_plain_container(cluster):
    assert "compute-0-14-1 on physical node compute-0-14" in \
        ok("add", "host", "vm", "compute-0-14", "compute", "disksize=40", "mem=2048", "cpus=2")
    ok("add", "host", "hpcdev-pub02", "appliance=vm-container")
    assert ok("add", "host", "vm", "hpcdev-pub02", "compute") == \
        "added VM vm-hpcdev-pub02-0 on physical node hpcdev-pub02\n"
    rows = json.loads(ok("list", "host", "vm", "compute-0-14-1", "showdisks=1",
                         "output-format=json"))
    assert rows == [{"vm-host": "compute-0-14-1", "slice": 1, "mem": 2048, "cpus": 2,
                     "host": "compute-0-14", "status": "nostate",
                     "disk": "file:/state/partition1/kvm/disks/compute-0-14-1.vda,vda",
                     "disksize": 40}]


def test_t8000_scenario_set_host_vm_nas(cluster, db):
    vm = "compute-0-14-0"
    before = dump(db)
    assert fails("set", "host", "vm", "nas", vm, "nas=test-nas-9-9") == "unknown host test-nas-9-9"
    ok("set", "host", "vm", "nas", vm, "nas=none")
    assert fails("set", "host", "vm", "nas", vm, "nas=nas-0-0") == \
        "you need to specify a zpool parameter or set the img_zpools attribute"
    ok("set", "host", "vm", "nas", vm, "nas=nas-0-0", "zpool=zank321")
    assert "zank321" in ok("list", "host", "vm", "nas", vm)
    ok("set", "host", "attr", "nas-0-0", "img_zpools", "zank123")
    ok("set", "host", "vm", "nas", vm, "nas=nas-0-0")
    assert "nas-0-0 zank123" in ok("list", "host", "vm", "nas")
    ok("set", "host", "attr", "nas-0-0", "img_zpools", 'value=zank123,zank111')
    seen = set()
    for _ in range(30):
        ok("set", "host", "vm", "nas", vm, "nas=nas-0-0")
        line = ok("dump", "host", "vm", "nas", vm)
        assert line.startswith(f"rocks set host vm nas {vm} nas=nas-0-0 zpool=zank1")
        seen.add(line.split("zpool=")[1].strip())
    assert seen == {"zank123", "zank111"}
    assert dump(db) != before


@pytest.mark.parametrize("words, message", [
    (["compute-0-3", "nas=nas-0-0", "zpool=tank"], "node compute-0-3 is not a virtual node"),
    (["compute-0-14-0", "nas=compute-0-3", "zpool=tank"], "host compute-0-3 is not a NAS"),
    (["compute-0-14-0", "nas=nas-0-0", "zpool=tank", "index=x"], "index must be an integer"),
    (["compute-0-14-0", "nas=nas-0-0", "zpool=tank", "index=1"],
     "index 1 is out of range: VM compute-0-14-0 has 1 disk"),
    (["compute-0-14-0", "nas=nas-0-0", "zpool=../etc"], "invalid zpool name"),
    (["compute-0-14-0", "nobody-1", "nas=nas-0-0", "zpool=t2"], "unknown host nobody-1"),
])
def test_set_host_vm_nas_refusals_change_nothing(cluster, db, words, message):
    before = dump(db)
    assert message in fails("set", "host", "vm", "nas", *words)
    assert dump(db) == before


def test_set_host_vm_nas_needs_nas_parameter(cluster):
    assert "missing parameter nas=" in fails("set", "host", "vm", "nas", "compute-0-14-0", code=2)


def test_nas_none_and_remove_host_vm_nas(cluster):
    ok("set", "host", "vm", "nas", "compute-0-14-0", "nas=none")
    assert ok("list", "host", "vm", "nas") == ("VM-HOST         NAS ZPOOL\n"
                                              "compute-0-14-0: --- -----\n")
    ok("set", "host", "vm", "nas", "compute-0-14-0", "nas=nas-0-0", "zpool=tank")
    ok("remove", "host", "vm", "nas", "compute-0-14-0")
    assert ok("dump", "host", "vm", "nas") == ""


def test_attribute_commands(conf):
    ok("add", "host", "compute-0-3", "appliance=compute")
    ok("set", "host", "attr", "compute-0-3", "img_sync", "true")
    ok("add", "host", "attr", "compute-0-3", "attr=kvm", "value=yes")
    ok("add", "appliance", "attr", "compute", "img_storage_vm", "true")
    ok("set", "attr", "IB_net", "ibnet")
    out = ok("list", "host", "attr", "compute-0-3")
    assert out.splitlines() == [
        "ATTR               VALUE SOURCE",
        "IB_net             ibnet G     ",
        "img_storage_vm     true  A     ",
        "img_sync           true  H     ",
        "kvm                yes   H     ",
        "vm_container_zpool tank  A     ",
    ]
    ok("remove", "host", "attr", "compute-0-3", "img_sync")
    assert "img_sync           false G" in ok("list", "host", "attr", "compute-0-3")
    assert "compute:      img_storage_vm     true" in ok("list", "appliance", "attr")
    ok("remove", "appliance", "attr", "compute", "img_storage_vm")
    assert ok("list", "appliance", "attr", "compute") == \
        "ATTR               VALUE\nvm_container_zpool tank \n"
    assert ok("list", "attr") == "ATTR     VALUE\nIB_net   ibnet\nimg_sync false\n"
    ok("remove", "attr", "IB_net")
    assert "comes from its appliance" in fails("remove", "host", "attr", "compute-0-3",
                                               "vm_container_zpool")
    assert "invalid appliance" in fails("add", "appliance", "attr", "storage", "a", "b")


def test_attr_value_with_equals_sign_needs_value_form(conf):
    ok("add", "host", "nas-0-0", "appliance=nas")
    assert "unknown parameter 'a'" in fails("set", "host", "attr", "nas-0-0", "x", "a=b", code=2)
    ok("set", "host", "attr", "nas-0-0", "x", "value=a=b")
    assert "x               a=b" in ok("list", "host", "attr", "nas-0-0")


def test_remove_host_refusals(cluster, db):
    hyp = cluster.hyp
    hyp.states["compute-0-14"] = {"compute-0-14-0": "running"}
    before = dump(db)
    assert "VM compute-0-14-0 is running on compute-0-14" in \
        fails("remove", "host", "compute-0-14-0")
    assert "VM compute-0-14-0 is running" in fails("remove", "host", "vm", "compute-0-14-0")
    assert "still has VMs (compute-0-14-0)" in fails("remove", "host", "compute-0-14")
    assert "holds the disks of VMs (compute-0-14-0)" in fails("remove", "host", "nas-0-0")
    assert dump(db) == before
    hyp.states["compute-0-14"] = {}
    hyp.unreachable.add("compute-0-14")
    assert "add force=true" in fails("remove", "host", "vm", "compute-0-14-0")
    ok("remove", "host", "vm", "compute-0-14-0", "force=true")
    ok("remove", "host", "compute-0-14", "nas-0-0")
    assert "compute-0-14" not in ok("list", "host")


def test_remove_vm_then_its_container_in_one_command(cluster):
    ok("remove", "host", "compute-0-14-0", "compute-0-14")
    assert ok("list", "host", "output-col=host", "output-header=no").split() == \
        ["compute-0-3:", "nas-0-0:"]


def test_host_listings_keep_the_owner_even_for_one_row(cluster):
    assert ok("list", "host", "vm", "output-header=no").split() == \
        ["compute-0-14-0:", "0", "1024", "1", "compute-0-14", "nostate"]
    assert ok("list", "host", "nas-0-0", "output-header=no").split()[:2] == ["nas-0-0:", "nas"]
    assert ok("list", "host", "attr", "nas-0-0").startswith("ATTR ")   # attributes: trimmed


def test_list_host_vm_status(cluster):
    ok("add", "host", "vm", "compute-0-3", "compute")
    cluster.hyp.states["compute-0-14"] = {"compute-0-14-0": "running"}
    cluster.hyp.unreachable.add("compute-0-3")
    assert ok("list", "host", "vm").splitlines() == [
        "VM-HOST         SLICE MEM  CPUS HOST         STATUS ",
        "compute-0-3-0:  0     1024 1    compute-0-3  nostate",
        "compute-0-14-0: 0     1024 1    compute-0-14 running",
    ]


# ------------------------------------------------------------ start / stop
MAP_MSG = {"action": "map_zvol", "zpool": "tank", "zvol": "compute-0-14-0-vol",
           "remotehost": "compute-0-14", "remotepool": "tank", "size": 36, "sync": False}
UNMAP_MSG = {"action": "unmap_zvol", "zvol": "compute-0-14-0-vol"}


def test_start_host_vm_seed_line(cluster):
    bdev = "/dev/mapper/compute-0-14-0-vol-snap"
    ok("set", "host", "attr", "compute-0-14", "img_sync", "true")
    cluster.rpc.expect("nas-0-0", dict(MAP_MSG, sync=True), {"bdev": bdev})
    assert ok("start", "host", "vm", "compute-0-14-0") == \
        "nas-0-0:compute-0-14-0-vol mapped to compute-0-14:/dev/mapper/compute-0-14-0-vol-snap\n"
    assert ("start", "compute-0-14", "compute-0-14-0", bdev, 1024, 1) in cluster.hyp.calls
    assert cluster.rpc.sent[0][2] == 7.0            # the configuration's timeout


def test_start_direct_iscsi_with_timeout_param(cluster):
    cluster.rpc.expect("nas-0-0", MAP_MSG, {"bdev": "/dev/sdc"})
    ok("start", "host", "vm", "compute-0-14-0", "timeout=120")
    assert cluster.rpc.sent[0][2] == 120.0


def test_start_sync_without_container_pool_is_refused(cluster):
    ok("set", "host", "attr", "compute-0-14", "img_sync", "true")
    ok("remove", "appliance", "attr", "vm-container", "vm_container_zpool")
    assert "vm_container_zpool attribute is not set" in \
        fails("start", "host", "vm", "compute-0-14-0")
    assert cluster.rpc.sent == []


def test_start_boot_failure_unmaps_again(cluster):
    cluster.hyp.fail_start = DriverError("no memory left")
    cluster.rpc.expect("nas-0-0", MAP_MSG, {"bdev": "/dev/sdc"})
    cluster.rpc.expect("nas-0-0", UNMAP_MSG)
    res = rocks("start", "host", "vm", "compute-0-14-0")
    assert res.exit_code == 1
    assert res.stderr == ("error - cannot boot VM compute-0-14-0 on compute-0-14: no memory "
                          "left; nas-0-0:compute-0-14-0-vol was unmapped again\n")


def test_start_boot_failure_and_unmap_failure(cluster):
    cluster.hyp.fail_start = DriverError("no memory left")
    cluster.rpc.expect("nas-0-0", MAP_MSG, {"bdev": "/dev/sdc"})
    cluster.rpc.expect("nas-0-0", UNMAP_MSG, error=RpcTimeout("nas-0-0", 7))
    assert "unmapping nas-0-0:compute-0-14-0-vol failed too: node nas-0-0 did not answer" in \
        fails("start", "host", "vm", "compute-0-14-0")


def test_start_map_error_does_not_boot(cluster):
    cluster.rpc.expect("nas-0-0", MAP_MSG,
                       error=RemoteError("nas-0-0", "map_zvol", "ZVol compute-0-14-0-vol is busy"))
    assert fails("start", "host", "vm", "compute-0-14-0") == "ZVol compute-0-14-0-vol is busy"
    assert not [c for c in cluster.hyp.calls if c[0] == "start"]


def test_start_with_unreachable_container_maps_nothing(cluster):
    cluster.hyp.unreachable.add("compute-0-14")
    assert fails("start", "host", "vm", "compute-0-14-0") == (
        "cannot start VM compute-0-14-0: failed to connect to the hypervisor on compute-0-14")
    assert cluster.rpc.sent == []


def test_start_running_vm_is_refused(cluster):
    cluster.hyp.states["compute-0-14"] = {"compute-0-14-0": "running"}
    assert "already running on compute-0-14" in fails("start", "host", "vm", "compute-0-14-0")


def test_start_local_disk_vm(cluster):
    ok("set", "host", "vm", "nas", "compute-0-14-0", "nas=none")
    ok("start", "host", "vm", "compute-0-14-0")
    assert ("start", "compute-0-14", "compute-0-14-0",
            "/state/partition1/kvm/disks/compute-0-14-0.vda", 1024, 1) in cluster.hyp.calls


def test_stop_host_vm(cluster):
    cluster.hyp.states["compute-0-14"] = {"compute-0-14-0": "running"}
    cluster.rpc.expect("nas-0-0", UNMAP_MSG)
    assert ok("stop", "host", "vm", "compute-0-14-0") == (
        "stopped VM compute-0-14-0 on physical node compute-0-14\n"
        "nas-0-0:compute-0-14-0-vol unmapped from compute-0-14\n")
    assert ("stop", "compute-0-14", "compute-0-14-0") in cluster.hyp.calls


def test_stop_vm_already_off_still_releases_the_disk(cluster):
    cluster.rpc.expect("nas-0-0", UNMAP_MSG)
    assert ok("stop", "host", "vm", "compute-0-14-0").startswith(
        "VM compute-0-14-0 is not running on physical node compute-0-14\n")


def test_stop_unreachable_container(cluster):
    cluster.hyp.unreachable.add("compute-0-14")
    assert "add terminate=true" in fails("stop", "host", "vm", "compute-0-14-0")
    cluster.rpc.expect("nas-0-0", UNMAP_MSG)
    assert ok("stop", "host", "vm", "compute-0-14-0", "terminate=true") == \
        "nas-0-0:compute-0-14-0-vol unmapped from compute-0-14\n"


# ---------------------------------------------------------------- storage
def test_add_host_storagemap_seed_output(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "map_zvol", "zpool": "tank", "zvol": "vol1",
                                   "remotehost": "compute-0-3", "remotepool": None, "size": 10,
                                   "sync": False}, {"bdev": "/dev/sdc"})
    assert ok("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3", "10") == \
        "mapping  nas-0-0 : tank / vol1  on  compute-0-3\n/dev/sdc\n"


def test_add_host_storagemap_sync_from_the_remotehost_attribute(cluster):
    ok("set", "host", "attr", "compute-0-3", "img_sync", "true")
    cluster.rpc.expect("nas-0-0", {"action": "map_zvol", "zpool": "tank", "zvol": "vol1",
                                   "remotehost": "compute-0-3", "remotepool": "tank",
                                   "size": 10, "sync": True}, {"bdev": "/dev/mapper/vol1-snap"})
    assert ok("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3",
              "10").endswith("\n/dev/mapper/vol1-snap\n")


def test_add_host_storagemap_explicit_sync_and_pool(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "map_zvol", "zpool": "tank", "zvol": "vol1",
                                   "remotehost": "compute-0-3", "remotepool": "fast",
                                   "size": 10, "sync": True}, {"bdev": "/dev/mapper/vol1-snap"})
    ok("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3", "10",
       "img_sync=yes", "remotepool=fast")


def test_keep_local_follows_the_containers_attribute_in_sync_mode_only(cluster):
    ok("set", "host", "attr", "compute-0-14", "img_keep_local", "true")
    cluster.rpc.expect("nas-0-0", MAP_MSG, {"bdev": "/dev/sdc"})    # direct: nothing to keep
    ok("start", "host", "vm", "compute-0-14-0")
    cluster.hyp.states["compute-0-14"] = {}
    ok("set", "host", "attr", "compute-0-14", "img_sync", "true")
    cluster.rpc.expect("nas-0-0", dict(MAP_MSG, sync=True, keep_local=True),
                       {"bdev": "/dev/mapper/compute-0-14-0-vol-snap"})
    ok("start", "host", "vm", "compute-0-14-0")


def test_add_host_storagemap_keep_local(cluster):
    ok("set", "host", "attr", "compute-0-3", "img_keep_local", "yes")
    base = {"action": "map_zvol", "zpool": "tank", "zvol": "vol1", "remotehost": "compute-0-3",
            "remotepool": "tank", "size": 10, "sync": True}
    cluster.rpc.expect("nas-0-0", dict(base, keep_local=True), {"bdev": "/dev/mapper/vol1-snap"})
    ok("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3", "10",
       "img_sync=true", "remotepool=tank")
    cluster.rpc.expect("nas-0-0", base, {"bdev": "/dev/mapper/vol1-snap"})
    ok("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3", "10",
       "img_sync=true", "remotepool=tank", "img_keep_local=false")


def test_add_host_storagemap_sync_without_any_pool(cluster):
    ok("add", "host", "fe", "appliance=frontend")
    assert fails("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "fe", "10",
                 "img_sync=true") == "img_sync is true but no remotepool was given"


@pytest.mark.parametrize("words, message", [
    (["nas-0-0", "tank", "vol1", "compute-0-3", "-5"], "invalid size -5"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "0"], "invalid size 0"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "ten"], "invalid size"),
    (["nas-0-0", "tank", "../vol1", "compute-0-3", "10"], "invalid zvol name"),
    (["nas-0-0", "tank", "a;b", "compute-0-3", "10"], "invalid zvol name"),
    (["nas-0-0", "tank", "a b", "compute-0-3", "10"], "invalid zvol name"),
    (["nas-0-0", "tank", "a/b", "compute-0-3", "10"], "invalid zvol name"),
    (["nas-0-0", "tank/x", "vol1", "compute-0-3", "10"], "invalid zpool name"),
    (["nas-0-0", "1tank", "vol1", "compute-0-3", "10"], "invalid zpool name"),
    (["nas-0-0", "tank", "vol1", "compute-0-9", "10"], "unknown host compute-0-9"),
    (["nas-9-9", "tank", "vol1", "compute-0-3", "10"], "unknown host nas-9-9"),
    (["compute-0-3", "tank", "vol1", "compute-0-3", "10"], "host compute-0-3 is not a NAS"),
    (["nas-0-0", "tank", "vol1", "compute,0-3", "10"], "invalid host name"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "10", "img_sync=perhaps"], "invalid img_sync"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "10", "img_keep_local=true"],
     "img_keep_local keeps a synced copy: it needs img_sync=true"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "10", "img_sync=true", "remotepool=tank",
      "img_keep_local=maybe"], "invalid img_keep_local"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "10", "timeout=-1"], "invalid timeout"),
    (["nas-0-0", "tank", "vol1", "compute-0-3", "10", "timeout=soon"], "invalid timeout"),
])
def test_add_host_storagemap_bad_input_sends_nothing(cluster, db, words, message):
    before = dump(db)
    assert message in fails("add", "host", "storagemap", *words)
    assert cluster.rpc.sent == []
    assert dump(db) == before


def test_remove_host_storagemap_and_storageimg(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "unmap_zvol", "zvol": "vol1"})
    assert ok("remove", "host", "storagemap", "nas-0-0", "vol1") == \
        "unmapping   nas-0-0 : vol1\nSuccess\n"
    cluster.rpc.expect("nas-0-0", {"action": "del_zvol", "zpool": "tank", "zvol": "vol1"})
    assert ok("remove", "host", "storageimg", "nas-0-0", "tank", "vol1") == \
        "removing   nas-0-0 : tank / vol1\nSuccess\n"


def test_daemon_errors_are_one_line(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "unmap_zvol", "zvol": "vol1"},
                       error=RemoteError("nas-0-0", "unmap_zvol", "ZVol vol1 is not mapped"))
    res = rocks("remove", "host", "storagemap", "nas-0-0", "vol1")
    assert (res.exit_code, res.stdout, res.stderr) == (
        1, "unmapping   nas-0-0 : vol1\n", "error - ZVol vol1 is not mapped\n")
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, error=NoSuchNode("nas-0-0"))
    assert "no img-storage daemon is listening as nas-0-0" in \
        fails("list", "host", "storagemap", "nas-0-0")
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, error=RpcTimeout("nas-0-0", 7))
    assert fails("list", "host", "storagemap", "nas-0-0") == \
        "node nas-0-0 did not answer within 7 s"


def _zrow(zvol, host, zpool, target, state, started=None):
    return {"zvol": zvol, "zpool": zpool, "iscsi_target": target, "remotehost": host,
            "remotepool": None, "state": state, "time": started, "nextsync": None,
            "locked": False, "progress": None, "rate": None, "size": 36}


def test_list_host_storagemap_seed_table(cluster, monkeypatch):
    monkeypatch.setattr(commands_storage, "time", SimpleNamespace(time=lambda: 1000.0))
    iqn = "iqn.2001-04.com.nas-0-0-"
    body = [_zrow("vol1", None, None, iqn + "vol1", "unmapped"),
            _zrow("hpcdev-pub03-vol", "hpcdev-pub02", "tank", iqn + "hpcdev-pub03-vol", "mapped"),
            _zrow("vm-hpcdev-pub03-4-vol", None, "tank", None, "unmapped"),
            _zrow("vm-hpcdev-pub03-3-vol", "compute-0-3", "tank", iqn + "vm-hpcdev-pub03-3-vol",
                  "NAS->VM", started=996.0)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    assert ok("list", "host", "storagemap", "nas-0-0").splitlines() == [
        "ZVOL                  HOST         ZPOOL TARGET                                        STATE    TIME   ",
        "vol1                  ------------ ----- iqn.2001-04.com.nas-0-0-vol1                  unmapped -------",
        "hpcdev-pub03-vol      hpcdev-pub02 tank  iqn.2001-04.com.nas-0-0-hpcdev-pub03-vol      mapped   -------",
        "vm-hpcdev-pub03-4-vol ------------ tank  --------------------------------------------- unmapped -------",
        "vm-hpcdev-pub03-3-vol compute-0-3  tank  iqn.2001-04.com.nas-0-0-vm-hpcdev-pub03-3-vol NAS->VM  0:00:04",
    ]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body[-1:]})
    assert json.loads(ok("list", "host", "storagemap", "nas-0-0", "output-format=json")) == [
        {"nas": "nas-0-0", "zvol": "vm-hpcdev-pub03-3-vol", "host": "compute-0-3",
         "zpool": "tank", "target": iqn + "vm-hpcdev-pub03-3-vol", "state": "NAS->VM",
         "time": "0:00:04"}]


def test_list_host_storagemap_malformed_reply(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": {"not": "a list"}})
    assert fails("list", "host", "storagemap", "nas-0-0") == "nas-0-0 sent a malformed zvol list"


def test_list_host_storagedev_seed_table(cluster, monkeypatch):
    monkeypatch.setattr(commands_storage, "time", SimpleNamespace(time=lambda: 10000.0))
    body = {
        "vm-hpcdev-pub03-1-vol": {"zvol": "vm-hpcdev-pub03-1-vol",
                                  "device": "vm-hpcdev-pub03-1-vol-snap",
                                  "status": "snapshot-merge", "size": 36, "bdev": "sdc",
                                  "target": "iqn.x", "started": True,
                                  "synced": "9099712/73400320 17760", "time": 10000.0 - 1925},
        "vm-hpcdev-pub03-5-vol": {"zvol": "vm-hpcdev-pub03-5-vol",
                                  "device": "vm-hpcdev-pub03-5-vol-snap", "status": "linear",
                                  "size": 36, "bdev": None, "target": None, "started": None,
                                  "synced": None, "time": None},
    }
    cluster.rpc.expect("compute-0-3", {"action": "list_dev"}, {"body": body})
    assert ok("list", "host", "storagedev", "compute-0-3").splitlines() == [
        "ZVOL                  LVM                        STATUS         SIZE (GB) BLOCK DEV "
        "IS STARTED SYNCED                 TIME   ",
        "vm-hpcdev-pub03-1-vol vm-hpcdev-pub03-1-vol-snap snapshot-merge 36        sdc       "
        "1          9099712/73400320 17760 0:32:05",
        "vm-hpcdev-pub03-5-vol vm-hpcdev-pub03-5-vol-snap linear         36        --------- "
        "---------- ---------------------- -------",
    ]


def test_zvolattr_commands(cluster):
    vol = "compute-0-14-0-vol"
    cluster.rpc.expect("nas-0-0", {"action": "set_zvol_attrs", "zvol": vol,
                                   "attrs": {"frequency": 600}})
    ok("set", "host", "zvolattr", "nas-0-0", vol, "frequency", "600")
    cluster.rpc.expect("nas-0-0", {"action": "set_zvol_attrs", "zvol": vol,
                                   "attrs": {"uploadspeed": None}})
    ok("set", "host", "zvolattr", "nas-0-0", vol, "attr=uploadspeed", "value=None")
    cluster.rpc.expect("nas-0-0", {"action": "get_zvol_attrs", "zvol": vol},
                       {"body": {"zvol": vol, "frequency": 600, "nextsync": 1409862185,
                                 "uploadspeed": None, "downloadspeed": 1000000}})
    assert ok("list", "host", "zvolattr", "nas-0-0", vol) == (
        "ZVOL               FREQUENCY NEXTSYNC   UPLOADSPEED DOWNLOADSPEED\n"
        "compute-0-14-0-vol 600       1409862185 ----------- 1000000      \n")


@pytest.mark.parametrize("attr, value, message", [
    ("speed", "10", "unknown zvol attribute 'speed'"),
    ("frequency", "0", "invalid frequency 0: must be at least 1"),
    ("nextsync", "-1", "invalid nextsync -1"),
    ("uploadspeed", "fast", "invalid uploadspeed"),
])
def test_set_host_zvolattr_bad_values(cluster, attr, value, message):
    assert message in fails("set", "host", "zvolattr", "nas-0-0", "v1", attr, value)
    assert cluster.rpc.sent == []


def test_storageattr_commands(cluster):
    ok("add", "host", "nas-0-1", "appliance=nas")
    cluster.rpc.expect("nas-0-0", {"action": "set_attrs", "attrs": {"frequency": "600"}})
    ok("set", "host", "storageattr", "nas-0-0", "frequency", "600")
    cluster.rpc.expect("nas-0-0", {"action": "set_attrs", "attrs": {"uploadspeed": None}})
    ok("set", "host", "storageattr", "nas-0-0", "uploadspeed", "none")
    cluster.rpc.expect("nas-0-0", {"action": "del_attrs", "attrs": ["uploadspeed"]})
    ok("remove", "host", "storageattr", "nas-0-0", "uploadspeed")
    cluster.rpc.expect("nas-0-0", {"action": "get_attrs"},
                       {"attrs": {"frequency": "600", "img_sync_workers": "4"}})
    cluster.rpc.expect("nas-0-1", {"action": "get_attrs"}, {"attrs": {"frequency": "300"}})
    assert ok("list", "host", "storageattr", "nas-0-0", "nas-0-1") == (
        "NAS      ATTR             VALUE\n"
        "nas-0-0: frequency        600  \n"
        "nas-0-0: img_sync_workers 4    \n"
        "nas-0-1: frequency        300  \n")


def test_storage_commands_check_every_nas_before_sending(cluster):
    assert fails("list", "host", "storageattr", "nas-0-0", "nas-7-7") == "unknown host nas-7-7"
    assert fails("list", "host", "storagedev", "compute-0-3", "ghost") == "unknown host ghost"
    assert cluster.rpc.sent == []


# ------------------------------------------------------- input validation
@pytest.mark.parametrize("words", [
    ["add", "host", "a/b", "appliance=nas"],
    ["add", "host", "a;b", "appliance=nas"],
    ["add", "host", "a b", "appliance=nas"],
    ["add", "host", "..", "appliance=nas"],
    ["add", "host", "a,b", "appliance=nas"],
    ["add", "host", "new-0-1", "appliance=storage"],
    ["add", "host", "new-0-1", "appliance=nas", "rack=-1"],
    ["add", "host", "new-0-1", "appliance=nas", "ip=300.1.1.1"],
    ["add", "host", "vm", "compute-0-14", "compute", "disksize=-10"],
    ["add", "host", "vm", "compute-0-14", "compute", "disksize=0"],
    ["add", "host", "vm", "compute-0-14", "compute", "mem=0"],
    ["add", "host", "vm", "compute-0-14", "compute", "cpus=-1"],
    ["add", "host", "vm", "compute-0-14", "compute", "name=x/y"],
    ["add", "host", "vm", "compute-0-14", "robot"],
    ["add", "host", "vm", "compute-9-9", "compute"],
    ["set", "host", "attr", "compute-9-9", "img_sync", "true"],
    ["set", "host", "attr", "compute-0-3", "bad name", "true"],
    ["set", "host", "attr", "compute-0-3", "a;b", "true"],
    ["set", "attr", "x/y", "1"],
    ["remove", "host", "compute-9-9"],
    ["remove", "host", "compute-0-3", "compute-9-9"],
    ["remove", "host", "vm", "compute-0-3"],
    ["remove", "host", "attr", "compute-0-3", "never_set"],
    ["remove", "attr", "never_set"],
    ["list", "host", "attr", "compute-9-9"],
    ["list", "host", "vm", "compute-0-3"],
    ["start", "host", "vm", "compute-0-3"],
    ["stop", "host", "vm", "ghost-vm"],
])
def test_bad_input_is_one_line_and_changes_nothing(cluster, db, words):
    before = dump(db)
    fails(*words)
    assert dump(db) == before
    assert cluster.rpc.sent == []


@pytest.mark.parametrize("words, message", [
    (["add", "host", "x-0-1", "appliance=nas", "colour=blue"], "unknown parameter 'colour'"),
    (["add", "host", "vm", "compute-0-14", "compute", "disk=10"], "unknown parameter 'disk'"),
    (["add", "host", "x-0-1", "x-0-2", "appliance=nas"], "wrong number of arguments"),
    (["add", "host", "storagemap", "nas-0-0", "tank", "vol1"], "wrong number of arguments (3)"),
    (["remove", "host", "storagemap", "nas-0-0"], "rocks remove host storagemap NAS VOLUME"),
    (["remove", "host", "storageimg", "nas-0-0", "tank"], "wrong number of arguments"),
    (["set", "host", "zvolattr", "nas-0-0", "v", "frequency"], "wrong number of arguments"),
    (["list", "host", "storagemap"], "wrong number of arguments (0)"),
    (["list", "attr", "extra"], "wrong number of arguments"),
    (["list", "host", "--verbose"], "unknown option '--verbose'"),
    (["set", "attr", "a", "b", "value=c"], "wrong number of arguments"),
    (["add", "host", "x-0-1", "appliance=nas", "appliance=vm-container"], "given twice"),
])
def test_usage_errors_exit_2_and_change_nothing(cluster, db, words, message):
    before = dump(db)
    assert message in fails(*words, code=2)
    assert dump(db) == before


@pytest.mark.parametrize("param, message", [
    ("output-format=xml", "invalid output-format"),
    ("output-header=maybe", "invalid output-header"),
    ("output-col=nope", "unknown output column 'nope'"),
])
def test_bad_output_parameters(cluster, param, message):
    assert message in fails("list", "host", param)


# ------------------------------------------------------- configuration
def test_missing_configuration_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSTORAGE_CONF", str(tmp_path / "nope.conf"))
    assert "configuration file not found" in fails("list", "host", code=2)


def test_configuration_without_frontend_db_exits_2(tmp_path, monkeypatch):
    path = tmp_path / "c.conf"
    path.write_text("{}")
    monkeypatch.setenv("IMGSTORAGE_CONF", str(path))
    assert "missing key 'frontend_db'" in fails("list", "host", code=2)


def test_config_option_wins_over_the_environment(conf, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSTORAGE_CONF", str(tmp_path / "nope.conf"))
    other = tmp_path / "other.conf"
    other.write_text(json.dumps({"frontend_db": str(tmp_path / "other.db")}))
    ok("--config", str(other), "add", "host", "nas-0-0", "appliance=nas")
    assert Registry(str(tmp_path / "other.db")).find_host("nas-0-0") is not None


def test_usage_errors_do_not_need_a_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSTORAGE_CONF", str(tmp_path / "nope.conf"))
    assert "unknown parameter" in fails("list", "host", "x=1", code=2)


# ------------------------------------------------------- internal errors
def test_internal_error_is_one_line_and_debug_shows_the_traceback(conf, monkeypatch):
    def boom(self, names=None):
        raise RuntimeError("boom")
    monkeypatch.setattr(Registry, "hosts", boom)
    assert fails("list", "host") == \
        "internal error: RuntimeError: boom (run with --debug for details)"
    res = rocks("--debug", "list", "host")
    assert res.exit_code == 1
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1] == "error - internal error: RuntimeError: boom"


def test_main_exits_with_the_status(conf):
    with pytest.raises(SystemExit) as info:
        cli.main(["add", "host", "x", "appliance=nas"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        cli.main(["add", "host", "x", "appliance=nas"])
    assert info.value.code == 1


def test_list_host_storagemap_shows_transfer_figures_and_next_sync(cluster):
    import time as real_time
    body = [dict(_zrow("synced-vol", "compute-0-3", "tank", None, "mapped"), lifecycle="local",
                 nextsync=2000000000),
            dict(_zrow("moving-vol", "compute-0-3", "tank", None, "NAS<-VM sched",
                       started=real_time.time() - 5), lifecycle="pulling", progress=42.4,
                 rate=1500000.0)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    rows = json.loads(ok("list", "host", "storagemap", "nas-0-0", "output-format=json"))
    by = {r["zvol"]: r for r in rows}
    assert by["moving-vol"]["progress"] == "42%" and by["moving-vol"]["rate"] == "1.5 MB/s"
    assert by["synced-vol"]["nextsync"] == real_time.strftime(
        "%a %H:%M.%S", real_time.localtime(2000000000))
    assert by["synced-vol"]["progress"] is None and by["moving-vol"]["nextsync"] is None
