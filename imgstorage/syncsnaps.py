"""The snapshots sync mode keeps, on the NAS and on the container alike.

Each successful transfer leaves one snapshot on both sides that the next
incremental stream builds on (the *base*).  Losing it on either side would
force a full copy, so it carries a hold (``zfs hold imgstorage``): neither an
operator's stray ``zfs destroy`` nor our own trimming can take it.  The hold
moves to the new base once the next transfer has arrived.  Older snapshots
of ours are trimmed to the newest few; a held one (by us or anyone) and
nobody else's are ever touched.

A container that keeps its copy after the VM stopped (``img_keep_local``)
keeps one snapshot of it, the one the final pull delivered; the NAS holds its
own snapshot of that name with a second tag (``KEPT_TAG``), so that the next
start on that container can send only what changed since, even when the VM
ran elsewhere in between and the sync's own holds moved on.
"""
from __future__ import annotations

import calendar
import logging
import secrets
import time
from typing import Iterable, List, Optional

from .drivers.base import HOLD_TAG, KEPT_TAG, ZfsDriver
from .errors import ImgStorageError

log = logging.getLogger(__name__)

SNAP_PREFIX = "IMG-STORAGE-"
KEEP_SNAPSHOTS = 3


def new_snapshot_name() -> str:
    """Sortable by name as well as by creation: time first, then randomness."""
    return f"{SNAP_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def taken_at(name: str) -> Optional[float]:
    """When one of our snapshots was named (epoch seconds, rounded down), None for another's.

    The name is chosen just before the snapshot is taken, so everything
    written before this time is in the snapshot: a recovery point may be
    stated from it without overstating what is safe.
    """
    if not name.startswith(SNAP_PREFIX):
        return None
    try:
        return float(calendar.timegm(time.strptime(name[len(SNAP_PREFIX):][:15],
                                                   "%Y%m%dT%H%M%S")))
    except ValueError:
        return None


def ours(zfs: ZfsDriver, pool: str, zvol: str) -> List[str]:
    """Our snapshots of ``pool/zvol``, oldest first."""
    return [s for s in zfs.list_snapshots(pool, zvol) if s.startswith(SNAP_PREFIX)]


def hold_only(zfs: ZfsDriver, pool: str, zvol: str, keep: Iterable[str]) -> None:
    """Hold the snapshots in ``keep`` and release our hold on every other one."""
    keep = set(keep)
    for snap in ours(zfs, pool, zvol):
        if snap in keep:
            zfs.hold(pool, zvol, snap, HOLD_TAG)
        else:
            zfs.release(pool, zvol, snap, HOLD_TAG)


def trim(zfs: ZfsDriver, pool: str, zvol: str, keep: Iterable[str],
         count: int = KEEP_SNAPSHOTS) -> None:
    """Destroy our snapshots beyond the newest ``count``, except ``keep`` and held ones.

    Any hold counts, not only ours: a kept copy's base carries ``KEPT_TAG``,
    and an administrator's hold means the same as ours.
    """
    keep = set(keep)
    for snap in ours(zfs, pool, zvol)[:-count] if count > 0 else ours(zfs, pool, zvol):
        if snap in keep or zfs.holds(pool, zvol, snap):
            continue
        try:
            zfs.destroy_snapshot(pool, zvol, snap)
        except ImgStorageError as exc:
            log.warning("could not destroy old snapshot %s/%s@%s: %s", pool, zvol, snap, exc)


def settle(zfs: ZfsDriver, pool: str, zvol: str, base: str) -> None:
    """After a transfer arrived: ``base`` is the one to build on; hold it, trim the rest."""
    hold_only(zfs, pool, zvol, {base})
    trim(zfs, pool, zvol, {base})


def let_go(zfs: ZfsDriver, pool: str, zvol: str) -> None:
    """Before an intended destroy of ``pool/zvol``: our holds and any partial receive go.

    A held snapshot makes ``zfs destroy -r`` fail, which is the point of the
    hold, so only a path that means to destroy the whole zvol calls this.
    """
    zfs.abort_resume(pool, zvol)
    if zfs.get_zvol(pool, zvol) is None:
        return
    for snap in ours(zfs, pool, zvol):
        for tag in (HOLD_TAG, KEPT_TAG):
            zfs.release(pool, zvol, snap, tag)


def keep_only(zfs: ZfsDriver, pool: str, zvol: str, snap: str) -> None:
    """A copy kept after the VM stopped needs one snapshot, its base: hold it, drop ours
    that are not held (the rest only take space until the copy is used again)."""
    hold_only(zfs, pool, zvol, {snap})
    trim(zfs, pool, zvol, {snap}, count=0)
