"""Start, stop and list VMs on a container through libvirt's ``virsh``.

The frontend boots a VM on the block device the storage layer handed back
(an iSCSI disk, or the dm snapshot in sync mode) as a transient domain: it
exists while it runs, so a stopped VM leaves nothing behind to go stale.
"""
from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from typing import List, Optional

from ..errors import CommandError
from ..runner import Runner
from .base import DomainInfo

DEFAULT_URI_TEMPLATE = "qemu+ssh://root@{host}/system"
_ALREADY_STOPPED = ("domain is not running", "failed to get domain", "domain not found")


def domain_xml(vm: str, disk: str, memory_mb: int, cpus: int, *,
               bridge: Optional[str] = None, domain_type: str = "kvm") -> str:
    """A minimal domain: one virtio disk on ``disk``, optionally a bridged NIC."""
    domain = ET.Element("domain", type=domain_type)
    ET.SubElement(domain, "name").text = vm
    ET.SubElement(domain, "memory", unit="MiB").text = str(int(memory_mb))
    ET.SubElement(domain, "vcpu").text = str(int(cpus))
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    devices = ET.SubElement(domain, "devices")
    disk_el = ET.SubElement(devices, "disk", type="block", device="disk")
    # No host page cache: the data lives on the NAS or in a dm snapshot, and
    # a cached write the host has not flushed would be lost on a merge.
    ET.SubElement(disk_el, "driver", name="qemu", type="raw", cache="none", io="native")
    ET.SubElement(disk_el, "source", dev=disk)
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    if bridge:
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=bridge)
        ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "console", type="pty")
    return ET.tostring(domain, encoding="unicode")


def parse_domblklist(stdout: str) -> List[str]:
    """Sources of block-type disks in ``domblklist --details`` (old and new layouts)."""
    sources = []
    for line in stdout.splitlines():
        fields = line.split(None, 3)
        if len(fields) != 4 or fields[0] == "Type":
            continue
        kind, device, _target, source = fields
        if kind == "block" and device == "disk" and source != "-":
            sources.append(source.strip())
    return sources


class Virsh:
    """HypervisorDriver on ``virsh`` with one libvirt URI per container."""

    def __init__(self, runner: Runner, uri_template: str = DEFAULT_URI_TEMPLATE, *,
                 bridge: Optional[str] = None, domain_type: str = "kvm") -> None:
        self.runner = runner
        self.uri_template = uri_template
        self.bridge = bridge
        self.domain_type = domain_type

    def _virsh(self, host: str, *args: str) -> List[str]:
        return ["virsh", "-c", self.uri_template.format(host=host), *args]

    def start(self, host: str, vm: str, disk: str, memory_mb: int, cpus: int) -> None:
        xml = domain_xml(vm, disk, memory_mb, cpus, bridge=self.bridge,
                         domain_type=self.domain_type)
        fd, path = tempfile.mkstemp(prefix=f"{vm}-", suffix=".xml")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(xml)
            self.runner.run(self._virsh(host, "create", path))
        finally:
            os.unlink(path)

    def stop(self, host: str, vm: str) -> None:
        """A VM that is not running is already where the caller wants it."""
        argv = self._virsh(host, "destroy", vm)
        result = self.runner.run(argv, check=False)
        if result.returncode == 0:
            return
        text = result.stderr.lower()
        if "failed to connect" not in text and any(s in text for s in _ALREADY_STOPPED):
            return
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def domains(self, host: str) -> List[DomainInfo]:
        out = self.runner.run(self._virsh(host, "list", "--all", "--name")).stdout
        infos = []
        for name in (line.strip() for line in out.splitlines()):
            if not name:
                continue
            state = self._about(host, "domstate", name)
            if state is None:
                continue  # it went away since the listing
            disks = self._about(host, "domblklist", name, "--details")
            if disks is None:
                continue
            infos.append(DomainInfo(name=name, state=state.strip(),
                                    disks=tuple(parse_domblklist(disks))))
        return infos

    def _about(self, host: str, *args: str) -> Optional[str]:
        """stdout of a per-domain query, or None when the domain no longer exists."""
        argv = self._virsh(host, *args)
        result = self.runner.run(argv, check=False)
        if result.returncode == 0:
            return result.stdout
        if "failed to get domain" in result.stderr.lower():
            return None
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)
