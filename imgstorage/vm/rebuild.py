"""Give a container back the devices its rows say it has, after its host rebooted.

A reboot drops every iSCSI session and device-mapper table, but keeps the
zvols (the local copies and the temp-write stores with the VM's writes).
Each row's state says what the kernel held (imgstorage/vm/states.py
``KERNEL``); this module logs in again with the row's target, portal and
CHAP credentials and re-creates ``<zvol>-snap`` with the table of that state,
so the device path is the one the VM had:

* ``snapshot``: dm snapshot over the iSCSI disk and the persistent temp-write
  store (the writes made before the reboot are read back from it);
* ``merging``: dm snapshot-merge onto the local copy, which resumes the merge;
* ``local``: dm linear over the local copy;
* ``flushing``: dm snapshot-merge onto the iSCSI disk (the flush resumes);
* ``attached`` (direct iSCSI): the session.

Nothing is ever destroyed here.  A device whose local zvol or temp-write
store is gone cannot be rebuilt: the row becomes ``broken`` with the reason,
and stays so for an administrator.  A login that fails (the NAS is not back
yet) is tried again by the merge monitor every RETRY seconds.

Rebuilding does what the kernel lacks and nothing else, so it is idempotent:
a daemon restarted without a reboot finds every device present.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

from ..drivers.base import ChapCredentials
from ..drivers.dm import linear_table, snapshot_merge_table, snapshot_table
from ..errors import ImgStorageError
from .models import VmZvol
from .states import KERNEL, REBUILDABLE, Event, Kernel, State
from .sync import dm_name, temp_name

log = logging.getLogger(__name__)

RETRY = 10.0            # seconds between attempts at a device whose NAS did not answer


class CannotRebuild(ImgStorageError):
    """What the device stood on is gone; retrying cannot help."""


class Rebuilder:
    def __init__(self, service):
        self.svc = service
        self.drivers = service.drivers
        self._retry_at: Dict[str, float] = {}

    # -- what is missing ------------------------------------------------------
    def _kernel(self, row: VmZvol) -> Kernel:
        state = State(row.state)
        return KERNEL[State(row.prior_state)] if state is State.BROKEN and row.prior_state \
            else KERNEL[state]

    def missing(self, row: VmZvol) -> List[str]:
        """What the row's state needs from the kernel and the kernel does not have."""
        kernel = self._kernel(row)
        gone = []
        if kernel.session and self.svc._session_for(row.iscsi_target) is None:
            gone.append("iSCSI session")
        if kernel.table and not self.drivers.dm.exists(dm_name(row.zvol)):
            gone.append(f"/dev/mapper/{dm_name(row.zvol)}")
        return gone

    def _wanted(self, row: VmZvol) -> bool:
        state = State(row.state)
        return state in REBUILDABLE or (state is State.BROKEN and bool(row.prior_state))

    # -- rebuilding -----------------------------------------------------------
    def rebuild_all(self) -> None:
        """At start: every row whose kernel objects are gone, in the order of their disks.

        Logging in again in the order of the old disk names gives the kernel
        the best chance to hand out the same ``/dev/sdX`` names as before.
        """
        rows = [r for r in self.svc.rows() if self._wanted(r)]
        rows.sort(key=lambda r: (len(r.bdev or ""), r.bdev or "", r.zvol))
        started = time.monotonic()
        done = failed = 0
        for row in rows:
            outcome = self._attempt(row.zvol)
            done += outcome is True
            failed += outcome is False
        if done or failed:
            log.warning("rebuilt the devices of %d zvol(s) after a restart of the host in %.1fs;"
                        " %d could not be rebuilt yet", done, time.monotonic() - started, failed)

    def retry_due(self) -> None:
        """From the merge monitor: try again the devices whose NAS did not answer."""
        now = time.monotonic()
        for zvol, when in sorted(self._retry_at.items()):
            if when <= now:
                self._attempt(zvol)

    def _attempt(self, zvol: str) -> Optional[bool]:
        """True: rebuilt; False: not (yet); None: nothing was missing."""
        with self.svc.zvol_lock(zvol, raise_busy=False) as got:
            if not got:
                return False
            row = self.svc.row(zvol)
            if row is None or not self._wanted(row):
                self._retry_at.pop(zvol, None)
                return None
            gone = self.missing(row)
            if not gone:
                self._retry_at.pop(zvol, None)
                if row.state == State.BROKEN.value:
                    self.svc.store.transition(zvol, Event.REBUILT, last_error=None)
                return None
            log.warning("zvol %s is %s but the kernel has lost its %s: rebuilding", zvol,
                        row.state, " and ".join(gone))
            try:
                self.rebuild(row)
            except CannotRebuild as exc:
                self._retry_at.pop(zvol, None)
                log.error("zvol %s cannot be rebuilt: %s; nothing was destroyed", zvol, exc)
                if row.state != State.BROKEN.value:
                    self.svc.store.transition(zvol, Event.BROKE, last_error=str(exc)[:1000])
                else:
                    self.svc.update(zvol, last_error=str(exc)[:1000])
                return False
            except ImgStorageError as exc:
                self._retry_at[zvol] = time.monotonic() + RETRY
                log.error("zvol %s: rebuilding its device failed (%s); trying again in %.0f s",
                          zvol, exc, RETRY)
                self.svc.update(zvol, last_error=f"rebuild: {exc}"[:1000])
                return False
            self._retry_at.pop(zvol, None)
            if row.state == State.BROKEN.value:
                self.svc.store.transition(zvol, Event.REBUILT, last_error=None)
            else:
                self.svc.update(zvol, last_error=None)
            return True

    def rebuild(self, row: VmZvol) -> None:
        kernel = self._kernel(row)
        zfs = self.drivers.zfs
        needs = []
        if kernel.origin == "local":
            needs.append(row.zvol)
        if kernel.table in ("snapshot", "snapshot-merge"):
            needs.append(temp_name(row.zvol))
        for name in needs:
            if not row.remotepool or zfs.get_zvol(row.remotepool, name) is None:
                raise CannotRebuild(f"{row.remotepool}/{name} is gone")
        if kernel.table and not row.devsize:
            raise CannotRebuild("the device's size was never recorded")
        bdev = row.bdev
        if kernel.session:
            bdev = self._login(row)
        if not kernel.table or self.drivers.dm.exists(dm_name(row.zvol)):
            return
        local = zfs.device_path(row.remotepool, row.zvol)
        cow = zfs.device_path(row.remotepool, temp_name(row.zvol))
        origin = bdev if kernel.origin == "iscsi" else local
        if kernel.table == "snapshot":
            table = snapshot_table(row.devsize, origin, cow)
        elif kernel.table == "snapshot-merge":
            table = snapshot_merge_table(row.devsize, origin, cow)
        else:
            table = linear_table(row.devsize, origin)
        self.drivers.dm.create(dm_name(row.zvol), table)
        log.info("zvol %s: /dev/mapper/%s re-created as %s over %s", row.zvol, dm_name(row.zvol),
                 kernel.table, origin)

    def _login(self, row: VmZvol) -> str:
        """The session of the row's target, logged in again if it is gone; its disk."""
        session = self.svc._session_for(row.iscsi_target)
        if session is None or not session.device:
            chap = (ChapCredentials(row.chap_user, row.chap_secret)
                    if row.chap_user and row.chap_secret else None)
            bdev = self.svc._attach(row.iscsi_target, row.nas, chap, self.svc.config.timeout)
        else:
            bdev = f"/dev/{session.device}"
        if bdev != row.bdev:
            log.warning("zvol %s: its iSCSI disk is %s now (was %s)", row.zvol, bdev, row.bdev)
            self.svc.update(row.zvol, bdev=bdev)
        return bdev
