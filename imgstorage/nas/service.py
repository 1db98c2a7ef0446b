"""What the NAS does for each request, written against drivers and the store.

Every path that changes something first records the state transition, then
touches the kernel, then records the outcome; a failure part-way rolls the
kernel back (the target is removed, the container is told to let go) so a
failed map never leaves a zvol that later maps refuse as "already mapped".
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, ContextManager, Dict, List, Optional

from .. import dblock, naming, syncsnaps
from ..config import Config
from ..drivers import NodeDrivers
from ..drivers.base import ChapCredentials
from ..drivers.resolver import host_known, network_name
from ..errors import ImgStorageError, NotFoundError, RemoteError, StateError, ValidationError
from ..messaging import RpcClient, RpcPool
from ..metrics import Metrics
from ..protocol import ContainerState
from ..rpcapi import PerRequest
from ..vm.client import VmClient
from .states import (MOVING, PHASES, RUNNING_FROM_COPY, SYNC_ACTIVE, UNMAPPABLE, Event, State,
                     display)
from .store import NasStore

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT = 5.0     # seconds a starting daemon waits for a container's answer
ROLLBACK_RELEASE_TIMEOUT = 10.0   # seconds a failed map waits for the container to let go
RpcFactory = Callable[[], ContextManager[RpcClient]]
MOVING_STATES = frozenset(s.value for s in MOVING)
ON_CONTAINER_STATES = frozenset(s.value for s in SYNC_ACTIVE)


class NasService:
    def __init__(self, config: Config, store: NasStore, drivers: NodeDrivers,
                 rpc_factory: Optional[RpcFactory] = None, metrics: Optional[Metrics] = None):
        from .kept import KeptCopies
        from .sync import SyncManager
        from .transport import make_transport
        self.config = config
        self.store = store
        # the daemon's metrics (its endpoint's registry), or a registry of our own
        self.metrics = metrics if metrics is not None else Metrics(config.name or "", "nas")
        self.metrics.time_phases(store, PHASES)
        self.metrics.expect_phases("map", "unmap")     # timed by their requests (handlers.py)
        self.drivers = drivers
        # Connections to the containers stay open between requests (one per thread
        # in use): a boot storm must not open one per question.
        self.peers = RpcPool(config, keep=config.request_workers)
        self.rpc_factory = rpc_factory or self.peers.client
        self.sync = SyncManager(self, config.img_sync_workers)
        self.transport = make_transport(config, self)
        self.kept = KeptCopies(self)

    def container(self, host: str, rpc=None) -> VmClient:
        """``host``'s daemon; a pooled connection per request unless ``rpc`` is one to share."""
        return VmClient(rpc if rpc is not None else PerRequest(self.rpc_factory), host,
                        timeout=self.config.timeout)

    @property
    def name(self) -> str:
        return self.config.name

    def portal(self) -> str:
        """The name a container uses to reach this NAS (the storage network's, if any)."""
        return network_name(self.config, self.name) or self.name

    # -- map ----------------------------------------------------------------
    def map_zvol(self, zvol: str, zpool: str, remotehost: str, size_gb: int,
                 remotepool: Optional[str], sync: bool, timeout: float,
                 keep_local: bool = False) -> Dict:
        row = self.store.get(zvol)
        if row is not None:
            if row.zpool != zpool:
                raise ValidationError(f"ZVol {zvol} is in zpool {row.zpool}, not {zpool}")
            if State(row.state) in UNMAPPABLE:
                if row.remotehost == remotehost and bool(row.sync) == sync:
                    log.info("zvol %s is already mapped to %s; answering with its device",
                             zvol, remotehost)
                    bdev = row.bdev if sync else self._current_disk(row, size_gb, timeout)
                    return {"bdev": bdev, "target": row.iscsi_target}
                raise StateError(f"Error when mapping zvol: {zvol} is already mapped to {row.remotehost}")
            if row.state in (State.FINAL_PULL.value, State.RELEASING.value):
                raise StateError(f"ZVol {zvol} is still being synced home from {row.remotehost} "
                                 "(NAS<-VM); map it again when it is unmapped")
            if row.state != State.UNMAPPED.value:
                raise StateError(f"ZVol {zvol} is {row.state}; it cannot be mapped now")
        if sync and not remotepool:
            raise ValidationError("img_sync is true but no remotepool was given")
        if not host_known(self.config, remotehost):
            raise NotFoundError(f"Host {remotehost} is unknown")
        if not self.drivers.zfs.pool_exists(zpool):
            raise NotFoundError(f"cannot create '{zpool}/{zvol}': no such pool '{zpool}'")

        holder = self.store.zvol_with_target(naming.target_iqn(self.name, zvol))
        if holder is not None and holder != zvol:
            raise StateError(f"cannot map {zvol}: its iSCSI target name is in use by zvol "
                             f"{holder}; rename one of them")
        size_bytes = size_gb * naming.GIB
        info = self.drivers.zfs.get_zvol(zpool, zvol)
        if info is None:
            self.drivers.zfs.create_zvol(zpool, zvol, size_bytes)
            log.info("created zvol %s/%s of %d GB", zpool, zvol, size_gb)
        else:
            size_bytes = info.volsize
        if row is None:
            self.store.add(zvol, zpool, size_bytes)

        target = naming.target_iqn(self.name, zvol)
        chap = self._new_chap() if self.config.chap else None
        started = time.monotonic()
        self.sync.early_reports.discard(zvol)      # a report of an earlier mapping
        self.store.transition(zvol, Event.MAP, remotehost=remotehost, remotepool=remotepool,
                              sync=sync, iscsi_target=target, size_bytes=size_bytes,
                              chap_user=chap.userid if chap else None,
                              chap_secret=chap.password if chap else None, last_error=None,
                              keep_local=keep_local if sync else None)
        target_made = False
        asked = False               # the container may have attached (no refusal came back)
        try:
            deadline = time.monotonic() + timeout
            with self.rpc_factory() as rpc:
                there = self.container(remotehost, rpc)
                initiator = naming.iqn(there.initiator_name(timeout=_left(deadline)))
                self.drivers.target.create_target(
                    target, self.drivers.zfs.device_path(zpool, zvol), initiator, chap)
                target_made = True
                asked = True
                try:
                    reply = self._ask_map(there, zvol, target, size_gb, size_bytes, sync,
                                          remotehost, remotepool, chap, _left(deadline))
                except RemoteError as exc:
                    asked = False   # a container that refuses has undone its own part
                    raise relayed(exc, "Error attaching iSCSI target to compute node: "
                                  f"{exc}") from None
            bdev = reply.get("bdev")
            if not isinstance(bdev, str) or not bdev.startswith("/dev/"):
                raise ImgStorageError(f"compute node {remotehost} answered without a block device")
        except Exception as exc:
            self._rollback_map(zvol, target if target_made else None, exc,
                               release=remotehost if asked else None)
            raise
        # the VM starts once this map is answered: every write it makes is after now
        self.store.transition(zvol, Event.ATTACHED_SYNC if sync else Event.ATTACHED, bdev=bdev,
                              initiator=initiator, last_snapshot=None, transfer_snapshot=None,
                              failures=0, retry_at=None,
                              recovery_point=time.time() if sync else None)
        log.info("mapped %s to %s:%s in %.2fs%s", zvol, remotehost, bdev,
                 time.monotonic() - started, "; NAS->VM copy queued" if sync else "")
        if sync:
            self.sync.wake()
        else:
            self.kept.forget(zvol, remotehost)     # a direct map: the container let it go
        return {"bdev": bdev, "target": target}

    def _ask_map(self, there: VmClient, zvol: str, target: str, size_gb: int,
                 size_bytes: Optional[int], sync: bool, remotehost: str,
                 remotepool: Optional[str], chap: Optional[ChapCredentials],
                 timeout: float) -> Dict:
        """The map_zvol request a container gets, the first time and when asked again."""
        return there.map_zvol(zvol, target=target, nas=self.portal(), nas_node=self.name,
                              size=size_gb, volsize=size_bytes, sync=sync,
                              remotehost=remotehost, remotepool=remotepool, chap=chap,
                              timeout=timeout)

    def _current_disk(self, row, size_gb: int, timeout: float) -> str:
        """The iSCSI disk a direct mapping has on its container now.

        A container that rebooted logged in again and its disk may carry
        another ``/dev/sdX`` name than the one recorded at map time; a VM
        started on the recorded one could get another VM's disk.  The
        container answers a repeated map of the same target with its current
        device (it changes nothing there).
        """
        chap = (ChapCredentials(row.chap_user, row.chap_secret)
                if row.chap_user and row.chap_secret else None)
        try:
            bdev = self._ask_map(self.container(row.remotehost), row.zvol, row.iscsi_target,
                                 size_gb, row.size_bytes, False, row.remotehost, None, chap,
                                 timeout).get("bdev")
        except ImgStorageError as exc:
            raise relayed(exc, f"ZVol {row.zvol} is mapped to {row.remotehost}, which could "
                          f"not confirm its device: {exc}") from None
        if not isinstance(bdev, str) or not bdev.startswith("/dev/"):
            raise ImgStorageError(f"compute node {row.remotehost} answered without a block device")
        if bdev != row.bdev:
            log.warning("zvol %s: its disk on %s is %s now (was %s)", row.zvol, row.remotehost,
                        bdev, row.bdev)
            self.store.update(row.zvol, bdev=bdev)
        return bdev

    def _rollback_map(self, zvol: str, target: Optional[str], exc: Exception,
                      release: Optional[str] = None) -> None:
        """Undo a map that failed or timed out, on this side and (``release``) the container's.

        A container whose answer never came may still be attaching, or have
        attached after we stopped waiting: it is asked to let go, or it would
        keep a session to a target that is gone and hand its stale device to
        the next map of the zvol.
        """
        log.warning("mapping %s failed (%s); rolling back", zvol, exc)
        if target:
            try:
                self.drivers.target.delete_target(target)
            except ImgStorageError as err:
                log.error("could not remove target %s after a failed map: %s", target, err)
        if release:
            self._release_remote(zvol, release, target, ROLLBACK_RELEASE_TIMEOUT)
        self.store.transition(zvol, Event.FAILED, remotehost=None, remotepool=None,
                              iscsi_target=None, bdev=None, chap_user=None, chap_secret=None,
                              last_error=str(exc)[:1000])

    @staticmethod
    def _new_chap() -> ChapCredentials:
        # LIO and open-iscsi take 12..16 character secrets everywhere.
        return ChapCredentials(userid="imgstorage-" + secrets.token_hex(4),
                               password=secrets.token_urlsafe(12)[:16])

    # -- unmap --------------------------------------------------------------
    def unmap_zvol(self, zvol: str, timeout: float) -> Dict:
        row = self.store.require(zvol)
        if row.state == State.UNMAPPED.value:
            raise StateError(f"ZVol {zvol} is not mapped")
        if row.state in (State.FINAL_PULL.value, State.RELEASING.value):
            raise StateError(f"ZVol {zvol} is already being synced home (NAS<-VM)")
        if State(row.state) not in UNMAPPABLE:
            raise StateError(f"ZVol {zvol} is {row.state}; it cannot be unmapped now")
        with self.sync.jobs.held(zvol):
            row = self.store.require(zvol)          # a cancelled pull went back to local
            self.store.transition(zvol, Event.UNMAP)
            try:
                reply = self.container(row.remotehost).unmap_zvol(
                    zvol, target=row.iscsi_target, sync=bool(row.sync), timeout=timeout)
            except Exception as exc:
                self.store.transition(zvol, Event.FAILED, last_error=str(exc)[:1000])
                if isinstance(exc, ImgStorageError) and not isinstance(exc, StateError):
                    # the container's kind of failure (busy, state, ...) stays the answer's
                    raise relayed(exc, "Error detaching iSCSI target from compute node: "
                                  f"{exc}") from None
                raise
            if not reply.get("local") and State(row.state) in RUNNING_FROM_COPY:
                # The container should hold the VM's latest writes; "nothing here"
                # would make us forget them.  Keep everything, target included.
                error = (f"ZVol {zvol} is {row.state} here, so {row.remotehost} should hold "
                         "the VM's latest writes, but it answered that it has no local copy; "
                         f"nothing was changed (the zvol is {row.state} again)")
                log.error("unmap of %s refused: %s", zvol, error)
                self.store.transition(zvol, Event.FAILED, last_error=error[:1000])
                raise StateError(error)
            if row.iscsi_target:
                self.drivers.target.delete_target(row.iscsi_target)
            if reply.get("local"):
                # The container's copy holds the VM's writes: bring it home first.
                self.store.transition(zvol, Event.DETACHED_LOCAL, iscsi_target=None,
                                      retry_at=None, failures=0, last_error=None)
                log.info("zvol %s: the VM's copy on %s will be synced home", zvol, row.remotehost)
                self.sync.wake()
                return {"syncing": True}
            self.store.transition(zvol, Event.DETACHED, remotehost=None, remotepool=None,
                                  iscsi_target=None, bdev=None, initiator=None, chap_user=None,
                                  chap_secret=None, last_error=None)
        return {}

    def zvol_synced(self, zvol: str, ok: bool, error: Optional[str]) -> None:
        """The container finished merging: it runs from its local copy now."""
        row = self.store.require(zvol)
        if not ok:
            # Keep the target: the VM still reads through it (the original dropped it: B8).
            log.error("container %s could not merge %s: %s", row.remotehost, zvol, error)
            self.store.update(zvol, last_error=f"merge failed: {error}"[:1000])
            return
        if row.state == State.UPLOADING.value:
            # The container merged before this NAS recorded the copy's arrival (an empty
            # temp-write store merges at once): kept for that record, not lost.
            self.sync.early_reports.add(zvol)
            row = self.store.require(zvol)
            if row.state == State.UPLOADING.value:
                log.info("zvol %s: merge report ahead of the copy's record; kept for it", zvol)
                return
            self.sync.early_reports.discard(zvol)
        if row.state != State.MERGING.value:
            log.info("zvol %s: merge report ignored in state %s", zvol, row.state)
            return
        # Recorded first: an unmap that starts now finds no target of its own to delete,
        # and one that started a moment ago wins (the report is then ignored).
        try:
            self.store.transition(zvol, Event.SYNCED, iscsi_target=None, last_error=None,
                                  retry_at=None, failures=0)
        except StateError as exc:
            log.info("zvol %s: merge report ignored (%s)", zvol, exc)
            return
        if row.iscsi_target:
            # first: the row no longer names it, so nothing else would ever remove it
            self._delete_target(row.iscsi_target)
        self.store.set_zvol_attrs(zvol, self.sync.pulled(zvol))
        log.info("zvol %s runs from its local copy on %s", zvol, row.remotehost)

    # -- delete -------------------------------------------------------------
    def del_zvol(self, zvol: str, zpool: str) -> Dict:
        row = self.store.require(zvol)
        if row.zpool != zpool:
            raise ValidationError(f"ZVol {zvol} is in zpool {row.zpool}, not {zpool}")
        if row.state != State.UNMAPPED.value:
            raise StateError(f"Error deleting zvol {zvol}: is mapped")
        self.store.transition(zvol, Event.DELETE)
        try:
            self.kept.remove_all(zvol)
            if self.drivers.zfs.get_zvol(zpool, zvol) is not None:
                syncsnaps.let_go(self.drivers.zfs, zpool, zvol)
                self.drivers.zfs.destroy(zpool, zvol, recursive=True)
        except Exception as exc:
            self.store.transition(zvol, Event.FAILED, last_error=str(exc)[:1000])
            raise
        self.store.transition(zvol, Event.DELETED)
        return {}

    # -- clean --------------------------------------------------------------
    def clean_zvol(self, zvol: str, force: bool) -> Dict:
        """Forget a mapping that is broken beyond the normal unmap (the container died).

        Removes the target and returns the zvol to ``unmapped``.  Refused while
        the container may hold the only copy of the VM's latest writes, unless
        ``force``: then those writes are given up, and the log says so.
        """
        row = self.store.require(zvol)
        risky = {s.value for s in SYNC_ACTIVE}
        if row.state in risky and not force:
            raise StateError(f"ZVol {zvol} is {display(row.state)} ({row.state}): "
                             f"{row.remotehost} may hold writes the NAS does not have; "
                             "use force=true to give them up")
        with self.sync.jobs.held(zvol):
            if row.iscsi_target:
                self.drivers.target.delete_target(row.iscsi_target)
            if row.state in risky:
                log.warning("zvol %s cleaned by force in state %s: writes on %s that were not "
                            "synced home are given up", zvol, row.state, row.remotehost)
            # a pull cut short would resume into a cycle that is over
            self.drivers.zfs.abort_resume(row.zpool, zvol)
            self.store.clean(zvol)
        return {"was": row.state, "remotehost": row.remotehost, "target": row.iscsi_target}

    # -- restart ------------------------------------------------------------
    def recover(self) -> None:
        """Finish or roll back what a previous run of the daemon left in flight.

        Locks of a process that is gone are released; a map that never
        answered is rolled back (its caller has long stopped waiting); an unmap
        is finished when the container finished its part, else it returns to
        where it started (the operator asks again); a delete is finished when
        the zvol is already gone.  Transfers need nothing here: the scheduler
        derives them from the states and resumes them.
        """
        for lock in self.store.locks():
            if not dblock.daemon_alive(lock.pid, self.config.db):
                log.warning("releasing the lock of %s held by %s (process %s) since %s: "
                            "that process is gone", lock.zvol, lock.action, lock.pid,
                            time.ctime(lock.since))
                self.store.unlock(lock.zvol)
        for row in self.store.all():
            try:
                if row.state == State.MAPPING.value:
                    log.warning("zvol %s was being mapped when the daemon stopped: rolling back",
                                row.zvol)
                    self._rollback_map(row.zvol, row.iscsi_target,
                                       ImgStorageError("interrupted by a daemon restart"),
                                       release=row.remotehost)
                elif row.state == State.UNMAPPING.value:
                    self._recover_unmap(row)
                elif row.state == State.DELETING.value:
                    if self.drivers.zfs.get_zvol(row.zpool, row.zvol) is None:
                        self.store.transition(row.zvol, Event.DELETED)
                    else:
                        self.store.transition(row.zvol, Event.FAILED)
            except ImgStorageError as exc:
                log.error("could not recover zvol %s (%s): %s", row.zvol, row.state, exc)
        self.kept.recover()

    def _recover_unmap(self, row) -> None:
        """An unmap the daemon died in: finish it if the container finished its part.

        The container answers where it is: it let go of a disk whose writes
        are all on the NAS (nothing left there), or it holds its copy for the
        final pull (``detached_local``).  In any other case (still flushing,
        unreachable) the zvol returns to its prior state and the operator
        unmaps again, which the container then finishes.
        """
        there = self._container_state(row)
        if there == ContainerState.DETACHED_LOCAL.value:
            log.warning("zvol %s was being unmapped when the daemon stopped; %s already let go "
                        "of the device: the final pull follows", row.zvol, row.remotehost)
            self._delete_target(row.iscsi_target)
            self.store.transition(row.zvol, Event.DETACHED_LOCAL, iscsi_target=None,
                                  retry_at=None, failures=0, last_error=None)
        elif there in (None, ContainerState.KEPT.value) \
                and row.prior_state in (State.MAPPED.value, State.UPLOADING.value):
            log.warning("zvol %s was being unmapped when the daemon stopped; %s had finished "
                        "(its writes are on the NAS): unmapped", row.zvol, row.remotehost)
            self._delete_target(row.iscsi_target)
            self.store.transition(row.zvol, Event.DETACHED, remotehost=None, remotepool=None,
                                  iscsi_target=None, bdev=None, initiator=None, chap_user=None,
                                  chap_secret=None, transfer_snapshot=None, last_error=None)
        else:
            log.warning("zvol %s was being unmapped when the daemon stopped (%s says %s): it "
                        "is %s again; unmap it again", row.zvol, row.remotehost,
                        there or "nothing", row.prior_state)
            self.store.transition(row.zvol, Event.FAILED,
                                  last_error="unmap interrupted by a daemon restart")

    def _container_state(self, row) -> Optional[str]:
        """The container's own state of ``row``'s zvol; None: it has nothing of it."""
        if not row.remotehost:
            return None
        try:
            body = self.container(row.remotehost).list_dev(timeout=RECOVERY_TIMEOUT)
        except ImgStorageError as exc:
            return f"unreachable ({exc})"
        entry = body.get(row.zvol)
        if not isinstance(entry, dict):
            return None
        return str(entry.get("state") or "unknown")

    def _delete_target(self, target: Optional[str]) -> None:
        if target and any(t.iqn == target for t in self.drivers.target.list_targets()):
            self.drivers.target.delete_target(target)

    def _release_remote(self, zvol: str, host: str, target: Optional[str],
                        timeout: float) -> None:
        """Best effort, bounded: the container may have attached before we gave up."""
        try:
            self.container(host).unmap_zvol(zvol, target=target, timeout=timeout)
            log.info("%s let go of %s after the failed map", host, zvol)
        except ImgStorageError as exc:
            log.warning("could not ask %s to let go of %s after the failed map: %s", host,
                        zvol, exc)

    # -- listings -----------------------------------------------------------
    def list_zvols(self, after: Optional[str] = None, limit: Optional[int] = None,
                   detail: bool = False) -> List[Dict]:
        """The zvols after ``after`` in name order (``limit`` at most), each row only with
        what it holds.

        A key that is absent means null (false for ``sync``, 0 for
        ``failures``): most zvols of a large NAS are unmapped and idle, and
        their rows would otherwise be mostly nulls.  Fields a row could only
        repeat (``locked`` beside ``lock``; ``is_sending`` and
        ``is_delete_remote``, which ``lifecycle`` says; the container's
        ``bdev``, which ``list_dev`` shows) are left out.  The zvols, their
        attributes and their locks come from one query.

        ``detail`` adds what the metrics read and no listing needs on the wire
        (imgstorage/metrics.py): since when the zvol is in its state
        (``since``), when the last pull arrived (``last_pull_at``), the size in
        bytes (``size_bytes``) and a running transfer's ``transfer`` (its kind,
        bytes done and estimated size).
        """
        rows = []
        for (zvol, zpool, target, remotehost, remotepool, state, sync, size, since, error,
             failures, retry_at, nextsync, frequency, lock_action,
             lock_since, recovery_point, last_pull_at) in self.store.listing(after, limit):
            moving = state in MOVING_STATES
            job = self.sync.jobs.get(zvol) if moving else None
            row = {
                "zvol": zvol, "zpool": zpool, "iscsi_target": target,
                "remotehost": remotehost, "remotepool": remotepool,
                "state": display(state), "lifecycle": state, "sync": bool(sync) or None,
                "size": (size // naming.GIB) if size else None,
                "time": (job.started if job else since) if moving else None,
                "progress": job.progress.percent() if job else None,
                "rate": job.progress.rate() if job else None,
                "eta": job.progress.eta() if job else None,
                "nextsync": nextsync, "frequency": frequency,
                "lock": ({"action": lock_action, "since": lock_since}
                         if lock_action is not None else None),
                "error": error, "failures": failures or None, "retry_at": retry_at,
                "recovery_point": recovery_point if state in ON_CONTAINER_STATES else None,
            }
            if detail:
                progress = job.progress if job else None    # a second pass gets a new one
                row.update(since=since, last_pull_at=last_pull_at, size_bytes=size, transfer=(
                    {"kind": job.kind, "done": progress.done, "total": progress.total}
                    if job else None))
            rows.append({k: v for k, v in row.items() if v is not None})
        return rows

    def get_zvol_attrs(self, zvol: str) -> Dict:
        self.store.require(zvol)
        attrs = self.store.zvol_attrs(zvol)
        body = {"zvol": zvol}
        for key in ("frequency", "nextsync", "uploadspeed", "downloadspeed"):
            body[key] = getattr(attrs, key) if attrs else None
        return body


def relayed(exc: ImgStorageError, text: str) -> ImgStorageError:
    """A container's failure as this NAS's answer: ``text`` for the operator, and the
    container's code (busy, state, not_found, ...) so the caller can still tell what
    kind of failure it was."""
    if isinstance(exc, RemoteError):
        return RemoteError(exc.node, exc.action, text, exc.code)
    relay = ImgStorageError(text)
    relay.code = exc.code
    return relay


def _left(deadline: float) -> float:
    """Time left for the next hop; a hop always gets at least a second."""
    return max(1.0, deadline - time.monotonic())


