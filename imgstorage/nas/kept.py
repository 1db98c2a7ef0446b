"""The NAS's side of copies its containers keep after a VM stopped (``img_keep_local``).

After the final pull the NAS's newest snapshot and the container's copy are
the same bytes, under the same name and guid.  With ``img_keep_local`` the
NAS records that the container keeps its copy (``nas_kept_copies``), holds
that snapshot (tag ``imgstorage-kept``: the sync's own holds move with every
transfer, this one stays) and asks the container to keep the copy instead of
destroying it.  The next sync map to that container then sends only what
changed since that snapshot, even when the VM ran elsewhere in between.

The NAS's zvol stays the authority throughout: the kept copy is only a base,
used after its snapshot's name and guid were checked on both sides, and
replaced by a full copy whenever they do not match.  A record goes when the
copy became the container's live copy again, when the container reports it
destroyed (``kept_dropped``), when the zvol is mapped to that container
without it, and with the zvol (``rocks remove host storageimg`` asks each
container to destroy its kept copy first).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

from .. import naming
from ..drivers.base import KEPT_TAG
from ..errors import ImgStorageError
from ..syncsnaps import SNAP_PREFIX

log = logging.getLogger(__name__)

REMOVE_TIMEOUT = 10.0       # seconds a removal of the zvol waits for each container

Base = Tuple[str, int]      # the shared snapshot and its guid


class KeptCopies:
    def __init__(self, service):
        self.svc = service
        self.store = service.store
        self.zfs = service.drivers.zfs

    # -- records and holds --------------------------------------------------------
    def record(self, row, snapshot: str) -> None:
        """``row``'s container is about to keep its copy as of ``snapshot``: hold it here.

        Recorded before the container is asked, so a NAS that dies in
        between still holds the snapshot the container may be keeping.
        """
        self.zfs.hold(row.zpool, row.zvol, snapshot, KEPT_TAG)
        old = self.store.keep(row.zvol, row.remotehost, snapshot)
        if old is not None and old.snapshot != snapshot:
            self._release(row.zpool, row.zvol, old.snapshot)

    def forget(self, zvol: str, host: str, snapshot: Optional[str] = None) -> None:
        """``host`` no longer keeps ``zvol`` (as of ``snapshot``, if given): let go here."""
        gone = self.store.forget_kept(zvol, host, snapshot)
        if gone is None:
            return
        row = self.store.get(zvol)
        if row is not None:
            self._release(row.zpool, zvol, gone.snapshot)
        log.info("zvol %s: %s no longer keeps a copy as of %s", zvol, host, gone.snapshot)

    def _release(self, pool: str, zvol: str, snapshot: str) -> None:
        """Release the hold unless another container's copy is of the same snapshot."""
        if any(k.snapshot == snapshot for k in self.store.kept(zvol)):
            return
        try:
            self.zfs.release(pool, zvol, snapshot, KEPT_TAG)
        except ImgStorageError as exc:           # the snapshot or the zvol is gone
            log.info("zvol %s: no hold to release on %s (%s)", zvol, snapshot, exc)

    # -- the next start on that container -----------------------------------------
    def base_for(self, row, there: Dict, container) -> Optional[Base]:
        """The snapshot an upload to ``row``'s container may send from, or None (full copy).

        ``there`` is the container's answer to ``recv_zvol``: the ``base`` its
        kept copy is, with its ``base_guid``.  A base that does not match
        ours is given up on both sides before the full copy.
        """
        base, guid = there.get("base"), there.get("base_guid")
        if base is None:
            self.forget(row.zvol, row.remotehost)      # nothing kept there (any more)
            return None
        why = self._mismatch(row, base, guid)
        if why is None:
            return base, guid
        log.warning("zvol %s: the copy kept on %s cannot be the base of the copy (%s); a full "
                    "copy follows", row.zvol, row.remotehost, why)
        container.recv_zvol(row.zvol, fresh=True)
        self.forget(row.zvol, row.remotehost)
        return None

    def _mismatch(self, row, base, guid) -> Optional[str]:
        """What keeps the container's ``base`` from being the base of our stream."""
        try:
            naming.zvol_name(base)
        except (ImgStorageError, TypeError):
            return "it names no valid snapshot"
        if not base.startswith(SNAP_PREFIX):
            return f"{base} is not a snapshot of ours"
        if isinstance(guid, bool) or not isinstance(guid, int):
            return f"it gave no guid for {base}"
        if base not in self.zfs.list_snapshots(row.zpool, row.zvol):
            return f"snapshot {base} is gone here"
        mine = self.zfs.snapshot_guid(row.zpool, row.zvol, base)
        if mine != guid:
            return f"snapshot {base} has guid {mine} here and {guid} there"
        return None

    def handed_over(self, row) -> None:
        """The upload arrived: the container's copy is live again, nothing is kept there."""
        self.forget(row.zvol, row.remotehost)

    # -- removing the zvol --------------------------------------------------------
    def remove_all(self, zvol: str) -> None:
        """Before the zvol is destroyed: every container destroys its kept copy.

        A container that cannot be asked keeps a copy that no map can use
        (no snapshot of the zvol will match it); it goes when its pool needs
        the room or an administrator cleans it.
        """
        for kept in self.store.kept(zvol):
            try:
                self.svc.container(kept.host).del_local(zvol, timeout=REMOVE_TIMEOUT)
                log.info("zvol %s: %s destroyed the copy it kept", zvol, kept.host)
            except ImgStorageError as exc:
                log.warning("zvol %s: could not ask %s to destroy the copy it kept (%s); it "
                            "can no longer be used and goes when %s needs the room", zvol,
                            kept.host, exc, kept.host)
            self.forget(zvol, kept.host)

    # -- restart ------------------------------------------------------------------
    def recover(self) -> None:
        """At start: records whose snapshot is gone go; the others are held (again)."""
        for kept in self.store.kept():
            row = self.store.get(kept.zvol)
            try:
                present = row is not None and kept.snapshot in self.zfs.list_snapshots(
                    row.zpool, kept.zvol)
                if present:
                    self.zfs.hold(row.zpool, kept.zvol, kept.snapshot, KEPT_TAG)
                    continue
            except ImgStorageError as exc:
                log.warning("zvol %s: cannot check the snapshot %s kept on %s: %s", kept.zvol,
                            kept.snapshot, kept.host, exc)
                continue
            log.warning("zvol %s: snapshot %s that %s keeps a copy as of is gone; the next "
                        "start there is a full copy", kept.zvol, kept.snapshot, kept.host)
            self.store.forget_kept(kept.zvol, kept.host)


__all__ = ["KeptCopies", "REMOVE_TIMEOUT"]
