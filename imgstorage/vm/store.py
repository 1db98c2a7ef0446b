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

from sqlalchemy import select

from ..rowstore import StateStore
from .models import VmZvol
from .states import START, Event, State, next_state

log = logging.getLogger(__name__)


class VmStore(StateStore):
    model = VmZvol
    next_state = staticmethod(next_state)
    keeps_prior = frozenset({Event.BROKE})
    clears_prior = frozenset({Event.REBUILT})
    missing = "zvol {zvol} is not attached here"
    what = "row"

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
        row = VmZvol(zvol=zvol, state=START.value, state_since=time.time(), **fields)
        self.write(lambda s: s.add(row))
        log.info("zvol %s: (new) -> %s", zvol, START.value)
        return row
