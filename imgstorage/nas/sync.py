"""Sync mode on the NAS: the copy to the container, and the pulls back.

One scheduler thread looks at every zvol once a second and starts what is due:
the NAS->VM upload of a zvol that is ``uploading``, the final pull of one that
is ``final_pull``, and the periodic pull of a ``local`` zvol whose ``nextsync``
has come.  A failed job is retried with backoff; nothing is ever destroyed on
the container before the NAS has received its data.  Because jobs are derived
from the zvol states in the database, a restarted daemon picks up where the
previous one was.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Optional

from ..errors import ImgStorageError, StateError
from ..transfer import TransferCancelled, pump
from .jobs import Job, Jobs
from .states import Event, State

log = logging.getLogger(__name__)

SNAP_PREFIX = "IMG-STORAGE-"
KEEP_SNAPSHOTS = 3
DEFAULT_FREQUENCY = 300
TICK = 1.0
MAX_BACKOFF = 300.0


def new_snapshot_name() -> str:
    """Sortable by name as well as by creation: time first, then randomness."""
    return f"{SNAP_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class SyncManager:
    def __init__(self, service, workers: int):
        self.service = service
        self.store = service.store
        self.drivers = service.drivers
        self.jobs = Jobs(workers)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def wake(self) -> None:
        """Look at the zvols now rather than at the next tick (a map just queued a copy)."""
        self._wake.set()

    # -- attributes -----------------------------------------------------------
    def _attr(self, zvol: str, name: str) -> Optional[int]:
        """Per-zvol attribute, else the NAS's global one."""
        attrs = self.store.zvol_attrs(zvol)
        value = getattr(attrs, name) if attrs is not None else None
        if value is None:
            raw = self.store.attrs().get(name)
            try:
                value = int(raw) if raw not in (None, "") else None
            except ValueError:
                log.warning("global attribute %s=%r is not a number; ignored", name, raw)
                value = None
        return value

    def frequency(self, zvol: str) -> int:
        value = self._attr(zvol, "frequency")
        return value if value and value > 0 else DEFAULT_FREQUENCY

    # -- scheduler --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sync-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(10)
        self.jobs.shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
            except Exception:  # one bad row must never stop the scheduling of all others
                log.exception("sync scheduler tick failed")

    def tick(self, now: Optional[float] = None) -> None:
        now = now or time.time()
        for row in self.store.all():
            try:
                self._schedule(row, now)
            except Exception:
                log.exception("scheduling %s failed", row.zvol)

    def _schedule(self, row, now: float) -> None:
        if row.retry_at and row.retry_at > now:
            return
        if self.store.is_locked(row.zvol):
            return
        if row.state == State.UPLOADING.value:
            self.jobs.start(row.zvol, "upload", self._upload)
        elif row.state == State.FINAL_PULL.value:
            self.jobs.start(row.zvol, "final_pull", lambda job: self._pull(job, final=True))
        elif row.state == State.PULLING.value and self.jobs.get(row.zvol) is None:
            # a pull that was running when the daemon stopped: try again later
            self.store.transition(row.zvol, Event.FAILED)
        elif row.state == State.LOCAL.value:
            attrs = self.store.zvol_attrs(row.zvol)
            nextsync = attrs.nextsync if attrs else None
            if nextsync is None:
                self.store.set_zvol_attrs(row.zvol, {"nextsync": int(now + self.frequency(row.zvol))})
            elif nextsync <= now:
                self.jobs.start(row.zvol, "pull", lambda job: self._pull(job, final=False))

    def _failed(self, zvol: str, what: str, exc: Exception) -> None:
        row = self.store.get(zvol)
        failures = (row.failures or 0) + 1 if row else 1
        delay = min(MAX_BACKOFF, 2.0 ** failures)
        log.error("%s of %s failed (%s); retrying in %.0f s", what, zvol, exc, delay)
        self.store.update(zvol, failures=failures, retry_at=time.time() + delay,
                          last_error=f"{what}: {exc}"[:1000])

    # -- NAS -> VM ----------------------------------------------------------------
    def _upload(self, job: Job) -> None:
        row = self.store.get(job.zvol)
        if row is None or row.state != State.UPLOADING.value:
            return
        zfs = self.drivers.zfs
        started = time.monotonic()
        try:
            snap = new_snapshot_name()
            zfs.snapshot(row.zpool, row.zvol, snap)
            job.progress.total = zfs.send_size(row.zpool, row.zvol, snap)
            rate = self._attr(row.zvol, "uploadspeed")
            log.info("NAS->VM copy of %s to %s:%s started (%s bytes, limit %s B/s)", row.zvol,
                     row.remotehost, row.remotepool, job.progress.total, rate or "none")
            self.service.transport.upload(row, snap, job, rate)
            self.store.update(row.zvol, last_snapshot=snap)
            self._trim(row.zpool, row.zvol, keep={snap})
            self.service.remote(row.remotehost, {"action": "sync_zvol", "zvol": row.zvol,
                                                 "target": row.iscsi_target})
            self.store.transition(row.zvol, Event.UPLOADED, failures=0, retry_at=None,
                                  last_error=None)
            log.info("NAS->VM copy of %s done: %d bytes in %.1fs (%.0f B/s); container merging",
                     row.zvol, job.progress.done, time.monotonic() - started, _average(job))
        except TransferCancelled:
            log.info("NAS->VM copy of %s cancelled", row.zvol)
        except (ImgStorageError, OSError) as exc:
            self._failed(row.zvol, "NAS->VM copy", exc)

    # -- VM -> NAS ----------------------------------------------------------------
    def _pull(self, job: Job, final: bool) -> None:
        row = self.store.get(job.zvol)
        expected = State.FINAL_PULL if final else State.LOCAL
        if row is None or row.state != expected.value:
            return
        what = "final NAS<-VM sync" if final else "periodic NAS<-VM sync"
        started = time.monotonic()
        try:
            if not final:
                self.store.transition(row.zvol, Event.PULL)
            snap = new_snapshot_name()
            base = self._common_base(row)
            rate = None if final else self._attr(row.zvol, "downloadspeed")
            size = self.service.transport.pull(row, snap, base, job, rate)
            log.info("%s of %s: %d bytes in %.1fs (%.0f B/s, estimate %s)", what, row.zvol,
                     job.progress.done, time.monotonic() - started, _average(job), size)
            self.store.update(row.zvol, last_snapshot=snap, failures=0, retry_at=None,
                              last_error=None)
            self._trim(row.zpool, row.zvol, keep={snap})
            if final:
                self.service.remote(row.remotehost, {"action": "del_local", "zvol": row.zvol})
                self.store.transition(row.zvol, Event.PULLED, remotehost=None, remotepool=None,
                                      iscsi_target=None, bdev=None, initiator=None,
                                      chap_user=None, chap_secret=None)
            else:
                self.store.transition(row.zvol, Event.PULLED)
                self.store.set_zvol_attrs(row.zvol, {
                    "nextsync": int(time.time() + self.frequency(row.zvol))})
        except TransferCancelled:
            log.info("%s of %s cancelled", what, row.zvol)
            if not final:
                self._back_to_local(row.zvol)
        except (ImgStorageError, OSError) as exc:
            if not final:
                self._back_to_local(row.zvol)
            self._failed(row.zvol, what, exc)

    def _back_to_local(self, zvol: str) -> None:
        try:
            self.store.transition(zvol, Event.FAILED)
        except StateError:
            pass

    def _common_base(self, row) -> Optional[str]:
        """The newest snapshot the NAS has of this zvol: the container keeps it too."""
        snaps = [s for s in self.drivers.zfs.list_snapshots(row.zpool, row.zvol)
                 if s.startswith(SNAP_PREFIX)]
        if row.last_snapshot in snaps:
            return row.last_snapshot
        return snaps[-1] if snaps else None

    def _trim(self, pool: str, zvol: str, keep: set) -> None:
        """Keep the newest few of our own snapshots; never touch anyone else's."""
        ours = [s for s in self.drivers.zfs.list_snapshots(pool, zvol) if s.startswith(SNAP_PREFIX)]
        for snap in ours[:-KEEP_SNAPSHOTS]:
            if snap not in keep:
                try:
                    self.drivers.zfs.destroy_snapshot(pool, zvol, snap)
                except ImgStorageError as exc:
                    log.warning("could not destroy old snapshot %s/%s@%s: %s", pool, zvol, snap, exc)


def _average(job: Job) -> float:
    elapsed = max(time.time() - job.started, 1e-6)
    return job.progress.done / elapsed
