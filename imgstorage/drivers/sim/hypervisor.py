"""A simulated hypervisor: which VM runs on which host, from which disk.

It runs nothing.  What matters to storage is that a running domain holds its
disk open, so the disk of a running VM is "in use" (``dmsetup remove`` and
``zfs destroy`` refuse it), exactly the guard a real container gives.
State: ``sim_root/<host>/libvirt/domains.json``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Union

from ...errors import DriverError, ValidationError
from ..base import DomainInfo
from . import blockdev, state

_FILE = "domains.json"


def _path(root: Union[str, Path], host: str) -> Path:
    return state.subsystem_dir(root, host, "libvirt") / _FILE


def read_domains(root: Union[str, Path], host: str) -> Dict[str, Dict[str, Any]]:
    if not state.host_exists(root, host):
        return {}
    return state.read_json(_path(root, host), {}).get("domains", {})


def _positive(kind: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"invalid {kind} {value!r}: expected a positive whole number")
    return value


class SimHypervisor:
    """The HypervisorDriver of the simulated cluster (one for all hosts, like the frontend's)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def _host(self, host: str) -> str:
        state.sim_host(host)
        if not state.host_exists(self.root, host):
            raise DriverError(f"failed to connect to the hypervisor on {host}: no such host")
        return host

    def start(self, host: str, vm: str, disk: str, memory_mb: int, cpus: int) -> None:
        host = self._host(host)
        state.host_name(vm)
        _positive("memory", memory_mb)
        _positive("number of CPUs", cpus)
        with state.subsystem_lock(self.root, host, "libvirt"):
            data = state.read_json(_path(self.root, host), {})
            domains = data.setdefault("domains", {})
            if domains.get(vm, {}).get("state") == "running":
                raise DriverError(f"Requested operation is not valid: Domain '{vm}' is already active")
            try:
                blockdev.open_device(self.root, host, disk).size
            except DriverError as exc:
                raise DriverError(f"Cannot access storage file '{disk}' of domain '{vm}': "
                                  f"{exc}") from None
            domains[vm] = {"name": vm, "state": "running", "disks": [disk],
                           "memory_mb": memory_mb, "cpus": cpus, "since": time.time()}
            state.write_json(_path(self.root, host), data)

    def stop(self, host: str, vm: str) -> None:
        host = self._host(host)
        with state.subsystem_lock(self.root, host, "libvirt"):
            data = state.read_json(_path(self.root, host), {})
            dom = data.get("domains", {}).get(vm)
            if dom is None:
                raise DriverError(f"failed to get domain '{vm}'")
            if dom["state"] != "shut off":
                dom["state"] = "shut off"
                dom["since"] = time.time()
                state.write_json(_path(self.root, host), data)

    def domains(self, host: str) -> List[DomainInfo]:
        host = self._host(host)
        return [DomainInfo(name=d["name"], state=d["state"], disks=tuple(d.get("disks", ())))
                for _, d in sorted(read_domains(self.root, host).items())]
