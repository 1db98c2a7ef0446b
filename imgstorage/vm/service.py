"""What a VM container does for its NAS: attach disks, hold local copies, let go.

Direct iSCSI: ``attaching`` (recorded before discovery and login) ->
``attached`` -> removed on unmap.  Sync mode adds the local copy and the dm
device in front of it (see vm/sync.py and the row states in vm/models.py).
A failed attach undoes itself, so the NAS's rollback never leaves a session
or a half-built device behind.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .. import naming, syncsnaps
from ..config import Config
from ..drivers import NodeDrivers
from ..drivers.base import ChapCredentials, SessionInfo
from ..errors import BusyError, DriverError, ImgStorageError, NotFoundError, StateError
from .models import VmZvol
from .sync import ContainerSync, dm_name, merged, temp_name

log = logging.getLogger(__name__)

DEVICE_WAIT = 20.0        # seconds for the kernel to attach a logged-in disk
POLL = 0.1


def wait_for(condition: Callable[[], object], timeout: float, interval: float = POLL):
    """Poll ``condition`` until it returns something true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class VmService:
    def __init__(self, config: Config, engine: Engine, drivers: NodeDrivers,
                 notify: Optional[Callable[[str, Dict], None]] = None):
        self.config = config
        self.engine = engine
        self.drivers = drivers
        self.notify = notify or (lambda node, message: None)
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.sync = ContainerSync(self)

    # -- rows ---------------------------------------------------------------
    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def row(self, zvol: str) -> Optional[VmZvol]:
        with self._session() as s:
            return s.get(VmZvol, zvol)

    def rows(self, state: Optional[str] = None) -> List[VmZvol]:
        with self._session() as s:
            q = select(VmZvol).order_by(VmZvol.zvol)
            if state:
                q = q.where(VmZvol.state == state)
            return list(s.scalars(q))

    def update(self, zvol: str, **fields) -> None:
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                for k, v in fields.items():
                    setattr(row, k, v)

    def set_state(self, zvol: str, state: str, **fields) -> None:
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            old = row.state
            row.state = state
            for k, v in fields.items():
                setattr(row, k, v)
            log.info("zvol %s: %s -> %s (%.1fs in %s)", zvol, old, state,
                     time.time() - row.state_since, old)
            row.state_since = time.time()

    def _forget(self, zvol: str) -> None:
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                s.delete(row)

    @contextmanager
    def zvol_lock(self, zvol: str, raise_busy: bool = True, wait: float = 0.0) -> Iterator[bool]:
        """One operation per zvol at a time, requests and the merge monitor alike.

        Waits at most ``wait`` seconds.  A request then finds the zvol busy
        (BusyError); the monitor, which never waits, is told ``False`` and
        looks again at its next tick.  Requests wait a little because the
        monitor holds a zvol for a moment when it finishes a merge, and an
        operator's unmap arriving in that moment must not be refused.
        """
        with self._locks_guard:
            lock = self._locks.setdefault(zvol, threading.Lock())
        got = lock.acquire(timeout=max(0.0, wait))
        if not got and raise_busy:
            raise BusyError(f"ZVol {zvol} is busy")
        try:
            yield got
        finally:
            if got:
                lock.release()

    # -- iSCSI --------------------------------------------------------------
    def initiator_name(self) -> str:
        return self.drivers.initiator.initiator_name()

    def _session_for(self, target: str) -> Optional[SessionInfo]:
        for s in self.drivers.initiator.sessions():
            if s.iqn == target:
                return s
        return None

    def _attach(self, target: str, nas: str, chap: Optional[ChapCredentials],
                timeout: float) -> str:
        """Discover, log in, wait for the disk: all within ``timeout``, the map's budget.

        The NAS stops waiting at the end of that budget and rolls its side
        back; an attach that went on past it would leave a session to a
        target that is gone.  The caller's undo cleans up after a failure.
        """
        deadline = time.monotonic() + timeout

        def left(step: str) -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(f"gave up attaching {target} before the {step}: the map's "
                                  f"{timeout:.1f} s ran out")
            return remaining

        found = [t.iqn for t in self.drivers.initiator.discover(nas, timeout=left("discovery"))]
        if target not in found:
            raise DriverError(f"Could not find iSCSI target {target} on NAS {nas}")
        self.drivers.initiator.login(target, nas, chap, timeout=left("login"))
        session = wait_for(lambda: (lambda s: s if s and s.device else None)(
            self._session_for(target)), min(DEVICE_WAIT, left("disk")))
        if not session:
            raise DriverError(f"Not found {target} in targets: the disk did not appear")
        return f"/dev/{session.device}"

    def _logout(self, target: Optional[str], nas: Optional[str]) -> None:
        if target and self._session_for(target):
            self.drivers.initiator.logout(target, nas)

    # -- map ----------------------------------------------------------------
    def map_zvol(self, zvol: str, target: str, nas: str, sync: bool,
                 remotepool: Optional[str], chap: Optional[ChapCredentials],
                 timeout: float, volsize: Optional[int] = None,
                 nas_node: Optional[str] = None) -> str:
        pool = remotepool or self.config.default_pool
        if sync and not pool:
            raise StateError(f"sync mode needs a local zpool on {self.config.name}: set "
                             "vm_container_zpool (remotepool) or default_pool")
        existing = self.row(zvol)
        if existing is not None:
            if existing.iscsi_target == target and existing.state in ("attached", "snapshot",
                                                                       "merging", "local"):
                return f"/dev/mapper/{dm_name(zvol)}" if existing.sync else existing.bdev
            raise StateError(f"zvol {zvol} is already {existing.state} on {self.config.name}")
        with self._session() as s, s.begin():
            s.add(VmZvol(zvol=zvol, nas=nas, iscsi_target=target, remotepool=pool if sync else None,
                         sync=sync, state="attaching", state_since=time.time(),
                         nas_node=nas_node or nas.split(".", 1)[0]))
        started = time.monotonic()
        prepared = False
        try:
            if sync:
                self.sync.prepare(zvol, pool, volsize or 0)
                prepared = True
            bdev = self._attach(target, nas, chap, timeout - (time.monotonic() - started))
            if sync:
                devsize = self.sync.create_snapshot_device(zvol, pool, bdev)
                self.set_state(zvol, "snapshot", bdev=bdev, devsize=devsize)
                result = f"/dev/mapper/{dm_name(zvol)}"
            else:
                self.set_state(zvol, "attached", bdev=bdev)
                result = bdev
        except Exception:
            self._undo_attach(zvol, target, nas, pool if prepared else None)
            raise
        log.info("attached %s from %s as %s in %.2fs", zvol, nas, result, time.monotonic() - started)
        return result

    def _undo_attach(self, zvol: str, target: str, nas: str, pool: Optional[str]) -> None:
        try:
            if pool:
                self.sync.discard(zvol, pool)
            self._logout(target, nas)
        except ImgStorageError as exc:
            log.error("could not undo the failed attach of %s: %s", zvol, exc)
        self._forget(zvol)

    # -- unmap --------------------------------------------------------------
    def unmap_zvol(self, zvol: str, target: Optional[str], timeout: float) -> Dict:
        """Let the disk go; ``{"local": True}`` when the NAS must pull our copy first."""
        deadline = time.monotonic() + timeout
        row = self.row(zvol)
        if row is None:
            self._logout(target, None)
            return {"local": False}
        if row.state == "detached_local":
            return {"local": True}
        device = f"/dev/mapper/{dm_name(zvol)}" if row.sync else row.bdev
        if row.state not in ("flushing",) and device and self.drivers.blockdev.in_use(device):
            free = wait_for(lambda: not self.drivers.blockdev.in_use(device),
                            max(0.0, deadline - time.monotonic()), interval=0.25)
            if not free:
                raise StateError(f"device {device} of zvol {zvol} is still in use on "
                                 f"{self.config.name}; stop the VM first")
        if not row.sync:
            self.set_state(zvol, "detaching")
            self._logout(target or row.iscsi_target, row.nas)
            self._forget(zvol)
            log.info("detached %s", zvol)
            return {"local": False}
        if row.state == "merging":
            # The local merge is fast: let it finish, then hand over the local copy.
            wait_for(lambda: merged(self.sync.merge_figures(zvol)),
                     max(0.0, deadline - time.monotonic()), interval=0.1)
            if not merged(self.sync.merge_figures(zvol)):
                raise StateError(f"zvol {zvol} is still merging on {self.config.name}; retry")
            self.sync.finish_merge(row)
            self.set_state(zvol, "local")
            row = self.row(zvol)
        if row.state == "local":
            self.drivers.dm.remove(dm_name(zvol))
            self.set_state(zvol, "detached_local")
            return {"local": True}
        if row.state in ("snapshot", "flushing"):
            if row.state == "snapshot":
                self.set_state(zvol, "flushing")
            if not self.sync.flush_to_nas(row, deadline):
                raise StateError(f"zvol {zvol}: still writing the VM's changes back to the NAS "
                                 "disk; retry the unmap")
            self.drivers.dm.remove(dm_name(zvol))
            self._logout(row.iscsi_target, row.nas)
            self.sync.discard(zvol, row.remotepool)
            self._forget(zvol)
            log.info("detached %s; the VM's writes went home through iSCSI", zvol)
            return {"local": False}
        raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}; it cannot be unmapped")

    # -- clean --------------------------------------------------------------
    def clean_zvol(self, zvol: str, target: Optional[str]) -> Dict:
        """Tear down whatever this host has of ``zvol``: session, dm device, local copies.

        The operator asked for it after being warned: a local copy that was
        not synced home is destroyed too.
        """
        row = self.row(zvol)
        done = []
        target = target or (row.iscsi_target if row else None)
        if self.drivers.dm.exists(dm_name(zvol)):
            self.drivers.dm.remove(dm_name(zvol))
            done.append(f"removed /dev/mapper/{dm_name(zvol)}")
        if target and self._session_for(target):
            self._logout(target, row.nas if row else None)
            done.append(f"logged out of {target}")
        pools = {row.remotepool} if row and row.remotepool else set()
        pools |= {z.pool for z in self.drivers.zfs.list_zvols()
                  if z.zvol in (zvol, temp_name(zvol))}
        for pool in sorted(pools):
            for name in (temp_name(zvol), zvol):
                if self.drivers.zfs.get_zvol(pool, name) is not None:
                    syncsnaps.let_go(self.drivers.zfs, pool, name)
                    self.drivers.zfs.destroy(pool, name, recursive=True)
                    done.append(f"destroyed {pool}/{name}")
        self._forget(zvol)
        log.warning("zvol %s cleaned on %s: %s", zvol, self.config.name, "; ".join(done) or
                    "nothing was left")
        return {"done": done}

    # -- restart ------------------------------------------------------------
    def recover(self) -> None:
        """Roll back attaches and finish detaches that a previous run left half done.

        Merges need nothing: the kernel kept merging and the monitor finds
        them; ``flushing`` and ``detached_local`` wait for the NAS to ask again.
        """
        for row in self.rows():
            try:
                if row.state == "attaching":
                    log.warning("zvol %s was being attached when the daemon stopped: undoing",
                                row.zvol)
                    self._undo_attach(row.zvol, row.iscsi_target, row.nas,
                                      row.remotepool if row.sync else None)
                elif row.state == "detaching":
                    self._logout(row.iscsi_target, row.nas)
                    self._forget(row.zvol)
            except ImgStorageError as exc:
                log.error("could not recover zvol %s (%s): %s", row.zvol, row.state, exc)

    # -- sync steps asked for by the NAS ------------------------------------
    def require(self, zvol: str, *states: str) -> VmZvol:
        row = self.row(zvol)
        if row is None:
            raise NotFoundError(f"zvol {zvol} is not attached to {self.config.name}")
        if states and row.state not in states:
            raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}")
        return row

    def receive_state(self, zvol: str) -> Dict:
        """Where the NAS->VM copy of ``zvol`` stands here, for a NAS that lost track of it.

        A NAS killed after the stream arrived, or before it heard the answer to
        sync_zvol, learns from this that the copy is complete (its snapshot is
        here) or already merging, instead of sending it all again over a zvol
        that now has snapshots.
        """
        row = self.require(zvol)
        zfs = self.drivers.zfs
        snaps = [] if zfs.get_zvol(row.remotepool, zvol) is None else [
            s for s in zfs.list_snapshots(row.remotepool, zvol)
            if s.startswith(syncsnaps.SNAP_PREFIX)]
        return {"zvol": zvol, "state": row.state, "snapshots": snaps,
                "resume_token": zfs.resume_token(row.remotepool, zvol)}

    def start_merge(self, zvol: str, snap: Optional[str] = None) -> None:
        """The copy arrived: merge the VM's writes into it.

        ``snap`` is the NAS snapshot the copy is; it is the base of the first
        pull, so it is held here from now on.
        """
        row = self.require(zvol, "snapshot", "merging")
        if snap:
            syncsnaps.hold_only(self.drivers.zfs, row.remotepool, zvol, {snap})
        if row.state == "merging":
            return
        figures = self.sync.merge_figures(zvol)
        self.sync.start_merge(row)
        self.set_state(zvol, "merging", merge_started=time.time(),
                       merge_from=figures[0] if figures else None)
        self.sync.wake()

    def snapshot_for_pull(self, zvol: str, snap: str, base: Optional[str]) -> int:
        """Snapshot the local copy for a pull; the stream's estimated size.

        The new snapshot is held at once (a cut pull resumes from it) and so
        is the base until the NAS asks for a stream built on something newer.
        """
        row = self.require(zvol, "local", "detached_local")
        zfs = self.drivers.zfs
        snaps = zfs.list_snapshots(row.remotepool, zvol)
        if base is not None and base not in snaps:
            raise NotFoundError(f"snapshot {base} of {zvol} is not on {self.config.name}")
        if snap not in snaps:
            zfs.snapshot(row.remotepool, zvol, snap)
        keep = {s for s in (snap, base) if s}
        syncsnaps.hold_only(zfs, row.remotepool, zvol, keep)
        syncsnaps.trim(zfs, row.remotepool, zvol, keep)
        return zfs.send_size(row.remotepool, zvol, snap, base)

    def del_local(self, zvol: str) -> None:
        """The NAS has our copy: destroy it."""
        row = self.row(zvol)
        if row is None:
            return
        if row.state != "detached_local":
            raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}; its copy is "
                             "still in use")
        if self.drivers.zfs.get_zvol(row.remotepool, zvol) is not None:
            syncsnaps.let_go(self.drivers.zfs, row.remotepool, zvol)
            self.drivers.zfs.destroy(row.remotepool, zvol, recursive=True)
        self._forget(zvol)
        log.info("destroyed the local copy of %s: the NAS has it", zvol)

    # -- listing ------------------------------------------------------------
    def list_dev(self) -> Dict[str, Dict]:
        rows = {r.zvol: r for r in self.rows()}
        sessions = {x.iqn: x for x in self.drivers.initiator.sessions()}
        dm = {d.name: d for d in self.drivers.dm.status()}
        body: Dict[str, Dict] = {}
        for zvol, row in sorted(rows.items()):
            sess = sessions.get(row.iscsi_target or "")
            size = None
            if row.bdev and not row.sync:
                try:
                    size = self.drivers.blockdev.size_bytes(row.bdev) // naming.GIB
                except ImgStorageError:
                    size = None
            entry = {"zvol": zvol, "device": None, "status": "iscsi", "size": size,
                     "bdev": sess.device if sess else None, "target": row.iscsi_target,
                     "nas": row.nas, "started": None, "synced": None, "synced_percent": None,
                     "time": None, "sync": "sync" if row.sync else "iscsi", "state": row.state}
            snap = dm.get(dm_name(zvol))
            if snap is not None:
                figures = snap.snapshot_figures()
                entry.update(device=snap.name, status=snap.target_type,
                             size=snap.length * naming.SECTOR // naming.GIB,
                             synced=snap.args if figures else None)
                if figures and row.state == "merging":
                    entry["started"] = True
                    entry["time"] = row.merge_started
                    entry["synced_percent"] = _merge_percent(figures, row)
            body[zvol] = entry
        known = {r.iscsi_target for r in rows.values()}
        for n, iqn in enumerate(sorted(set(sessions) - known)):
            body[f"volume{n}"] = {"zvol": None, "device": None, "status": "iscsi", "size": None,
                                  "bdev": sessions[iqn].device, "target": iqn, "started": None,
                                  "synced": None, "synced_percent": None, "time": None,
                                  "sync": "iscsi", "state": "unknown"}
        return body


def _merge_percent(figures, row) -> Optional[float]:
    """Share of the temp writes merged so far: 100 when only metadata is left."""
    alloc, _total, meta = figures
    if alloc <= meta:
        return 100.0
    start = row.merge_from or alloc
    if start <= meta:
        return None
    return round(100.0 * (start - alloc) / (start - meta), 1)


__all__ = ["VmService", "temp_name"]
