"""The writers of one database in one process, committed together.

Every change of a zvol's state is committed, and synced to disk, before the
kernel is touched, so a request waits for its commits.  SQLite lets one
writer in at a time and syncs each commit on its own (milliseconds each, more
on a busy disk), and a writer that finds the database locked sleeps in
SQLite's busy handler, longer at each try.  Fifty requests of a boot storm,
each writing four times, queued for seconds on that.

Here the writers of a process take turns without sleeping, and those that
arrive while a commit is being synced go together: each runs its changes in
a savepoint of one transaction, and one commit syncs them all.  A writer
still returns only once the commit holding its changes is on disk, so
"recorded before the kernel is touched" holds as before; a writer whose
changes fail rolls back its own savepoint, not the others'.  A batch begins
with ``BEGIN IMMEDIATE``: another process (imgstorageadmin) is waited for
through SQLite's busy timeout, as before.
"""
from __future__ import annotations

import threading
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Deque, Iterator, Optional, Tuple

from sqlalchemy import Engine
from sqlalchemy.orm import Session

MAX_BATCH = 64          # writers one commit may carry (bounds the first one's wait)


class _Batch:
    """One open write transaction, and who is in it."""

    def __init__(self, engine: Engine):
        self.conn = engine.connect()
        try:
            self.conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self.conn.close()
            raise
        self.members = 0                      # writers whose changes are in it
        self.done = threading.Event()         # committed (or failed: ``error``)
        self.error: Optional[BaseException] = None

    def finish(self) -> None:
        """Commit what the members wrote (nothing to keep: roll back), then let go."""
        try:
            if self.members:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()


class GroupCommit:
    """Write transactions of one database, batched while a commit is being synced.

    One writer at a time works in the open batch (its turn); the others wait
    in line, each woken alone when its turn comes.  The writer that finds
    nobody in line behind it commits the batch; while that commit is synced
    the line grows, and the next batch takes all of it.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._batch: Optional[_Batch] = None       # open and taking writers
        self._worker: Optional[int] = None         # the thread whose turn it is
        self._committing = False
        self._line: Deque[Tuple[int, threading.Event]] = deque()

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Session]:
        """A session whose changes are committed (and on disk) when the block ends.

        With ``durable`` false the block ends as soon as the changes are in the
        open batch, which commits them with the next writers' (or at once when
        nobody else writes): for rows a restarted daemon throws away anyway.
        Every later write of this process still comes after them and sees
        them; a read sees them once they are committed.  A write inside a
        write of the same thread is part of the outer one.
        """
        me = threading.get_ident()
        with self._lock:
            nested = self._worker == me
        if nested:
            assert self._batch is not None
            with self._savepoint(self._batch) as session:
                yield session
            return
        self._wait_turn(me)
        batch = self._batch
        try:
            if batch is None:
                batch = self._batch = _Batch(self.engine)
            with self._savepoint(batch) as session:
                yield session
            batch.members += 1
        except BaseException:
            self._pass_turn(batch)
            raise
        self._pass_turn(batch)
        if durable:
            batch.done.wait()
            if batch.error is not None:
                raise batch.error

    def _wait_turn(self, me: int) -> None:
        with self._lock:
            if self._worker is None and not self._committing:
                self._worker = me
                return
            ready = threading.Event()
            self._line.append((me, ready))
        ready.wait()                # whoever passed the turn made it ours

    def _next_in_line(self) -> None:
        """The turn to the first writer in line (called with the lock held)."""
        if self._line:
            self._worker, ready = self._line.popleft()
            ready.set()
        else:
            self._worker = None

    @staticmethod
    @contextmanager
    def _savepoint(batch: _Batch) -> Iterator[Session]:
        session = Session(bind=batch.conn, join_transaction_mode="create_savepoint",
                          expire_on_commit=False)
        try:
            with session.begin():
                yield session
        finally:
            session.close()

    def _pass_turn(self, batch: Optional[_Batch]) -> None:
        """The next writer's turn; the batch is committed when nobody waits to join it."""
        with self._lock:
            commit = batch is not None and (not self._line or batch.members >= MAX_BATCH)
            if commit:
                self._batch = None
                self._committing = True
                self._worker = None
            else:
                self._next_in_line()
        if not commit:
            return
        assert batch is not None
        try:
            batch.finish()
        except BaseException as exc:  # every member of the batch hears it
            batch.error = exc
        finally:
            with self._lock:
                self._committing = False
                self._next_in_line()
            batch.done.set()


_groups: "weakref.WeakKeyDictionary[Engine, GroupCommit]" = weakref.WeakKeyDictionary()
_groups_guard = threading.Lock()


def group_commit(engine: Engine) -> GroupCommit:
    """The one GroupCommit of ``engine`` in this process."""
    with _groups_guard:
        group = _groups.get(engine)
        if group is None:
            group = _groups[engine] = GroupCommit(engine)
        return group
