"""A NAS that rebooted exports the disks its containers use again, as they were.

A reboot drops every iSCSI target (the daemon never saves the target
configuration), while the containers keep their sessions and retry for
open-iscsi's ``replacement_timeout`` (120 s by default) before they fail the
VM's I/O.  So, once at start and before it takes requests, the daemon brings
back the target of every zvol whose state says a container uses it, with the
same IQN, backing zvol, LUN (the drivers always use the same one), initiator
ACL and CHAP credentials recorded at map time: the container's session then
carries on by itself.

It only ever adds what is missing.  A target that is there with the same
device and ACL is left alone (a daemon restarted without a reboot finds them
all); one with other settings is reported and left, since something else made
it; a zvol whose volume is gone is reported and skipped.  One failure never
stops the others.  The target drivers' listings do not report CHAP
credentials, so a target that is present is compared by device and ACL only.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..drivers import NodeDrivers
from ..drivers.base import ChapCredentials, TargetInfo
from ..errors import ImgStorageError
from .states import TARGET_IN_USE
from .store import NasStore

log = logging.getLogger(__name__)


@dataclass
class ReexportReport:
    """The outcome per zvol, so the daemon's log and the tests tell the same story."""
    exported: List[str] = field(default_factory=list)
    present: List[str] = field(default_factory=list)
    conflicts: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    failed: List[str] = field(default_factory=list)
    seconds: float = 0.0


def _same_device(a: Optional[str], b: str) -> bool:
    """Real drivers may report a device through another name of the same node."""
    return bool(a) and (a == b or os.path.realpath(a) == os.path.realpath(b))


def _existing_targets(drivers: NodeDrivers) -> Optional[Dict[str, TargetInfo]]:
    """What is exported now, read once; None when the driver cannot say.

    Without a listing every export is asked for anyway: the drivers accept a
    request for a target that exists with the same settings.
    """
    try:
        return {t.iqn: t for t in drivers.target.list_targets()}
    except ImgStorageError as exc:
        log.error("could not list the iSCSI targets (%s); exporting every mapped zvol and "
                  "letting the target driver sort out those already there", exc)
        return None


def _existing_zvols(drivers: NodeDrivers) -> Optional[set]:
    try:
        return {(z.pool, z.zvol) for z in drivers.zfs.list_zvols()}
    except ImgStorageError as exc:
        log.error("could not list the zvols (%s); trying every export", exc)
        return None


SETTLE = 30.0          # seconds a failed export is tried again at start
SETTLE_POLL = 1.0


def reexport_targets(store: NasStore, drivers: NodeDrivers,
                     settle: float = SETTLE) -> ReexportReport:
    """Export again every target a container uses that the kernel lost; report what it did."""
    started = time.monotonic()
    report = ReexportReport()
    rows = [r for r in store.all() if r.state in TARGET_IN_USE]
    if rows:
        targets = _existing_targets(drivers)
        zvols = _existing_zvols(drivers)
        for row in rows:
            _reexport_one(row, drivers, targets, zvols, report)
    # Right after a boot udev may still be creating the zvols' device links: a failed
    # export is tried again for a little while before the daemon gives up on it.
    deadline = time.monotonic() + settle

    def retryable():
        return [r for r in rows if r.zvol in report.failed and r.iscsi_target and r.initiator]

    while retryable() and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL)
        again = retryable()
        report.failed = [name for name in report.failed if name not in {r.zvol for r in again}]
        for row in again:
            _reexport_one(row, drivers, None, None, report, quiet=True)
    for row in retryable():
        log.error("zvol %s: its target could not be exported again; unmap it or clean it",
                  row.zvol)
    report.seconds = time.monotonic() - started
    _summarise(report)
    return report


def _reexport_one(row, drivers: NodeDrivers, targets: Optional[Dict[str, TargetInfo]],
                  zvols: Optional[set], report: ReexportReport, quiet: bool = False) -> None:
    name = row.zvol
    if not row.iscsi_target or not row.initiator:
        log.error("zvol %s is %s but its record has no %s: its target cannot be exported "
                  "again; unmap it, or clean it with 'rocks clean host storagemap'", name,
                  row.state, "target name" if not row.iscsi_target else "initiator")
        report.failed.append(name)
        return
    try:
        device = drivers.zfs.device_path(row.zpool, name)
        found = targets.get(row.iscsi_target) if targets is not None else None
        if found is not None:
            if _same_device(found.device, device) and list(found.acls) == [row.initiator]:
                report.present.append(name)
                return
            log.error("iSCSI target %s of zvol %s (%s) exists with other settings (device %s, "
                      "ACL %s; expected %s for %s): left as it is, %s cannot use it",
                      row.iscsi_target, name, row.state, found.device or "none",
                      ", ".join(found.acls) or "none", device, row.initiator, row.remotehost)
            report.conflicts.append(name)
            return
        if zvols is not None and (row.zpool, name) not in zvols:
            log.error("zvol %s/%s is %s on %s but the volume is GONE: its target %s cannot be "
                      "exported again and %s will fail the VM's I/O", row.zpool, name,
                      row.state, row.remotehost, row.iscsi_target, row.remotehost)
            report.missing.append(name)
            return
        chap = (ChapCredentials(row.chap_user, row.chap_secret)
                if row.chap_user and row.chap_secret else None)
        drivers.target.create_target(row.iscsi_target, device, row.initiator, chap)
    except ImgStorageError as exc:
        (log.debug if quiet else log.error)(
            "could not export zvol %s (%s) again as %s: %s%s", name, row.state,
            row.iscsi_target, exc, "" if quiet else "; trying again for a while")
        report.failed.append(name)
        return
    log.info("re-exported %s as %s to %s (%s, zvol %s%s)", device, row.iscsi_target,
             row.initiator, row.remotehost, row.state, ", CHAP" if chap else "")
    report.exported.append(name)


def _summarise(report: ReexportReport) -> None:
    log.info("re-exported %d targets of mapped zvols in %.2f s; %d were present",
             len(report.exported), report.seconds, len(report.present))
    trouble = [(len(report.conflicts), "exist with other settings"),
               (len(report.missing), "have lost their volume"),
               (len(report.failed), "failed")]
    if any(n for n, _ in trouble):
        log.error("targets of mapped zvols not exported again: %s",
                  "; ".join(f"{n} {what}" for n, what in trouble if n))
