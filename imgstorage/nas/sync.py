"""Sync mode on the NAS: the copy to the container, and the pulls back.

One scheduler thread looks at every zvol once a second and starts what is due:
the NAS->VM upload of a zvol that is ``uploading``, the final pull of one that
is ``final_pull`` (and the container's release of its copy once that arrived,
``releasing``), and the periodic pull of a ``local`` zvol whose ``nextsync``
has come.  A failed job is retried with backoff; nothing is ever destroyed on
the container before the NAS has received its data.  Because jobs are derived
from the zvol states in the database, a restarted daemon picks up where the
previous one was.

Transfers resume.  The snapshot a transfer delivers is recorded
(``transfer_snapshot``) before it is taken, and every receive keeps what
arrived when it is cut short (``zfs receive -s``).  The next attempt asks the
receiver for its resume token and continues from there (``zfs send -t``); it
starts over from zero only when the sender says the token cannot be resumed
or a resume failed twice in a row, and then the log says so.

A stream that arrived whole is never sent again.  A daemon killed after the
last byte but before its record finds the transfer's snapshot already on the
receiving side (on its own zvol for a pull; in the container's answer to
recv_zvol for the copy) and records it then.

A zvol stays ``merging`` until its container reports the merge done.  That
report is a one-way message, so the NAS also asks the container itself (at
start, then every MERGE_CHECK seconds) and moves on if the report was lost.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Optional, Set

from .. import syncsnaps
from ..errors import (BrokerUnavailable, BusyError, ImgStorageError, NoSuchNode,
                      NotResumableError, RpcTimeout, StateError)
from ..rpcapi import code_of
from ..syncsnaps import SNAP_PREFIX, new_snapshot_name
from ..transfer import Progress, TransferCancelled
from ..protocol import ContainerState as There
from .jobs import Job, Jobs
from .states import Event, State

log = logging.getLogger(__name__)

DEFAULT_FREQUENCY = 300
TICK = 1.0
WAKE_GAP = 0.2              # seconds between two ticks, however often the scheduler is woken
MAX_BACKOFF = 300.0
MERGE_CHECK = 30.0          # seconds between asking a container how its merge goes
RESUME_ATTEMPTS = 3         # failed resumes in a row (the sender reachable) before starting over
BUSY_RETRY = 2.0            # seconds before asking a container again that was busy with the zvol
UNREAD = object()           # an attribute row not read yet (None: the zvol has none)


def not_resumable(exc: BaseException) -> bool:
    """The sender's own verdict that a token is of no use (``zfs send -t`` refused it),
    from this NAS's zfs or in a container's answer."""
    return code_of(exc) == NotResumableError.code


def busy(exc: BaseException) -> bool:
    """The container was working on the zvol for another request: nothing failed."""
    return code_of(exc) == BusyError.code


class SyncManager:
    def __init__(self, service, workers: int):
        self.service = service
        self.store = service.store
        self.drivers = service.drivers
        self.jobs = Jobs(workers)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._merge_checked: Dict[str, float] = {}
        # merge reports that arrived before the copy's arrival was recorded here
        self.early_reports: Set[str] = set()
        self._resuming: Set[str] = set()                # last attempt was a resume
        self._resume_failures: Dict[str, int] = {}

    def wake(self) -> None:
        """Look at the zvols now rather than at the next tick (a map just queued a copy)."""
        self._wake.set()

    # -- attributes -----------------------------------------------------------
    def _attr(self, zvol: str, name: str, attrs=UNREAD,
              defaults: Optional[Dict[str, str]] = None) -> Optional[int]:
        """Per-zvol attribute, else the NAS's global one (``attrs``, ``defaults``: the
        zvol's attribute row and the global attributes, when read already)."""
        if attrs is UNREAD:
            attrs = self.store.zvol_attrs(zvol)
        value = getattr(attrs, name) if attrs is not None else None
        if value is None:
            raw = (defaults if defaults is not None else self.store.attrs()).get(name)
            try:
                value = int(raw) if raw not in (None, "") else None
            except ValueError:
                log.warning("global attribute %s=%r is not a number; ignored", name, raw)
                value = None
        return value

    def frequency(self, zvol: str, attrs=UNREAD,
                  defaults: Optional[Dict[str, str]] = None) -> int:
        value = self._attr(zvol, "frequency", attrs, defaults)
        return value if value and value > 0 else DEFAULT_FREQUENCY

    def pulled(self, zvol: str, now: Optional[float] = None) -> Dict[str, int]:
        """The attributes to record when the NAS got the disk as it is now (a pull
        arrived, or the container's copy took over): when, and when the next pull is due."""
        now = int(now if now is not None else time.time())
        frequency = self.frequency(zvol)
        return {"last_pull_at": now, "nextsync": now + frequency, "pull_frequency": frequency}

    def frequency_changes(self, zvol: str, attrs,
                          defaults: Optional[Dict[str, str]] = None) -> Dict[str, int]:
        """The attributes to change when the frequency differs from the one ``nextsync``
        was computed with (empty: none).

        A lowered frequency counts from the last pull, so it takes effect at once
        instead of after the old interval; a ``nextsync`` an operator set by hand
        stands as long as the frequency does not change.
        """
        frequency = self.frequency(zvol, attrs, defaults)
        if attrs.pull_frequency == frequency:
            return {}
        changes = {"pull_frequency": frequency}
        if (attrs.pull_frequency is not None and frequency < attrs.pull_frequency
                and attrs.last_pull_at is not None
                and attrs.last_pull_at + frequency < attrs.nextsync):
            changes["nextsync"] = attrs.last_pull_at + frequency
            log.info("zvol %s: frequency lowered from %ss to %ss; next pull moved from %d to %d",
                     zvol, attrs.pull_frequency, frequency, attrs.nextsync, changes["nextsync"])
        return changes

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
            # the wakes of a storm's maps and unmaps meanwhile make one tick, not fifty
            self._stop.wait(WAKE_GAP)

    def tick(self, now: Optional[float] = None) -> None:
        now = now or time.time()
        # Locks and attributes are read once for all zvols: a tick follows every map
        # and unmap, and queries per zvol made the scheduler the busiest reader of a
        # storm (and of a large NAS, every second).
        locked = {lock.zvol for lock in self.store.locks()}
        attrs = self.store.all_zvol_attrs()
        defaults = self.store.attrs()
        for row in self.store.all():
            try:
                self._schedule(row, now, locked, attrs.get(row.zvol), defaults)
            except Exception:
                log.exception("scheduling %s failed", row.zvol)

    def _schedule(self, row, now: float, locked: Set[str], attrs,
                  defaults: Dict[str, str]) -> None:
        if row.retry_at and row.retry_at > now:
            return
        if row.zvol in locked:
            return
        if row.state == State.UPLOADING.value:
            self.jobs.start(row.zvol, "upload", self._upload)
        elif row.state == State.FINAL_PULL.value:
            self.jobs.start(row.zvol, "final_pull", lambda job: self._pull(job, final=True))
        elif row.state == State.RELEASING.value:
            self.jobs.start(row.zvol, "release", self._release_job)
        elif row.state == State.PULLING.value and self.jobs.get(row.zvol) is None:
            # a pull that was running when the daemon stopped: try again later
            self.store.transition(row.zvol, Event.FAILED)
        elif row.state == State.MERGING.value:
            if now - self._merge_checked.get(row.zvol, 0.0) >= MERGE_CHECK:
                self._merge_checked[row.zvol] = now
                self.jobs.start(row.zvol, "merge_check", self._check_merge)
        elif row.state == State.LOCAL.value:
            if attrs is None or attrs.nextsync is None:
                self.store.set_zvol_attrs(row.zvol, {"nextsync": int(
                    now + self.frequency(row.zvol, attrs, defaults))})
                return
            nextsync = attrs.nextsync
            changes = self.frequency_changes(row.zvol, attrs, defaults)
            if changes:
                self.store.set_zvol_attrs(row.zvol, changes)
                nextsync = changes.get("nextsync", nextsync)
            if nextsync <= now:
                self.jobs.start(row.zvol, "pull", lambda job: self._pull(job, final=False))

    def _failed(self, zvol: str, what: str, exc: Exception, kind: Optional[str] = None) -> None:
        """Record a failed transfer (``kind``: by default, the kind of the job failing)."""
        if busy(exc):
            # another request holds the zvol there: ask again soon, with no backoff
            log.info("%s of %s: the container is busy with it (%s); asking again in %.0f s",
                     what, zvol, exc, BUSY_RETRY)
            self.store.update(zvol, retry_at=time.time() + BUSY_RETRY)
            return
        self._resume_ended(zvol, exc)
        job = self.jobs.get(zvol)           # the job failing (its kind: upload, pull, ...)
        self.service.metrics.transfer_failed(kind or (job.kind if job else "other"))
        row = self.store.get(zvol)
        failures = (row.failures or 0) + 1 if row else 1
        delay = min(MAX_BACKOFF, 2.0 ** failures)
        log.error("%s of %s failed (%s); retrying in %.0f s", what, zvol, exc, delay)
        self.store.update(zvol, failures=failures, retry_at=time.time() + delay,
                          last_error=f"{what}: {exc}"[:1000])

    # -- NAS -> VM ----------------------------------------------------------------
    def _transfer_snapshot(self, row) -> str:
        """The snapshot this transfer delivers: the recorded one if it still exists."""
        zfs = self.drivers.zfs
        snap = row.transfer_snapshot
        if snap is None or snap not in zfs.list_snapshots(row.zpool, row.zvol):
            snap = new_snapshot_name()
            # recorded before it exists: a daemon killed in between finds no
            # such snapshot and simply makes another
            self.store.update(row.zvol, transfer_snapshot=snap)
            zfs.snapshot(row.zpool, row.zvol, snap)
        zfs.hold(row.zpool, row.zvol, snap)
        return snap

    def _give_up_resume(self, row, why: str) -> bool:
        """Whether a resume should be abandoned (and the transfer started over)."""
        if why:
            log.warning("the transfer of %s cannot be resumed (%s): starting it over from zero",
                        row.zvol, why)
            return True
        failed = self._resume_failures.get(row.zvol, 0)
        if failed >= RESUME_ATTEMPTS:
            log.warning("resuming the transfer of %s failed %d times in a row: starting it over "
                        "from zero", row.zvol, failed)
            return True
        return False

    def _resume_ended(self, zvol: str, exc: Optional[BaseException] = None) -> None:
        """Count a resume that failed with the other side reachable; forget it otherwise."""
        if zvol not in self._resuming:
            return
        if exc is None:
            self._resuming.discard(zvol)
            self._resume_failures.pop(zvol, None)
        elif not isinstance(exc, (NoSuchNode, RpcTimeout, BrokerUnavailable)) \
                and getattr(exc, "code", None) != "busy":   # a busy node tried nothing
            self._resume_failures[zvol] = self._resume_failures.get(zvol, 0) + 1

    def _fresh(self, zvol: str) -> None:
        self._resuming.discard(zvol)
        self._resume_failures.pop(zvol, None)

    def _upload(self, job: Job) -> None:
        row = self.store.get(job.zvol)
        if row is None or row.state != State.UPLOADING.value:
            return
        zfs = self.drivers.zfs
        started = time.monotonic()
        try:
            container = self.service.container(row.remotehost)
            there = container.recv_zvol(row.zvol)
            if self._copy_arrived(row, there):
                return
            snap = self._transfer_snapshot(row)
            rate = self._attr(row.zvol, "uploadspeed")
            token = there.get("resume_token")
            if token:
                why = ""
                try:
                    job.progress.total = zfs.send_resume_size(row.zpool, row.zvol, token)
                except ImgStorageError as exc:
                    if not not_resumable(exc):
                        raise
                    why = str(exc)
                if self._give_up_resume(row, why):
                    container.recv_zvol(row.zvol, restart=True)
                    token = None
            base = None
            if token:
                self._resuming.add(row.zvol)
                log.info("NAS->VM copy of %s to %s:%s resumed (%s bytes left, limit %s B/s)",
                         row.zvol, row.remotehost, row.remotepool, job.progress.total,
                         rate or "none")
                open_source = lambda: zfs.send_resume(row.zpool, row.zvol, token)  # noqa: E731
            else:
                self._fresh(row.zvol)
                # a copy the container kept after the VM stopped there: only what changed
                base = self.service.kept.base_for(row, there, container)
                since = base[0] if base else None
                job.progress.total = zfs.send_size(row.zpool, row.zvol, snap, since)
                log.info("NAS->VM copy of %s to %s:%s started (%s bytes, %s, limit %s B/s)",
                         row.zvol, row.remotehost, row.remotepool, job.progress.total,
                         f"incremental from {since}, the copy kept there" if base else "full",
                         rate or "none")
                open_source = lambda: zfs.send(row.zpool, row.zvol, snap, since)  # noqa: E731
            self.service.transport.upload(row, open_source, job, rate, base=base)
            self._resume_ended(row.zvol)
            log.info("NAS->VM copy of %s done: %d bytes in %.1fs (%.0f B/s)",
                     row.zvol, job.progress.done, time.monotonic() - started, _average(job))
            self._hand_over(row, snap, There.SNAPSHOT.value)
        except TransferCancelled:
            log.info("NAS->VM copy of %s cancelled after %d bytes", row.zvol, job.progress.done)
        except (ImgStorageError, OSError) as exc:
            self._failed(row.zvol, "NAS->VM copy", exc)

    def _copy_arrived(self, row, there: Dict) -> bool:
        """Whether the container already has the whole copy; if so, go on from there.

        It has when this daemon was killed after the stream arrived, or before
        it heard the answer to sync_zvol.  Sending the copy again would fail
        for good: a full stream cannot land on a zvol that has snapshots.
        """
        snap = row.transfer_snapshot
        if snap is None or snap not in (there.get("snapshots") or []):
            return False
        state = str(there.get("state"))
        log.info("NAS->VM copy of %s: %s has snapshot %s already (%s there); not sending it "
                 "again", row.zvol, row.remotehost, snap, state)
        self._hand_over(row, snap, state)
        return True

    def _hand_over(self, row, snap: str, there: str) -> None:
        """The copy is on the container: it becomes the base, and the container merges."""
        self._new_base(row, snap)
        if there in (There.SNAPSHOT.value, There.MERGING.value):
            self.service.container(row.remotehost).sync_zvol(row.zvol, target=row.iscsi_target,
                                                             snap=snap)
        # transfer_snapshot is cleared only now: until the container merges, a
        # restarted daemon must still recognise the copy as this one.
        self.store.transition(row.zvol, Event.UPLOADED, transfer_snapshot=None, failures=0,
                              retry_at=None, last_error=None)
        self._merge_checked.pop(row.zvol, None)     # this merge is checked from its start
        self.service.kept.handed_over(row)
        log.info("zvol %s: the container merges the VM's writes into the copy", row.zvol)
        if row.zvol in self.early_reports:
            self.early_reports.discard(row.zvol)
            self.service.zvol_synced(row.zvol, True, None)
        if there == There.LOCAL.value:
            self.service.zvol_synced(row.zvol, True, None)

    def _check_merge(self, job: Job) -> None:
        """Ask the container how the merge goes, in case its report never arrived."""
        row = self.store.get(job.zvol)
        if row is None or row.state != State.MERGING.value:
            return
        try:
            body = self.service.container(row.remotehost).list_dev()
        except ImgStorageError as exc:
            log.warning("could not ask %s how the merge of %s goes: %s", row.remotehost,
                        row.zvol, exc)
            return
        entry = body.get(row.zvol)
        there = entry.get("state") if isinstance(entry, dict) else None
        if there == There.LOCAL.value:
            log.warning("zvol %s: %s finished merging but its report never arrived; "
                        "moving on", row.zvol, row.remotehost)
            self.service.zvol_synced(row.zvol, True, None)
        elif there not in (There.MERGING.value, There.SWITCHING.value):
            log.warning("zvol %s is merging here but %s on %s", row.zvol, there or "unknown",
                        row.remotehost)

    # -- VM -> NAS ----------------------------------------------------------------
    def _pull_request(self, row) -> Dict:
        """Resume the pull cut short, if any; else a new snapshot from the common base."""
        zfs = self.drivers.zfs
        token = zfs.resume_token(row.zpool, row.zvol)
        if token and row.transfer_snapshot is None:
            log.warning("zvol %s has a partial receive nobody asked for: discarding it", row.zvol)
            token = None
        elif token and self._give_up_resume(row, ""):
            token = None
        if token:
            self._resuming.add(row.zvol)
            return {"resume_token": token, "snap": row.transfer_snapshot}
        self._fresh(row.zvol)
        zfs.abort_resume(row.zpool, row.zvol)
        snap = new_snapshot_name()
        self.store.update(row.zvol, transfer_snapshot=snap)
        return {"snap": snap, "base": self._common_base(row)}

    def _pull_once(self, row, job: Job, what: str, final: bool) -> bool:
        """One stream from the container into the NAS's zvol; whether it was a resumed one."""
        zfs = self.drivers.zfs
        started = time.monotonic()
        row = self._pull_arrived(row, what)
        request = self._pull_request(row)
        resumed = "resume_token" in request
        if resumed:
            log.info("%s of %s resumed (snapshot %s)", what, row.zvol, request["snap"])
        rate = None if final else self._attr(row.zvol, "downloadspeed")
        job.progress = Progress()          # a second pass measures itself
        try:
            size = self.service.transport.pull(row, request, job, rate)
        except ImgStorageError as exc:
            if resumed and not_resumable(exc):
                log.warning("the %s of %s cannot be resumed (%s): it starts over from zero "
                            "at the next attempt", what, row.zvol, exc)
                zfs.abort_resume(row.zpool, row.zvol)
                self.store.update(row.zvol, transfer_snapshot=None)
            raise
        snap = request["snap"]
        self._resume_ended(row.zvol)
        log.info("%s of %s: %d bytes in %.1fs (%.0f B/s, estimate %s)", what, row.zvol,
                 job.progress.done, time.monotonic() - started, _average(job), size)
        self._new_base(row, snap, transfer_snapshot=None, failures=0, retry_at=None,
                       last_error=None, recovery_point=syncsnaps.taken_at(snap))
        return resumed

    def _pull_arrived(self, row, what: str):
        """Record a pull that arrived whole before this daemon was killed; the row now.

        Without this the next pull would start from the older base and the
        receive would refuse it for good: the zvol's newest snapshot is not it.
        """
        snap = row.transfer_snapshot
        zfs = self.drivers.zfs
        if snap is None or snap not in zfs.list_snapshots(row.zpool, row.zvol):
            return row
        log.info("%s of %s: snapshot %s had arrived whole before the daemon stopped", what,
                 row.zvol, snap)
        self._new_base(row, snap, transfer_snapshot=None,
                       recovery_point=syncsnaps.taken_at(snap))
        return self.store.get(row.zvol)

    def _new_base(self, row, snap: str, **fields) -> None:
        """``snap`` is the base of the next incremental stream: recorded first, then the
        older snapshots let go, so a daemon killed in between still has its base."""
        self.store.update(row.zvol, last_snapshot=snap, **fields)
        syncsnaps.settle(self.drivers.zfs, row.zpool, row.zvol, snap)

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
            while True:
                resumed = self._pull_once(row, job, what, final)
                row = self.store.get(job.zvol)
                if not (final and resumed):
                    break
                # The resumed stream brought a snapshot taken before the VM
                # stopped; what it wrote after that comes with one more pull.
                log.info("%s of %s: the resumed stream is in; now the writes made after it",
                         what, row.zvol)
            log.info("%s of %s done in %.1fs", what, row.zvol, time.monotonic() - started)
            if final:
                # Recorded before the container is asked to let go: from now on a
                # restart or a lost answer only repeats the request to let go.
                self.store.transition(row.zvol, Event.PULLED, failures=0, retry_at=None,
                                      last_error=None)
                self._release(row)
            else:
                self.store.transition(row.zvol, Event.PULLED)
                self.store.set_zvol_attrs(row.zvol, self.pulled(row.zvol))
        except TransferCancelled:
            log.info("%s of %s cancelled after %d bytes; it resumes from there", what, row.zvol,
                     job.progress.done)
            if not final:
                self._back_to_local(row.zvol)
        except (ImgStorageError, OSError) as exc:
            if not final:
                self._back_to_local(row.zvol)
            self._failed(row.zvol, what, exc)

    def _release_job(self, job: Job) -> None:
        row = self.store.get(job.zvol)
        if row is None or row.state != State.RELEASING.value:
            return
        log.info("zvol %s: the final NAS<-VM sync had arrived; asking %s again to destroy "
                 "its copy", row.zvol, row.remotehost)
        self._release(row)

    def _release(self, row) -> None:
        """The NAS has every byte: the container destroys its copy, then the zvol is unmapped.

        With ``keep_local`` the container keeps it instead, as of our newest
        snapshot, which is held here first (imgstorage/nas/kept.py).  A
        container that no longer has the copy (it destroyed it before our
        record of that was written) answers success, so asking twice is safe.
        """
        keep = row.last_snapshot if row.keep_local else None
        try:
            if keep:
                self.service.kept.record(row, keep)
            kept = self.service.container(row.remotehost).del_local(row.zvol, keep=keep)
        except (ImgStorageError, OSError) as exc:
            self._failed(row.zvol, f"release of {row.remotehost}'s copy", exc, kind="release")
            return
        if keep and not kept:
            self.service.kept.forget(row.zvol, row.remotehost, keep)
        self.store.transition(row.zvol, Event.RELEASED, remotehost=None, remotepool=None,
                              iscsi_target=None, bdev=None, initiator=None, chap_user=None,
                              chap_secret=None, failures=0, retry_at=None, last_error=None)
        if kept:
            log.info("zvol %s is home: %s keeps its copy as of %s for the next start there",
                     row.zvol, row.remotehost, keep)
        else:
            log.info("zvol %s is home: %s destroyed its copy", row.zvol, row.remotehost)

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


def _average(job: Job) -> float:
    elapsed = max(time.time() - job.started, 1e-6)
    return job.progress.done / elapsed
