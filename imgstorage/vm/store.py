"""The VM container's rows: the only writer of a row's state.

Every change of state goes through ``transition`` (one transaction, checked
against imgstorage/vm/states.py); other columns change through ``update``,
which refuses the state.  The daemon, its merge monitor, the rebuild after a
reboot and imgstorageadmin all use this one store.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..errors import NotFoundError, StateError
from ..db import claim_row
from .models import VmZvol
from .states import START, Event, State, next_state

log = logging.getLogger(__name__)


class VmStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def get(self, zvol: str) -> Optional[VmZvol]:
        with self.session() as s:
            return s.get(VmZvol, zvol)

    def all(self, *states: State) -> List[VmZvol]:
        with self.session() as s:
            q = select(VmZvol).order_by(VmZvol.zvol)
            if states:
                q = q.where(VmZvol.state.in_([st.value for st in states]))
            return list(s.scalars(q))

    def add(self, zvol: str, **fields) -> VmZvol:
        """A new row, in the state every attachment starts from."""
        with self.session() as s, s.begin():
            row = VmZvol(zvol=zvol, state=START.value, state_since=time.time(), **fields)
            s.add(row)
        log.info("zvol %s: (new) -> %s", zvol, START.value)
        return row

    def update(self, zvol: str, **fields) -> None:
        """Change columns that are not the state (device, errors, figures)."""
        if "state" in fields or "prior_state" in fields:
            raise StateError("a row's state changes only through a transition")
        with self.session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                for key, value in fields.items():
                    setattr(row, key, value)

    def transition(self, zvol: str, event: Event, **fields) -> Optional[VmZvol]:
        """Apply ``event`` and the given column updates atomically; None when the row is gone."""
        with self.session() as s, s.begin():
            claim_row(s, VmZvol.zvol, zvol)
            row = s.get(VmZvol, zvol)
            if row is None:
                raise NotFoundError(f"zvol {zvol} is not attached here")
            old = row.state
            new = next_state(old, event, row.prior_state)
            since = time.time() - (row.state_since or time.time())
            if new is None:
                s.delete(row)
                log.info("zvol %s: %s -> (removed) on %s after %.1fs", zvol, old, event.value,
                         since)
                return None
            for key, value in fields.items():
                setattr(row, key, value)
            if event is Event.BROKE:
                row.prior_state = old
            elif event is Event.REBUILT:
                row.prior_state = None
            row.state = new.value
            row.state_since = time.time()
            log.info("zvol %s: %s -> %s on %s (%.1fs in %s)", zvol, old, new.value, event.value,
                     since, old)
            return row
