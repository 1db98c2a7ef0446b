"""Sync mode on the container: the dm devices, the local copy, the merge.

The VM always sees one device, ``/dev/mapper/<zvol>-snap``; its table changes
underneath it (snapshot -> snapshot-merge -> linear) with suspend/reload/
resume, so the VM never notices the switch from the NAS disk to its local copy.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, Optional

from .. import naming, syncsnaps
from ..drivers.dm import linear_table, snapshot_merge_table, snapshot_table
from ..errors import DriverError, ImgStorageError, StateError
from ..nas.client import NasClient
from ..rpcapi import OneWay
from .states import Event, State

log = logging.getLogger(__name__)

MERGE_POLL = 1.0
SWITCH_WORKERS = 8      # merged zvols switched to their local copy side by side


def temp_name(zvol: str) -> str:
    return f"{zvol}-temp-write"


def dm_name(zvol: str) -> str:
    return f"{zvol}-snap"


def merged(figures) -> bool:
    """dm-snapshot's own test: the merge is done when only metadata is left."""
    return figures is not None and figures[0] == figures[2]


class ContainerSync:
    """The sync half of the VM-container service (it shares the service's store and drivers)."""

    def __init__(self, service):
        self.svc = service
        self.drivers = service.drivers
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._switches = ThreadPoolExecutor(max_workers=SWITCH_WORKERS,
                                            thread_name_prefix="switch")
        self.notify: Callable[[str, Dict], None] = service.notify

    # -- map ----------------------------------------------------------------
    def prepare(self, zvol: str, pool: str, volsize: int, reuse: bool = False) -> None:
        """Local zvol (full size) and the sparse temp-write zvol, refusing leftovers.

        With ``reuse`` the local zvol is a copy kept here and only the
        temp-write zvol is made.  A new local zvol that does not fit makes
        room by destroying kept copies, oldest first.
        """
        zfs = self.drivers.zfs
        for name in (temp_name(zvol),) if reuse else (zvol, temp_name(zvol)):
            if zfs.get_zvol(pool, name) is not None:
                raise StateError(f"{pool}/{name} already exists on {self.svc.config.name} and may "
                                 "hold data not yet synced to the NAS; clean it up first "
                                 "(imgstorageadmin or rocks clean host storagemap)")
        if not reuse:
            self.svc.kept.make_room(pool, volsize, zvol)
            zfs.create_zvol(pool, zvol, volsize)
        try:
            zfs.create_zvol(pool, temp_name(zvol), volsize, sparse=True)
        except ImgStorageError:
            if not reuse:
                zfs.destroy(pool, zvol)
            raise

    def create_snapshot_device(self, zvol: str, pool: str, bdev: str) -> int:
        sectors = self.drivers.blockdev.size_bytes(bdev) // naming.SECTOR
        cow = self.drivers.zfs.device_path(pool, temp_name(zvol))
        self.drivers.dm.create(dm_name(zvol), snapshot_table(sectors, bdev, cow))
        return sectors

    def discard(self, zvol: str, pool: Optional[str], keep_local: bool = False) -> None:
        """Undo prepare(): only for a copy that never held the VM's only data
        (``keep_local``: the local zvol is a kept copy, and stays)."""
        if self.drivers.dm.exists(dm_name(zvol)):
            self.drivers.dm.remove(dm_name(zvol))
        if pool:
            for name in (temp_name(zvol),) if keep_local else (temp_name(zvol), zvol):
                if self.drivers.zfs.get_zvol(pool, name) is not None:
                    syncsnaps.let_go(self.drivers.zfs, pool, name)
                    self.drivers.zfs.destroy(pool, name, recursive=True)

    # -- merge --------------------------------------------------------------
    def _reload(self, zvol: str, table: str) -> None:
        dm = self.drivers.dm
        dm.suspend(dm_name(zvol))
        try:
            dm.reload(dm_name(zvol), table)
        finally:
            dm.resume(dm_name(zvol))

    def start_merge(self, row) -> None:
        """The copy arrived: merge the temp writes into it, in the kernel, while the VM runs."""
        zfs = self.drivers.zfs
        origin = zfs.device_path(row.remotepool, row.zvol)
        cow = zfs.device_path(row.remotepool, temp_name(row.zvol))
        self._reload(row.zvol, snapshot_merge_table(row.devsize, origin, cow))

    def finish_switch(self, row) -> None:
        """Merged: switch to the local copy alone and let go of the NAS.

        Safe to run again from any point (a daemon killed part-way, a host
        rebooted): each step looks at what the kernel has before acting.
        """
        zfs = self.drivers.zfs
        table = linear_table(row.devsize, zfs.device_path(row.remotepool, row.zvol))
        if not self.drivers.dm.exists(dm_name(row.zvol)):
            self.drivers.dm.create(dm_name(row.zvol), table)       # the host rebooted
        elif self.drivers.dm.status(dm_name(row.zvol))[0].target_type != "linear":
            self._reload(row.zvol, table)
        if zfs.get_zvol(row.remotepool, temp_name(row.zvol)) is not None:
            zfs.destroy(row.remotepool, temp_name(row.zvol), recursive=True)
        self.svc._logout(row.iscsi_target, row.nas)

    def report_merged(self, row) -> None:
        """Tell the NAS the VM runs from its local copy (it also asks, if this is lost)."""
        log.info("zvol %s merged in %.1fs; running from the local copy", row.zvol,
                 time.time() - (row.merge_started or time.time()))
        self.nas(row).zvol_synced(row.zvol, ok=True)

    def nas(self, row) -> NasClient:
        """The NAS that mapped ``row``'s zvol here, told through the service's notifier."""
        return NasClient(OneWay(self.notify), row.nas_node)

    def merge_figures(self, zvol: str):
        for st in self.drivers.dm.status(dm_name(zvol)):
            return st.snapshot_figures()
        return None

    def flush_to_nas(self, row, deadline: float) -> bool:
        """Merge the temp writes back into the iSCSI disk (the copy never completed).

        Returns True when done; False when the deadline came first (the merge
        goes on in the kernel and a later unmap finds it further along).
        """
        dm = self.drivers.dm
        status = dm.status(dm_name(row.zvol))
        if status and status[0].target_type == "snapshot":
            cow = self.drivers.zfs.device_path(row.remotepool, temp_name(row.zvol))
            self._reload(row.zvol, snapshot_merge_table(row.devsize, row.bdev, cow))
            log.info("zvol %s: merging the VM's writes back into the NAS disk", row.zvol)
        while True:
            if merged(self.merge_figures(row.zvol)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    # -- monitor ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="merge-monitor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)
        self._switches.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(MERGE_POLL)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception:
                log.exception("merge monitor tick failed")

    def tick(self) -> None:
        """Switch every zvol whose merge is done to its local copy; returns when all did.

        A switch waits on the kernel (a table reload, destroying the temp
        zvol, an iSCSI logout: about a second on a real host), so the zvols
        of a boot storm, merged at about the same time, are switched side by
        side rather than one after another; each under its own lock.
        """
        done = []
        for row in self.svc.rows(State.MERGING):
            try:
                if merged(self.merge_figures(row.zvol)):   # a look only: decided under the lock
                    done.append(row.zvol)
            except ImgStorageError as exc:
                log.debug("zvol %s: no merge figures yet: %s", row.zvol, exc)
        wait([self._switches.submit(self._switch, zvol) for zvol in done])
        self.svc.rebuilder.retry_due()

    def _switch(self, zvol: str) -> None:
        try:
            with self.svc.zvol_lock(zvol, raise_busy=False) as got:
                if not got:
                    return
                row = self.svc.row(zvol)
                if row is None or row.state != State.MERGING.value:
                    return
                try:
                    if not merged(self.merge_figures(row.zvol)):
                        return
                    # recorded before the switch: a crash from here on only has to finish it
                    self.svc.store.transition(row.zvol, Event.MERGED)
                    self.finish_switch(row)
                    self.svc.store.transition(row.zvol, Event.SWITCHED)
                    self.report_merged(row)
                except ImgStorageError as exc:
                    log.error("zvol %s: finishing the merge failed: %s", row.zvol, exc)
                    self.svc.update(row.zvol, last_error=str(exc)[:1000])
                    self.nas(row).zvol_synced(row.zvol, ok=False, error=str(exc))
        except Exception:   # one zvol's bug must not end the monitor or the other switches
            log.exception("zvol %s: switching to the local copy failed", zvol)


__all__ = ["ContainerSync", "dm_name", "temp_name", "merged", "DriverError"]
