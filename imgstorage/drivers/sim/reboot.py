"""A simulated host reboots: what lives in the kernel's memory is gone, the disks stay.

A real reboot of a NAS or a VM container drops its iSCSI targets, its
initiator sessions, its device-mapper tables and the domains its hypervisor
ran; the pools, zvols, snapshots, holds, partial resumable receives and every
byte on disk survive, including a dm snapshot's COW store, which lives in the
bytes of the zvol under it.  This module does exactly that to one simulated
host, so tests can check that the daemons rebuild what the kernel lost.

Each subsystem is cleared under the lock its own driver takes to change it,
so a daemon working at that moment sees a consistent before or after: a dm
device vanishes between two requests, a session between two lookups.  Every
later request through a dropped object fails as the kernel's would, because
the simulated devices resolve their path again on every request.

Stream endpoints need nothing here: they are sockets of the daemons'
processes, which die with them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

from ...errors import ValidationError
from . import dm, hypervisor, initiator, state, target


@dataclass
class RebootReport:
    """What the reboot dropped, one human-readable line per object."""
    host: str
    targets: List[str] = field(default_factory=list)
    sessions: List[str] = field(default_factory=list)
    dm_devices: List[str] = field(default_factory=list)
    domains: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        out = [f"removed iSCSI target {t}" for t in self.targets]
        out += [f"dropped iSCSI session {s}" for s in self.sessions]
        out += [f"removed device-mapper device {d}" for d in self.dm_devices]
        out += [f"stopped domain {d}" for d in self.domains]
        out.append(f"rebooted {self.host}: {len(self.targets)} targets, "
                   f"{len(self.sessions)} sessions, {len(self.dm_devices)} device-mapper "
                   f"devices, {len(self.domains)} running domains dropped; pools, zvols, "
                   "snapshots and their bytes kept")
        return out


def reboot(root: Union[str, Path], host: str) -> RebootReport:
    """Drop everything the kernel of ``host`` held only in memory.

    An unknown host is refused before anything is touched.
    """
    root = Path(root)
    state.sim_host(host)
    if not state.host_exists(root, host):
        raise ValidationError(f"unknown sim host {host!r}: no folder {root / host}")
    report = RebootReport(host)
    report.targets = _drop_targets(root, host)
    report.sessions = _drop_sessions(root, host)
    report.dm_devices = _drop_dm(root, host)
    report.domains = _stop_domains(root, host)
    return report


def _drop_targets(root: Path, host: str) -> List[str]:
    path = state.subsystem_dir(root, host, "target") / target._FILE
    with state.subsystem_lock(root, host, "target"):
        data = state.read_json(path, {})
        dropped = sorted(data.get("targets", {}))
        if dropped:
            data["targets"] = {}
            state.write_json(path, data)
    return dropped


def _drop_sessions(root: Path, host: str) -> List[str]:
    """Sessions go; the initiator's name stays (it is a file on the real disk too).

    Session ids start again from 1, as a freshly booted kernel numbers them.
    """
    path = state.subsystem_dir(root, host, "iscsi") / initiator._SESSIONS
    with state.subsystem_lock(root, host, "iscsi"):
        data = state.read_json(path, {})
        sessions = data.get("sessions", [])
        dropped = [f"[{s.get('sid')}] {s.get('iqn')} on {s.get('portal')} (/dev/{s.get('device')})"
                   for s in sessions]
        if data:
            path.unlink()
    return dropped


def _drop_dm(root: Path, host: str) -> List[str]:
    """Each table goes under its device's lock, then the lock file itself.

    A request waiting on a removed device's lock gets it afterwards, finds no
    state and fails as I/O on a removed device does.
    """
    folder = state.subsystem_dir(root, host, "dm")
    dropped = []
    with state.locked(folder / state.LOCK_NAME):
        for name in dm.device_names(root, host):
            lock_path = folder / ".locks" / name
            with state.locked(lock_path):
                try:
                    (folder / f"{name}.json").unlink()
                except FileNotFoundError:
                    continue                   # removed by its owner meanwhile
                dropped.append(name)
                try:
                    lock_path.unlink()
                except FileNotFoundError:
                    pass
    return dropped


def _stop_domains(root: Path, host: str) -> List[str]:
    """Running domains are shut off and no longer hold their disks.

    Their definitions stay, as a persistent libvirt domain is still defined,
    and shut off, after its host rebooted.
    """
    path = state.subsystem_dir(root, host, "libvirt") / hypervisor._FILE
    with state.subsystem_lock(root, host, "libvirt"):
        data = state.read_json(path, {})
        stopped = []
        for name, dom in sorted(data.get("domains", {}).items()):
            if dom.get("state") == "running":
                dom["state"] = "shut off"
                dom["since"] = time.time()
                stopped.append(name)
        if stopped:
            state.write_json(path, data)
    return stopped
