"""Copies a container keeps after its VM stopped (``img_keep_local``): keep, reuse, drop.

A kept copy is never the authority: the NAS received every byte of it (the
final pull) before it asked us to keep it, and the NAS's zvol may change
afterwards (the VM runs elsewhere, or on the NAS itself).  What the copy is
good for is being the base of an incremental stream: it holds one snapshot,
which the NAS holds too under the same name and guid, and the next sync map
from that NAS receives only what changed since.  Before that stream the copy
is rolled back to the shared snapshot; if anything does not match (the
snapshot is gone on either side, the guids differ) the copy is destroyed and
an ordinary full copy follows.

Kept copies take space: a new local copy that does not fit in the pool
destroys kept copies, oldest first, until it does.  Each destroyed copy is
reported to its NAS (``kept_dropped``), which lets go of its own hold.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional

from .. import naming, syncsnaps
from ..errors import DriverError, ImgStorageError, StateError
from .models import VmZvol
from .states import Event, State

log = logging.getLogger(__name__)


class KeptCopies:
    """The kept-copy half of the VM-container service (its store, drivers and locks)."""

    def __init__(self, service):
        self.svc = service
        self.zfs = service.drivers.zfs

    # -- keeping ------------------------------------------------------------------
    def keep(self, row: VmZvol, snap: str) -> bool:
        """The NAS has every byte and asks to keep the copy as of ``snap``; True if kept.

        Only a copy whose newest snapshot of ours is ``snap`` is kept: the
        device is gone, so nothing was written after the final pull took it.
        """
        pool, zvol = row.remotepool, row.zvol
        if not pool or self.zfs.get_zvol(pool, zvol) is None:
            return False
        ours = syncsnaps.ours(self.zfs, pool, zvol)
        if not ours or ours[-1] != snap:
            log.warning("zvol %s: not keeping the copy: its newest snapshot is %s, not %s", zvol,
                        ours[-1] if ours else "none", snap)
            return False
        syncsnaps.keep_only(self.zfs, pool, zvol, snap)
        self.svc.store.transition(zvol, Event.KEEP, kept_snapshot=snap, kept_since=time.time(),
                                  iscsi_target=None, bdev=None, chap_user=None,
                                  chap_secret=None, merge_started=None, merge_from=None,
                                  last_error=None)
        log.info("zvol %s: the NAS has it; the copy is kept as of %s for the next start here",
                 zvol, snap)
        return True

    # -- using it again -----------------------------------------------------------
    def unusable(self, row: VmZvol, sync: bool, pool: Optional[str], nas_node: Optional[str],
                 volsize: Optional[int]) -> Optional[str]:
        """Why the kept copy cannot be the local copy of this map (None: it can)."""
        if not sync:
            return "the zvol is mapped in direct iSCSI mode"
        if row.nas_node != nas_node:
            return f"it was kept for {row.nas_node}, and {nas_node} maps the zvol now"
        if row.remotepool != pool:
            return f"it is in pool {row.remotepool}, and the map asks for {pool}"
        info = self.zfs.get_zvol(pool, row.zvol)
        if info is None:
            return f"{pool}/{row.zvol} is gone"
        if volsize and info.volsize != volsize:
            return f"it has {info.volsize} bytes, and the zvol {volsize}"
        if row.kept_snapshot not in self.zfs.list_snapshots(pool, row.zvol):
            return f"its snapshot {row.kept_snapshot} is gone"
        return None

    def base(self, row: VmZvol) -> Dict:
        """The shared snapshot the NAS may send from, for ``recv_zvol``'s answer."""
        if not row.kept_snapshot:
            return {}
        try:
            guid: Optional[int] = self.zfs.snapshot_guid(row.remotepool, row.zvol,
                                                         row.kept_snapshot)
        except ImgStorageError:
            guid = None                 # the NAS then sees that nothing matches
        return {"base": row.kept_snapshot, "base_guid": guid}

    def prepare_base(self, row: VmZvol, base: str, guid: Optional[int]) -> None:
        """Before the NAS sends what changed since ``base``: the copy is ``base`` again.

        Anything that does not match destroys the kept copy (an empty local
        zvol takes its place) and fails, so the NAS's next attempt is a full
        copy.
        """
        pool, zvol = row.remotepool, row.zvol
        mismatch = None
        if row.kept_snapshot != base:
            mismatch = f"the NAS names {base}, the copy is kept as of {row.kept_snapshot}"
        else:
            try:
                here = self.zfs.snapshot_guid(pool, zvol, base)
            except ImgStorageError as exc:
                mismatch = f"its snapshot {base} cannot be read ({exc})"
            else:
                if guid is None or here != guid:
                    mismatch = f"snapshot {base} has guid {here} here and {guid} on the NAS"
        if mismatch is None:
            try:
                self.zfs.abort_resume(pool, zvol)       # a stream the NAS gave up on
                self.zfs.rollback(pool, zvol, base, recursive=True)
            except ImgStorageError as exc:
                mismatch = f"rolling it back to {base} failed ({exc})"
        if mismatch is not None:
            self.forget_base(row, mismatch)
            raise StateError(f"the copy of {zvol} kept on {self.svc.config.name} does not match "
                             f"the NAS's ({mismatch}); it was destroyed and a full copy follows")
        log.info("zvol %s: the kept copy is back at %s; the NAS sends what changed since",
                 zvol, base)

    def forget_base(self, row: VmZvol, why: str) -> None:
        """The kept copy cannot be a base: an empty local zvol of its size, for a full copy.

        Runs while the VM reads the NAS's disk (``snapshot``): the local zvol
        is nobody's device yet, so replacing it loses nothing.
        """
        pool, zvol = row.remotepool, row.zvol
        info = self.zfs.get_zvol(pool, zvol)
        snaps = self.zfs.list_snapshots(pool, zvol) if info is not None else []
        if info is not None and not snaps and not row.kept_snapshot:
            self.zfs.abort_resume(pool, zvol)
            return                                      # already a fresh zvol
        volsize = info.volsize if info is not None else (row.devsize or 0) * naming.SECTOR
        if info is not None:
            syncsnaps.let_go(self.zfs, pool, zvol)
            self.zfs.destroy(pool, zvol, recursive=True)
        else:
            self.zfs.abort_resume(pool, zvol)
        self.make_room(pool, volsize, zvol)
        self.zfs.create_zvol(pool, zvol, volsize)
        self.svc.update(zvol, kept_snapshot=None, kept_since=None)
        log.warning("zvol %s: the kept copy cannot be the base of the NAS's stream (%s); "
                    "destroyed, a full copy follows", zvol, why)

    def back_to_base(self, row: VmZvol) -> bool:
        """An unmap before the NAS's changes arrived: the copy as it was kept; True if so.

        Every write of the VM went home through iSCSI (the flush), so the
        copy is still the NAS's shared snapshot once rolled back to it.
        """
        pool, zvol, snap = row.remotepool, row.zvol, row.kept_snapshot
        try:
            self.zfs.abort_resume(pool, zvol)
            if not snap or snap not in self.zfs.list_snapshots(pool, zvol):
                return False
            self.zfs.rollback(pool, zvol, snap, recursive=True)
            syncsnaps.keep_only(self.zfs, pool, zvol, snap)
        except ImgStorageError as exc:
            log.warning("zvol %s: the kept copy cannot go back to %s (%s); destroying it",
                        zvol, snap, exc)
            return False
        return True

    # -- letting go ---------------------------------------------------------------
    def drop(self, row: VmZvol, why: str) -> None:
        """Destroy a kept copy (the NAS has all of it) and tell its NAS."""
        pool, zvol = row.remotepool, row.zvol
        if pool and self.zfs.get_zvol(pool, zvol) is not None:
            syncsnaps.let_go(self.zfs, pool, zvol)
            self.zfs.destroy(pool, zvol, recursive=True)
        self.svc.store.transition(zvol, Event.DROPPED)
        log.warning("zvol %s: destroyed the copy kept here for %.0f s: %s", zvol,
                    time.time() - (row.kept_since or time.time()), why)
        self.tell_nas(row)

    def tell_nas(self, row: VmZvol) -> None:
        """The NAS holds its snapshot for our copy; it may let go now."""
        if row.nas_node and row.kept_snapshot:
            self.svc.sync.nas(row).kept_dropped(row.zvol, host=self.svc.config.name,
                                                snapshot=row.kept_snapshot)

    def make_room(self, pool: str, needed: int, for_zvol: str) -> None:
        """Destroy kept copies in ``pool``, oldest first, until ``needed`` bytes fit.

        A copy another request holds is passed over; if the space cannot be
        found, creating the zvol fails as it did before.
        """
        try:
            if self.zfs.pool_available(pool) >= needed:
                return
        except DriverError as exc:
            log.warning("cannot tell the free space of pool %s (%s); no kept copy is "
                        "destroyed for %s", pool, exc, for_zvol)
            return
        kept = sorted((r for r in self.svc.rows(State.KEPT)
                       if r.remotepool == pool and r.zvol != for_zvol),
                      key=lambda r: (r.kept_since or 0.0, r.zvol))
        for candidate in kept:
            with self.svc.zvol_lock(candidate.zvol, raise_busy=False) as got:
                if not got:
                    continue
                row = self.svc.row(candidate.zvol)
                if row is None or row.state != State.KEPT.value:
                    continue
                self.drop(row, f"pool {pool} needs {needed} bytes for {for_zvol} (oldest "
                               "kept copy first)")
            if self.zfs.pool_available(pool) >= needed:
                return

    # -- restart ------------------------------------------------------------------
    def recover(self, row: VmZvol) -> None:
        """At start: a kept row whose zvol or snapshot went (someone destroyed it) goes."""
        pool, zvol = row.remotepool, row.zvol
        if not pool or self.zfs.get_zvol(pool, zvol) is None:
            why = f"{pool}/{zvol} is gone"
        elif row.kept_snapshot not in self.zfs.list_snapshots(pool, zvol):
            why = f"its snapshot {row.kept_snapshot} is gone"
        else:
            return
        self.drop(row, why)

    # -- listing ------------------------------------------------------------------
    def listing(self, row: VmZvol) -> Dict:
        """What ``list_dev`` shows of a kept copy: its status, size and age."""
        info = self.zfs.get_zvol(row.remotepool, row.zvol) if row.remotepool else None
        return {"status": State.KEPT.value, "sync": "sync", "time": row.kept_since,
                "size": info.volsize // naming.GIB if info else None,
                "snapshot": row.kept_snapshot}


__all__ = ["KeptCopies"]
