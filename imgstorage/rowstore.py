"""What the NAS's and the container's stores share: a row's state changes only here.

Each side keeps one row per zvol with ``state``, ``prior_state`` and
``state_since`` columns and one transition table (nas/states.py,
vm/states.py).  ``transition`` applies an event in a write transaction,
which holds the database's write lock from its start (groupcommit.py: BEGIN
IMMEDIATE), so two threads or processes changing one zvol see each other's
outcome; ``update`` changes every other column and refuses the state.

What a transition knows (the state left, how long the row was in it, the
row as it is now) is handed to ``on_transition`` once committed: the
metrics time the phases of a zvol's life there (imgstorage/metrics.py)
instead of keeping a second record of when each began.
"""
from __future__ import annotations

import logging
import time
from enum import Enum
from typing import Any, Callable, FrozenSet, Optional, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .groupcommit import group_commit
from .errors import NotFoundError, StateError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: (zvol, event, state left, the row now or None when removed, seconds spent in the state left)
TransitionHook = Callable[[str, Enum, str, Any, float], None]


class StateStore:
    """A side's store; subclasses name their model, table and wording."""

    model: type                                   # the mapped row class, keyed by ``zvol``
    next_state: Callable[..., Optional[Enum]]     # the side's states.next_state
    keeps_prior: FrozenSet[Enum] = frozenset()    # events that record the state left
    clears_prior: FrozenSet[Enum] = frozenset()   # events that forget it
    missing = "zvol {zvol} not found"             # the error of an unknown zvol
    what = "zvol"                                 # what the state belongs to, in errors

    def __init__(self, engine: Engine):
        self.engine = engine
        self.on_transition: Optional[TransitionHook] = None

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def write(self, change: Callable[[Session], T], durable: bool = True) -> T:
        """Run ``change`` (given an ORM handle) in a write transaction; its result once
        committed, with the other writers of this process (groupcommit.py)."""
        return group_commit(self.engine).run(change, durable)

    def update(self, zvol: str, **fields) -> None:
        """Change columns that are not the state (devices, errors, retry times, snapshots)."""
        if "state" in fields or "prior_state" in fields:
            raise StateError(f"a {self.what}'s state changes only through a transition")

        def change(s: Session) -> None:
            row = s.get(self.model, zvol)
            if row is not None:
                for key, value in fields.items():
                    setattr(row, key, value)
        self.write(change)

    def transition(self, zvol: str, event: Enum, **fields):
        """Apply ``event`` and the given column updates atomically; None when the row is gone."""
        def change(s: Session):
            row = s.get(self.model, zvol)
            if row is None:
                raise NotFoundError(self.missing.format(zvol=zvol))
            old = row.state
            new = type(self).next_state(old, event, row.prior_state)
            since = time.time() - (row.state_since or time.time())
            if new is None:
                s.delete(row)
                return None, old, since
            for key, value in fields.items():
                setattr(row, key, value)
            if event in self.keeps_prior:
                row.prior_state = old
            elif event in self.clears_prior:
                row.prior_state = None
            row.state = new.value
            row.state_since = time.time()
            return row, old, since
        row, old, since = self.write(change)
        # logged once committed, and by the thread that asked (another may have run it);
        # the fields are for a JSON log (logformat.py), the text for a person
        said = {"event": "transition", "zvol": zvol, "from": old,
                "to": None if row is None else row.state, "on": event.value,
                "seconds_in_from": round(since, 3)}
        host = getattr(row, "remotehost", None)         # a NAS row: the container it serves
        if host:
            said["host"] = host
        if row is None:
            log.info("zvol %s: %s -> (removed) on %s after %.1fs", zvol, old, event.value, since,
                     extra=said)
        else:
            log.info("zvol %s: %s -> %s on %s (%s%.1fs in %s)", zvol, old, row.state,
                     event.value, self._where(row), since, old, extra=said)
        hook = self.on_transition
        if hook is not None:
            try:
                hook(zvol, event, old, row, since)
            except Exception:  # a measurement must never undo or fail a recorded change
                log.exception("zvol %s: observing the transition %s failed", zvol, event.value)
        return row

    def _where(self, row) -> str:
        """Who the row is mapped to, for the log line of a transition."""
        return ""
