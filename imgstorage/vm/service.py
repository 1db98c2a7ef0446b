"""What a VM container does for its NAS: attach disks, hold local copies, let go.

Every step records its state (imgstorage/vm/states.py, through the store)
before it touches the kernel and after the kernel answered.  A failed attach
undoes itself, so the NAS's rollback never leaves a session or a half-built
device behind; a daemon that starts after a crash or a reboot finishes what
was in flight and rebuilds what the kernel lost (imgstorage/vm/rebuild.py).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

from sqlalchemy import Engine

from .. import naming, syncsnaps
from ..config import Config
from ..drivers import NodeDrivers
from ..drivers.base import ChapCredentials, SessionInfo
from ..errors import BusyError, DriverError, ImgStorageError, NotFoundError, StateError
from ..metrics import Metrics
from .models import VmZvol
from .states import IN_SERVICE, KEPT_STATES, PHASES, PULLABLE, UNMAP_FROM, Event, State
from .store import VmStore
from .sync import ContainerSync, dm_name, merged, temp_name

log = logging.getLogger(__name__)

DEVICE_WAIT = 20.0        # seconds for the kernel to attach a logged-in disk
POLL = 0.1
LOCK_WAIT = 10.0          # a starting daemon waits this long for a zvol's lock


def wait_for(condition: Callable[[], object], timeout: float, interval: float = POLL):
    """Poll ``condition`` until it returns something true or ``timeout`` passes.

    A check that takes a while (``fuser`` on a slow host) is not started when
    it would end past the deadline: the caller's answer must not be late.
    """
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        value = condition()
        took = time.monotonic() - began
        if value or time.monotonic() + interval + took >= deadline:
            return value
        time.sleep(interval)


class _ZvolLock:
    """A zvol's lock and how many threads hold it or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class VmService:
    def __init__(self, config: Config, engine: Engine, drivers: NodeDrivers,
                 notify: Optional[Callable[[str, Dict], None]] = None,
                 metrics: Optional[Metrics] = None):
        self.config = config
        self.engine = engine
        self.drivers = drivers
        self.notify = notify or (lambda node, message: None)
        self.store = VmStore(engine)
        # the daemon's metrics (its endpoint's registry), or a registry of our own
        self.metrics = metrics if metrics is not None else Metrics(config.name or "", "vm")
        self.metrics.time_phases(self.store, PHASES)
        self._locks: Dict[str, _ZvolLock] = {}
        self._locks_guard = threading.Lock()
        self.sync = ContainerSync(self)
        from .kept import KeptCopies
        self.kept = KeptCopies(self)
        from .rebuild import Rebuilder
        self.rebuilder = Rebuilder(self)

    # -- rows ---------------------------------------------------------------
    def row(self, zvol: str) -> Optional[VmZvol]:
        return self.store.get(zvol)

    def rows(self, *states: State) -> List[VmZvol]:
        return self.store.all(*states)

    def update(self, zvol: str, **fields) -> None:
        self.store.update(zvol, **fields)

    @contextmanager
    def zvol_lock(self, zvol: str, raise_busy: bool = True, wait: float = 0.0) -> Iterator[bool]:
        """One operation per zvol at a time, requests and the merge monitor alike.

        Waits at most ``wait`` seconds.  A request then finds the zvol busy
        (BusyError); the monitor, which never waits, is told ``False`` and
        looks again at its next tick.  Requests wait a little because the
        monitor holds a zvol for a moment when it finishes a merge, and an
        operator's unmap arriving in that moment must not be refused.
        """
        # An entry lives while someone holds or waits for its zvol, so names
        # that are merely sent (any caller can send any) leave nothing behind.
        with self._locks_guard:
            entry = self._locks.setdefault(zvol, _ZvolLock())
            entry.users += 1
        try:
            got = entry.lock.acquire(timeout=max(0.0, wait))
            if not got and raise_busy:
                raise BusyError(f"ZVol {zvol} is busy")
            try:
                yield got
            finally:
                if got:
                    entry.lock.release()
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[zvol]

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
        reuse = False
        if existing is not None and State(existing.state) in KEPT_STATES:
            # A copy kept after the VM stopped here: the base of this copy if it fits
            # (only the NAS's changes are sent), else destroyed (the NAS has every byte).
            why = self.kept.unusable(existing, sync, pool, nas_node or nas.split(".", 1)[0],
                                     volsize)
            if why:
                self.kept.drop(existing, why)
                existing = None
            else:
                reuse = True
        if existing is not None and existing.iscsi_target == target \
                and State(existing.state) is State.ATTACHED \
                and existing.chap_user is not None and chap is not None \
                and existing.chap_user != chap.userid \
                and not (existing.bdev and self.drivers.blockdev.in_use(existing.bdev)):
            # A direct attachment of an earlier mapping the NAS has since rolled back
            # (its answer came too late): nothing of the VM is here, so let it go.
            log.warning("zvol %s: dropping the attachment of an earlier mapping of %s",
                        zvol, target)
            self.store.transition(zvol, Event.DETACH)
            self._logout(target, existing.nas)
            self.store.transition(zvol, Event.DETACHED)
            existing = None
        if existing is not None and not reuse:
            if existing.iscsi_target == target and State(existing.state) in IN_SERVICE:
                if chap is not None and existing.chap_user is None:
                    # a row of an older release: keep the login's credentials for a rebuild
                    self.store.update(zvol, chap_user=chap.userid, chap_secret=chap.password)
                return f"/dev/mapper/{dm_name(zvol)}" if existing.sync else existing.bdev
            raise StateError(f"zvol {zvol} is already {existing.state} on {self.config.name}")
        columns = dict(nas=nas, iscsi_target=target, remotepool=pool if sync else None,
                       sync=sync, nas_node=nas_node or nas.split(".", 1)[0],
                       chap_user=chap.userid if chap else None,
                       chap_secret=chap.password if chap else None)
        if reuse:
            self.store.transition(zvol, Event.REUSE, bdev=None, last_error=None, **columns)
        else:
            self.store.add(zvol, **columns)
        started = time.monotonic()
        prepared = False
        try:
            if sync:
                self.sync.prepare(zvol, pool, volsize or 0, reuse=reuse)
                prepared = True
            bdev = self._attach(target, nas, chap, timeout - (time.monotonic() - started))
            if sync:
                devsize = self.sync.create_snapshot_device(zvol, pool, bdev)
                self.store.transition(zvol, Event.SNAPSHOTTED, bdev=bdev, devsize=devsize)
                result = f"/dev/mapper/{dm_name(zvol)}"
            else:
                self.store.transition(zvol, Event.ATTACHED, bdev=bdev)
                result = bdev
        except Exception:
            self._undo_attach(zvol, target, nas, pool if prepared else None)
            raise
        log.info("attached %s from %s as %s in %.2fs%s", zvol, nas, result,
                 time.monotonic() - started, "; the copy kept here is its base" if reuse else "")
        return result

    def _undo_attach(self, zvol: str, target: str, nas: str, pool: Optional[str]) -> None:
        """Undo a failed attach; a copy kept here that it was to reuse is kept as it was."""
        row = self.row(zvol)
        kept = row is not None and row.kept_snapshot is not None
        try:
            if pool:
                self.sync.discard(zvol, pool, keep_local=kept)
            self._logout(target, nas)
        except ImgStorageError as exc:
            log.error("could not undo the failed attach of %s: %s", zvol, exc)
        if kept:
            self.store.transition(zvol, Event.UNUSED, iscsi_target=None, bdev=None,
                                  chap_user=None, chap_secret=None)
        else:
            self.store.transition(zvol, Event.FAILED)

    # -- unmap --------------------------------------------------------------
    def unmap_zvol(self, zvol: str, target: Optional[str], timeout: float) -> Dict:
        """Let the disk go; ``{"local": True}`` when the NAS must pull our copy first."""
        deadline = time.monotonic() + timeout
        row = self.row(zvol)
        if row is None or State(row.state) in KEPT_STATES:
            self._logout(target, None)          # a kept copy has no device and no writes
            return {"local": False}
        state = State(row.state)
        if state is State.DETACHED_LOCAL:
            return {"local": True}
        if state not in UNMAP_FROM:
            why = f": {row.last_error}" if state is State.BROKEN and row.last_error else ""
            raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}{why}; it cannot "
                             "be unmapped")
        device = f"/dev/mapper/{dm_name(zvol)}" if row.sync else row.bdev
        if state in IN_SERVICE and device and self.drivers.blockdev.in_use(device):
            free = wait_for(lambda: not self.drivers.blockdev.in_use(device),
                            max(0.0, deadline - time.monotonic()), interval=0.25)
            if not free:
                raise StateError(f"device {device} of zvol {zvol} is still in use on "
                                 f"{self.config.name}; stop the VM first")
        if state is State.ATTACHED:
            self.store.transition(zvol, Event.DETACH)
            state = State.DETACHING
        if state is State.DETACHING:
            self._logout(target or row.iscsi_target, row.nas)
            self.store.transition(zvol, Event.DETACHED)
            log.info("detached %s", zvol)
            return {"local": False}
        if state is State.MERGING:
            # The local merge is fast: let it finish, then hand over the local copy.
            wait_for(lambda: merged(self.sync.merge_figures(zvol)),
                     max(0.0, deadline - time.monotonic()), interval=0.1)
            if not merged(self.sync.merge_figures(zvol)):
                raise StateError(f"zvol {zvol} is still merging on {self.config.name}; retry")
            self.store.transition(zvol, Event.MERGED)
            state = State.SWITCHING
        if state is State.SWITCHING:
            self.sync.finish_switch(self.row(zvol))
            self.store.transition(zvol, Event.SWITCHED)
            state = State.LOCAL
        if state is State.LOCAL:
            if self.drivers.dm.exists(dm_name(zvol)):
                self.drivers.dm.remove(dm_name(zvol))
            self.store.transition(zvol, Event.RELEASE)
            return {"local": True}
        if state is State.SNAPSHOT:
            self.store.transition(zvol, Event.FLUSH)
            state = State.FLUSHING
        if state is State.FLUSHING:
            if not self.sync.flush_to_nas(row, deadline):
                raise StateError(f"zvol {zvol}: still writing the VM's changes back to the NAS "
                                 "disk; retry the unmap")
            # recorded before the device goes: a crash from here on only has to tear down
            self.store.transition(zvol, Event.FLUSHED)
            state = State.FLUSHED
        if state is State.FLUSHED:
            self.finish_flushed(self.row(zvol))
            log.info("detached %s; the VM's writes went home through iSCSI", zvol)
            return {"local": False}
        raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}; it cannot be unmapped")

    def finish_flushed(self, row: VmZvol) -> None:
        """Every write of the VM is on the NAS: remove the device, the session and the copies.

        A copy kept here whose NAS changes had not arrived yet goes back to
        the snapshot it shares with the NAS and stays kept.
        """
        if self.drivers.dm.exists(dm_name(row.zvol)):
            self.drivers.dm.remove(dm_name(row.zvol))
        self._logout(row.iscsi_target, row.nas)
        if row.kept_snapshot and self.kept.back_to_base(row):
            self.sync.discard(row.zvol, row.remotepool, keep_local=True)
            self.store.transition(row.zvol, Event.KEEP, iscsi_target=None, bdev=None,
                                  chap_user=None, chap_secret=None)
            return
        self.sync.discard(row.zvol, row.remotepool)
        self.store.transition(row.zvol, Event.DETACHED)

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
        if row is not None:
            self.store.transition(zvol, Event.CLEANED)
            if State(row.state) in KEPT_STATES:
                self.kept.tell_nas(row)
        log.warning("zvol %s cleaned on %s: %s", zvol, self.config.name, "; ".join(done) or
                    "nothing was left")
        return {"done": done}

    # -- restart ------------------------------------------------------------
    def recover(self) -> None:
        """Finish or undo what a previous run left in flight, then rebuild lost devices.

        An attach in flight is undone (the NAS rolled its map back); a detach,
        a switch to the local copy and the teardown after a flush are
        finished.  Devices and sessions the kernel lost (the host rebooted)
        are rebuilt from the rows (imgstorage/vm/rebuild.py); ``detached_local``
        waits for the NAS to ask again.
        """
        for row in self.rows():
            try:
                with self.zvol_lock(row.zvol, wait=LOCK_WAIT):
                    self._recover_row(row.zvol)
            except ImgStorageError as exc:
                log.error("could not recover zvol %s (%s): %s", row.zvol, row.state, exc)
                self.update(row.zvol, last_error=f"recovery: {exc}"[:1000])
        self.rebuilder.rebuild_all()

    def _recover_row(self, zvol: str) -> None:
        row = self.row(zvol)
        if row is None:
            return
        state = State(row.state)
        if state is State.ATTACHING:
            log.warning("zvol %s was being attached when the daemon stopped: undoing", zvol)
            self._undo_attach(zvol, row.iscsi_target, row.nas,
                              row.remotepool if row.sync else None)
        elif state is State.DETACHING:
            log.warning("zvol %s was being detached when the daemon stopped: finishing", zvol)
            self._logout(row.iscsi_target, row.nas)
            self.store.transition(zvol, Event.DETACHED)
        elif state is State.FLUSHED:
            log.warning("zvol %s: its writes were home when the daemon stopped; finishing the "
                        "teardown", zvol)
            self.finish_flushed(row)
        elif state is State.MERGING and self.drivers.dm.exists(dm_name(zvol)):
            status = self.drivers.dm.status(dm_name(zvol))
            if status and status[0].target_type == "snapshot":
                log.warning("zvol %s: the daemon stopped before its merge began; starting it",
                            zvol)
                self.sync.start_merge(row)
        elif state is State.SWITCHING:
            log.warning("zvol %s had merged when the daemon stopped; finishing the switch to "
                        "its local copy", zvol)
            self.sync.finish_switch(row)
            self.store.transition(zvol, Event.SWITCHED)
            self.sync.report_merged(row)
        elif state in KEPT_STATES:
            self.kept.recover(row)

    # -- sync steps asked for by the NAS ------------------------------------
    def require(self, zvol: str, *states: State) -> VmZvol:
        row = self.row(zvol)
        if row is None:
            raise NotFoundError(f"zvol {zvol} is not attached to {self.config.name}")
        if states and row.state not in {st.value for st in states}:
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
                "resume_token": zfs.resume_token(row.remotepool, zvol), **self.kept.base(row)}

    def start_merge(self, zvol: str, snap: Optional[str] = None) -> None:
        """The copy arrived: merge the VM's writes into it.

        ``snap`` is the NAS snapshot the copy is; it is the base of the first
        pull, so it is held here from now on.
        """
        row = self.require(zvol, State.SNAPSHOT, State.MERGING, State.SWITCHING, State.LOCAL)
        if row.state in (State.SWITCHING.value, State.LOCAL.value):
            return          # merged already (a repeated request); the holds are the pulls' now
        if snap:
            syncsnaps.hold_only(self.drivers.zfs, row.remotepool, zvol, {snap})
        if row.state != State.SNAPSHOT.value:
            return
        figures = self.sync.merge_figures(zvol)
        # recorded first: from the reload on, the local zvol holds merged writes, and a
        # device rebuilt after a crash must stack on it, not on the NAS's disk (and a
        # copy that was kept here is no longer the one kept: the NAS's changes are in)
        self.store.transition(zvol, Event.MERGE, merge_started=time.time(),
                              merge_from=figures[0] if figures else None,
                              kept_snapshot=None, kept_since=None)
        try:
            self.sync.start_merge(row)
        except ImgStorageError:
            self.store.transition(zvol, Event.FAILED)
            raise
        self.sync.wake()

    def snapshot_for_pull(self, zvol: str, snap: str, base: Optional[str]) -> int:
        """Snapshot the local copy for a pull; the stream's estimated size.

        The new snapshot is held at once (a cut pull resumes from it) and so
        is the base until the NAS asks for a stream built on something newer.
        """
        row = self.require(zvol, *PULLABLE)
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

    def del_local(self, zvol: str, keep: Optional[str] = None) -> bool:
        """The NAS has our copy: destroy it, or with ``keep`` (the snapshot the NAS has as
        its newest) keep it as the base of the next start here.  True: kept.

        A kept copy is destroyed when the NAS asks without ``keep`` (the zvol
        is being removed) and left alone when it asks to keep it again.
        """
        row = self.row(zvol)
        if row is None:
            return False
        state = State(row.state)
        if state in KEPT_STATES and keep and keep == row.kept_snapshot:
            return True
        if state is State.DETACHED_LOCAL and keep and self.kept.keep(row, keep):
            return True
        if state is not State.DETACHED_LOCAL and state not in KEPT_STATES:
            raise StateError(f"zvol {zvol} is {row.state} on {self.config.name}; its copy is "
                             "still in use")
        if self.drivers.zfs.get_zvol(row.remotepool, zvol) is not None:
            syncsnaps.let_go(self.drivers.zfs, row.remotepool, zvol)
            self.drivers.zfs.destroy(row.remotepool, zvol, recursive=True)
        self.store.transition(zvol, Event.DELETED)
        log.info("destroyed the local copy of %s: the NAS has it", zvol)
        return False

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
                if figures and row.state == State.MERGING.value:
                    entry["started"] = True
                    entry["time"] = row.merge_started
                    entry["synced_percent"] = _merge_percent(figures, row)
            if row.state == State.BROKEN.value:
                entry.update(status=State.BROKEN.value, error=row.last_error)
            if State(row.state) in KEPT_STATES:
                entry.update(self.kept.listing(row))
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
