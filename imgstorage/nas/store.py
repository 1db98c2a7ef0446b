"""Database operations of the NAS: locks and state transitions, each its own transaction."""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..errors import BusyError, NotFoundError
from ..rowstore import StateStore
from .models import Attr, KeptCopy, Lock, Zvol, ZvolAttr
from .states import Event, next_state

log = logging.getLogger(__name__)

DEFAULT_ATTRS = {"frequency": "300"}

# What a listing shows of each zvol, its attributes and its lock (NasStore.listing),
# in this order; made once (zvol names sort after "", and LIMIT -1 is no limit).
LISTING = (select(Zvol.zvol, Zvol.zpool, Zvol.iscsi_target, Zvol.remotehost,
                  Zvol.remotepool, Zvol.state, Zvol.sync, Zvol.size_bytes, Zvol.state_since,
                  Zvol.last_error, Zvol.failures, Zvol.retry_at, ZvolAttr.nextsync,
                  ZvolAttr.frequency, Lock.action, Lock.since, Zvol.recovery_point,
                  ZvolAttr.last_pull_at)
           .outerjoin(ZvolAttr, ZvolAttr.zvol == Zvol.zvol)
           .outerjoin(Lock, Lock.zvol == Zvol.zvol)
           .where(Zvol.zvol > bindparam("after"))
           .order_by(Zvol.zvol)
           .limit(bindparam("limit")))

# The columns of a mapping, as an unmapped zvol has them.
UNMAPPED_COLUMNS = dict(remotehost=None, remotepool=None, iscsi_target=None, bdev=None,
                        initiator=None, chap_user=None, chap_secret=None,
                        transfer_snapshot=None, prior_state=None, retry_at=None, failures=0,
                        last_error=None, recovery_point=None)


