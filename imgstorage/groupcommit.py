"""The writers of one database in one process, committed together.

Every change of a zvol's state is committed, and synced to disk, before the
kernel is touched, so a request waits for its commits.  SQLite lets one
writer in at a time and syncs each commit on its own (milliseconds each, more
on a busy disk), and a writer that finds the database locked sleeps in
SQLite's busy handler, longer at each try.  Fifty requests of a boot storm,
each writing four times, queued for seconds on that.

Here a change is a function of the ORM handle it writes through.  The
writers of a process queue their changes; one of them (the leader) runs every
change queued so far, each in a savepoint of one transaction, and commits
them with one sync, while the changes that arrive meanwhile queue for the
next batch, led by the first of them.  A writer still returns only once the
commit holding its change is on disk, so "recorded before the kernel is
touched" holds as before; a change that fails rolls back its own savepoint,
not the others'.  The leader runs the changes itself, one after another, so
a batch costs no thread switch per writer.  A batch begins with ``BEGIN
IMMEDIATE``: another process (imgstorageadmin) is waited for through
SQLite's busy timeout, as before.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

T = TypeVar("T")
Change = Callable[[Session], Any]

MAX_BATCH = 64          # changes one commit may carry (bounds the wait of the first)


class _Batch:
    """One open write transaction.

    A batch that holds only changes nobody waits to see on disk (``durable``
    false) is committed without syncing the log (``synchronous=NORMAL``,
    safe in WAL mode: a crash may lose the commit, never corrupt the file,
    and the next synced commit syncs it too); its connection goes back to
    the pool as it came.
    """

    def __init__(self, engine: Engine, durable: bool = True):
        self.conn = engine.connect()
        self.restore: Optional[int] = None
        try:
            if not durable:
                self.restore = self.conn.exec_driver_sql("PRAGMA synchronous").scalar()
                self.conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self._close()
            raise

    def finish(self, keep: bool) -> None:
        """Commit (``keep``) or roll back, then let go of the connection."""
        try:
            if keep:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self._close()

    def _close(self) -> None:
        try:
            if self.restore is not None:
                self.conn.rollback()
                self.conn.exec_driver_sql(f"PRAGMA synchronous={int(self.restore)}")
                self.conn.commit()
        finally:
            self.conn.close()


class _Task:
    """One writer's change, and what became of it."""

    __slots__ = ("change", "durable", "result", "error", "ran", "committed", "lead", "signal")

    def __init__(self, change: Change, durable: bool):
        self.change = change
        self.durable = durable
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.ran = False              # its change is in a batch, or failed
        self.committed = False        # its batch is committed, or failed
        self.lead = False             # its writer leads the next batch
        self.signal = threading.Event()

    def finished(self) -> bool:
        return self.ran and (self.error is not None or not self.durable or self.committed)


class GroupCommit:
    """Changes of one database, run and committed in batches."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._queue: Deque[_Task] = deque()
        self._leading = False
        self._inside = threading.local()        # the batch whose change this thread runs

    def run(self, change: Callable[[Session], T], durable: bool = True) -> T:
        """What ``change`` returns (given the batch's ORM handle), once committed and on disk.

        With ``durable`` false it returns as soon as the change is in a batch,
        which commits it with the others (the writer that leads the batch is
        the one that waits): for rows a restarted daemon throws away anyway.
        Every later change of this process still comes after it and sees it;
        a read sees it once it is committed.  A change that runs another
        change makes it part of itself.
        """
        batch = getattr(self._inside, "batch", None)
        if batch is not None:
            return self._apply(batch, change)
        task = _Task(change, durable)
        with self._lock:
            self._queue.append(task)
            if not self._leading:
                self._leading = task.lead = True
        while not task.finished():
            if task.lead:
                self._lead()
                continue
            task.signal.wait()
            task.signal.clear()
        if task.error is not None:
            raise task.error
        return task.result

    def _apply(self, batch: _Batch, change: Callable[[Session], T]) -> T:
        handle = Session(bind=batch.conn, join_transaction_mode="create_savepoint",
                         expire_on_commit=False)
        try:
            with handle.begin():
                return change(handle)
        finally:
            handle.close()

    def _lead(self) -> None:
        """Run and commit the changes queued so far, then hand the lead to the next writer."""
        with self._lock:
            tasks: List[_Task] = []
            while self._queue and len(tasks) < MAX_BATCH:
                tasks.append(self._queue.popleft())
        try:
            self._run_batch(tasks)
        finally:
            for task in tasks:        # nobody is left waiting, whatever happened
                if not task.ran:
                    task.ran, task.error = True, task.error or RuntimeError("write not run")
                task.committed = True
                task.signal.set()
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.signal.set()
                else:
                    self._leading = False
            for task in tasks:
                task.lead = False

    def _run_batch(self, tasks: List[_Task]) -> None:
        try:
            batch = _Batch(self.engine, durable=any(task.durable for task in tasks))
        except BaseException as exc:   # the database cannot be written: each writer hears it
            for task in tasks:
                task.ran, task.error = True, exc
            return
        kept: List[_Task] = []
        self._inside.batch = batch
        try:
            for task in tasks:
                try:
                    task.result = self._apply(batch, task.change)
                    kept.append(task)
                except Exception as exc:  # this writer's own failure: its savepoint is undone
                    task.error = exc
                task.ran = True
                if task.error is not None or not task.durable:
                    task.signal.set()      # it need not wait for the commit
        except BaseException as exc:      # interrupted: nothing of the batch is kept
            for task in kept:
                task.error = exc
            batch.finish(keep=False)
            raise
        finally:
            self._inside.batch = None
        try:
            batch.finish(keep=bool(kept))
        except BaseException as exc:  # every writer whose change was in it hears it
            for task in kept:
                task.error = exc
            if not isinstance(exc, Exception):
                raise


_groups: "weakref.WeakKeyDictionary[Engine, GroupCommit]" = weakref.WeakKeyDictionary()
_groups_guard = threading.Lock()


def group_commit(engine: Engine) -> GroupCommit:
    """The one GroupCommit of ``engine`` in this process."""
    with _groups_guard:
        group = _groups.get(engine)
        if group is None:
            group = _groups[engine] = GroupCommit(engine)
        return group
