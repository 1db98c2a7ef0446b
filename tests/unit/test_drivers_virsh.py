"""The hypervisor driver against recorded virsh output."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from imgstorage.drivers.base import DomainInfo, HypervisorDriver
from imgstorage.drivers.virsh import Virsh, domain_xml, parse_domblklist
from imgstorage.errors import CommandError
from tests.unit.replay import ANY, ReplayRunner, load_fixture

HOST = "vm-container-0-1"
VIRSH = ["virsh", "-c", f"qemu+ssh://root@{HOST}/system"]
VM = "compute-0-1-0"
DISK = "/dev/mapper/compute-0-1-0-vol-snap"


# ------------------------------------------------------------------ starting
def test_domain_xml_describes_a_virtio_block_disk():
    root = ET.fromstring(domain_xml(VM, DISK, 2048, 2, bridge="br0"))
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert root.findtext("name") == VM
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "2048"
    assert root.findtext("vcpu") == "2"
    disk = root.find("devices/disk")
    assert (disk.get("type"), disk.get("device")) == ("block", "disk")
    assert disk.find("source").get("dev") == DISK
    assert (disk.find("target").get("dev"), disk.find("target").get("bus")) == ("vda", "virtio")
    assert root.find("devices/interface").get("type") == "bridge"
    assert root.find("devices/interface/source").get("bridge") == "br0"


def test_domain_xml_without_a_bridge_has_no_interface():
    root = ET.fromstring(domain_xml(VM, DISK, 512, 1))
    assert root.find("devices/interface") is None


def test_domain_xml_escapes_what_it_is_given():
    text = domain_xml("vm<&>'\"", "/dev/odd'\"&<name>", 512, 1)
    root = ET.fromstring(text)
    assert root.findtext("name") == "vm<&>'\""
    assert root.find("devices/disk/source").get("dev") == "/dev/odd'\"&<name>"


def test_start_creates_a_transient_domain_from_a_temporary_file():
    seen = {}

    def capture(argv):
        seen["path"] = argv[-1]
        with open(argv[-1], encoding="utf-8") as fh:
            seen["xml"] = fh.read()

    runner = ReplayRunner().expect(VIRSH + ["create", ANY], "virsh/create_ok.txt", on_run=capture)
    Virsh(runner, bridge="br1").start(HOST, VM, DISK, 4096, 4)
    root = ET.fromstring(seen["xml"])
    assert root.findtext("name") == VM and root.findtext("memory") == "4096"
    assert root.findtext("vcpu") == "4"
    assert root.find("devices/disk/source").get("dev") == DISK
    assert root.find("devices/interface/source").get("bridge") == "br1"
    assert runner.argvs == [VIRSH + ["create", seen["path"]]]
    assert not os.path.exists(seen["path"])  # cleaned up


def test_start_failure_surfaces_virsh_error_and_cleans_up():
    paths = []
    runner = ReplayRunner().expect(VIRSH + ["create", ANY], "virsh/create_exists.txt",
                                   on_run=lambda argv: paths.append(argv[-1]))
    with pytest.raises(CommandError, match="already exists"):
        Virsh(runner).start(HOST, VM, DISK, 1024, 1)
    assert paths and not os.path.exists(paths[0])


def test_uri_template_is_configurable():
    runner = ReplayRunner().expect(["virsh", "-c", f"qemu+tcp://{HOST}/system", "destroy", VM],
                                   "virsh/destroy_ok.txt")
    Virsh(runner, uri_template="qemu+tcp://{host}/system").stop(HOST, VM)
    runner.assert_all_used()


# ------------------------------------------------------------------ stopping
def test_stop_destroys_the_domain():
    runner = ReplayRunner().expect(VIRSH + ["destroy", VM], "virsh/destroy_ok.txt")
    Virsh(runner).stop(HOST, VM)
    assert runner.argvs == [VIRSH + ["destroy", VM]]


@pytest.mark.parametrize("fixture", ["virsh/destroy_not_running.txt", "virsh/destroy_no_domain.txt"])
def test_stopping_a_stopped_vm_is_fine(fixture):
    runner = ReplayRunner().expect(VIRSH + ["destroy", VM], fixture)
    Virsh(runner).stop(HOST, VM)
    runner.assert_all_used()


def test_stop_on_an_unreachable_host_is_an_error():
    runner = ReplayRunner().expect(VIRSH + ["destroy", VM], "virsh/connect_failed.txt")
    with pytest.raises(CommandError, match="failed to connect to the hypervisor"):
        Virsh(runner).stop(HOST, VM)


# ------------------------------------------------------------------- listing
def test_domains_lists_state_and_block_disks():
    runner = (ReplayRunner()
              .expect(VIRSH + ["list", "--all", "--name"], "virsh/list_all_names.txt")
              .expect(VIRSH + ["domstate", "compute-0-1-0"], "virsh/domstate_running.txt")
              .expect(VIRSH + ["domblklist", "compute-0-1-0", "--details"],
                      "virsh/domblklist_details.txt")
              .expect(VIRSH + ["domstate", "compute-0-2-0"], "virsh/domstate_shut_off.txt")
              .expect(VIRSH + ["domblklist", "compute-0-2-0", "--details"],
                      "virsh/domblklist_details_old.txt"))
    assert Virsh(runner).domains(HOST) == [
        DomainInfo("compute-0-1-0", "running", (DISK,)),
        DomainInfo("compute-0-2-0", "shut off", ("/dev/sdd",)),
    ]
    runner.assert_all_used()


def test_domains_that_vanish_while_listing_are_skipped():
    runner = (ReplayRunner()
              .expect(VIRSH + ["list", "--all", "--name"], "virsh/list_all_names.txt")
              .expect(VIRSH + ["domstate", "compute-0-1-0"], "virsh/domstate_running.txt")
              .expect(VIRSH + ["domblklist", "compute-0-1-0", "--details"],
                      "virsh/domblklist_gone.txt")
              .expect(VIRSH + ["domstate", "compute-0-2-0"], "virsh/domstate_gone.txt"))
    assert Virsh(runner).domains(HOST) == []
    runner.assert_all_used()
    assert len(runner.calls) == 4  # no disk query for a domain already gone


def test_a_failing_query_is_an_error_not_a_vanished_domain():
    runner = (ReplayRunner()
              .expect(VIRSH + ["list", "--all", "--name"], "virsh/list_all_names.txt")
              .expect(VIRSH + ["domstate", "compute-0-1-0"],
                      stderr="error: Disconnected from qemu:///system due to end of file\n",
                      returncode=1))
    with pytest.raises(CommandError, match="Disconnected"):
        Virsh(runner).domains(HOST)


def test_no_domains():
    runner = ReplayRunner().expect(VIRSH + ["list", "--all", "--name"],
                                   "virsh/list_all_names_empty.txt")
    assert Virsh(runner).domains(HOST) == []


def test_domblklist_keeps_only_block_disks():
    assert parse_domblklist(load_fixture("virsh/domblklist_details.txt").stdout) == [DISK]


def test_implements_the_protocol():
    assert isinstance(Virsh(ReplayRunner()), HypervisorDriver)