class NasStore(StateStore):
    model = Zvol
    next_state = staticmethod(next_state)
    keeps_prior = frozenset({Event.UNMAP})
    clears_prior = frozenset({Event.CLEANED})
    missing = "ZVol {zvol} not found in database"

    _listing: Optional[Tuple[str, Tuple[str, ...], Dict[str, Any]]] = None   # compiled once

    def _where(self, row) -> str:
        return f"{row.remotehost or 'no host'}; "

    def ensure_defaults(self) -> None:
        def change(s: Session) -> None:
            for attr, value in DEFAULT_ATTRS.items():
                if s.get(Attr, attr) is None:
                    s.add(Attr(attr=attr, value=value))
        self.write(change)

    # -- locks --------------------------------------------------------------
    # A lock row outlives no daemon (the next one releases its predecessor's), so
    # taking and releasing one waits for no commit to reach the disk; the zvol's
    # own state changes that follow do.
    def lock(self, zvol: str, action: str, owner: Optional[str], caller: Optional[str]) -> None:
        try:
            self.write(lambda s: s.add(Lock(zvol=zvol, action=action, owner=owner,
                                            caller=caller, since=time.time(),
                                            pid=os.getpid())), durable=False)
        except IntegrityError:
            raise BusyError(f"ZVol {zvol} is busy") from None

    def unlock(self, zvol: str) -> None:
        self.write(lambda s: s.execute(delete(Lock).where(Lock.zvol == zvol)), durable=False)

    @contextmanager
    def locked(self, zvol: str, action: str, owner: Optional[str],
               caller: Optional[str]) -> Iterator[None]:
        self.lock(zvol, action, owner, caller)
        try:
            yield
        finally:
            self.unlock(zvol)

    def is_locked(self, zvol: str) -> bool:
        with self.session() as s:
            return s.get(Lock, zvol) is not None

    def locks(self) -> List[Lock]:
        with self.session() as s:
            return list(s.scalars(select(Lock).order_by(Lock.since)))

    # -- zvols --------------------------------------------------------------
    def zvol_with_target(self, target: str) -> Optional[str]:
        """The zvol whose export has this target name (compared as the kernel does), if any."""
        with self.session() as s:
            return s.scalars(select(Zvol.zvol).where(
                func.lower(Zvol.iscsi_target) == target.lower()).limit(1)).first()

    def get(self, zvol: str) -> Optional[Zvol]:
        with self.session() as s:
            return s.get(Zvol, zvol)

    def require(self, zvol: str) -> Zvol:
        row = self.get(zvol)
        if row is None:
            raise NotFoundError(f"ZVol {zvol} not found in database")
        return row

    def all(self) -> List[Zvol]:
        with self.session() as s:
            return list(s.scalars(select(Zvol).order_by(Zvol.zvol)))

    def listing(self, after: Optional[str] = None, limit: Optional[int] = None) -> List[tuple]:
        """What a listing shows of the zvols after ``after`` in name order (``limit`` at
        most): the columns of LISTING, one tuple per zvol, from one query.

        The statement is compiled once and run on the driver's own cursor:
        for fifty zvols, building result rows (let alone mapped objects) cost
        a listing three times what SQLite spends on the query, and a listing
        is the request a dashboard sends most.
        """
        if self._listing is None:
            compiled = LISTING.compile(dialect=self.engine.dialect)
            self._listing = (str(compiled), tuple(compiled.positiontup or ()),
                             dict(compiled.params))
        sql, names, defaults = self._listing
        values = dict(defaults, after=after or "", limit=-1 if limit is None else limit)
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(sql, tuple(values[name] for name in names))
                return cursor.fetchall()
            finally:
                cursor.close()
        finally:
            conn.close()    # back to the pool

    def add(self, zvol: str, zpool: str, size_bytes: Optional[int]) -> Zvol:
        row = Zvol(zvol=zvol, zpool=zpool, size_bytes=size_bytes, state="unmapped",
                   sync=False, state_since=time.time())
        self.write(lambda s: s.add(row))
        return row

    def clean(self, zvol: str) -> Optional[Zvol]:
        """Forget a zvol's mapping, from whatever state it is in, as ``unmapped``.

        Everything that tied the zvol to its container goes with it,
        including the snapshot a transfer was delivering: a later map must
        never resume a copy or a pull of the old cycle.
        """
        return self.transition(zvol, Event.CLEANED, **UNMAPPED_COLUMNS)

    # -- copies kept on containers -------------------------------------------
    def kept(self, zvol: Optional[str] = None) -> List[KeptCopy]:
        """The kept copies (of one zvol), oldest first."""
        with self.session() as s:
            q = select(KeptCopy).order_by(KeptCopy.since, KeptCopy.zvol, KeptCopy.host)
            if zvol is not None:
                q = q.where(KeptCopy.zvol == zvol)
            return list(s.scalars(q))

    def keep(self, zvol: str, host: str, snapshot: str) -> Optional[KeptCopy]:
        """Record that ``host`` keeps ``zvol`` as of ``snapshot``; the record it replaces."""
        def change(s: Session) -> Optional[KeptCopy]:
            old = s.get(KeptCopy, (zvol, host))
            if old is None:
                s.add(KeptCopy(zvol=zvol, host=host, snapshot=snapshot, since=time.time()))
                return None
            before = KeptCopy(zvol=old.zvol, host=old.host, snapshot=old.snapshot,
                              since=old.since)
            old.snapshot, old.since = snapshot, time.time()
            return before
        return self.write(change)

    def forget_kept(self, zvol: str, host: str,
                    snapshot: Optional[str] = None) -> Optional[KeptCopy]:
        """Drop the record of ``host``'s kept copy (only as of ``snapshot``, if given)."""
        def change(s: Session) -> Optional[KeptCopy]:
            row = s.get(KeptCopy, (zvol, host))
            if row is None or (snapshot is not None and row.snapshot != snapshot):
                return None
            s.delete(row)
            return row
        return self.write(change)

    # -- attributes ---------------------------------------------------------
    def attrs(self) -> dict:
        with self.session() as s:
            return {a.attr: a.value for a in s.scalars(select(Attr).order_by(Attr.attr))}

    def set_attrs(self, values: dict) -> None:
        def change(s: Session) -> None:
            for attr, value in values.items():
                row = s.get(Attr, attr)
                if row is None:
                    s.add(Attr(attr=attr, value=value))
                else:
                    row.value = value
        self.write(change)

    def del_attrs(self, names: List[str]) -> None:
        self.write(lambda s: s.execute(delete(Attr).where(Attr.attr.in_(names))))

    def zvol_attrs(self, zvol: str) -> Optional[ZvolAttr]:
        with self.session() as s:
            return s.get(ZvolAttr, zvol)

    def all_zvol_attrs(self) -> Dict[str, ZvolAttr]:
        """Every zvol's attributes at once, for a listing (one query, not one per zvol)."""
        with self.session() as s:
            return {a.zvol: a for a in s.scalars(select(ZvolAttr))}

    def set_zvol_attrs(self, zvol: str, values: dict) -> None:
        def change(s: Session) -> None:
            if s.get(Zvol, zvol) is None:
                raise NotFoundError(f"ZVol {zvol} not found in database")
            row = s.get(ZvolAttr, zvol)
            if row is None:
                row = ZvolAttr(zvol=zvol)
                s.add(row)
            for key, value in values.items():
                setattr(row, key, value)
        self.write(change)
