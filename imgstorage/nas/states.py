"""The life cycle of a zvol on the NAS: every state and every transition, here.

Each transition is written to the database before the kernel is touched and
again after it answered, so a daemon restarted at any moment finds the
operation that was in flight in the zvol's state:

    unmapped --map--> mapping --attached--> mapped
    mapping  --failed--> unmapped           (target removed, nothing left behind)
    mapped   --unmap--> unmapping --detached--> unmapped
    unmapping --failed--> mapped            (the container still has the disk)
    unmapped --delete--> deleting --deleted--> (row removed)
    deleting --failed--> unmapped

Sync mode adds its copy, merge and pull states to this same table.
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, Optional, Tuple

from ..errors import StateError


class State(str, Enum):
    UNMAPPED = "unmapped"
    MAPPING = "mapping"
    MAPPED = "mapped"
    UNMAPPING = "unmapping"
    DELETING = "deleting"


class Event(str, Enum):
    MAP = "map"
    ATTACHED = "attached"
    UNMAP = "unmap"
    DETACHED = "detached"
    DELETE = "delete"
    DELETED = "deleted"
    FAILED = "failed"


GONE = None  # the row is removed

TRANSITIONS: Dict[Tuple[State, Event], Optional[State]] = {
    (State.UNMAPPED, Event.MAP): State.MAPPING,
    (State.MAPPING, Event.ATTACHED): State.MAPPED,
    (State.MAPPING, Event.FAILED): State.UNMAPPED,
    (State.MAPPED, Event.UNMAP): State.UNMAPPING,
    (State.UNMAPPING, Event.DETACHED): State.UNMAPPED,
    (State.UNMAPPING, Event.FAILED): State.MAPPED,
    (State.UNMAPPED, Event.DELETE): State.DELETING,
    (State.DELETING, Event.DELETED): GONE,
    (State.DELETING, Event.FAILED): State.UNMAPPED,
}

# What ``rocks list host storagemap`` shows for each state.
DISPLAY = {
    State.UNMAPPED: "unmapped",
    State.MAPPING: "mapped",
    State.MAPPED: "mapped",
    State.UNMAPPING: "mapped",
    State.DELETING: "unmapped",
}


def next_state(current: str, event: Event) -> Optional[State]:
    """The state after ``event``; StateError when the event is not allowed now."""
    try:
        state = State(current)
    except ValueError:
        raise StateError(f"unknown zvol state {current!r}") from None
    key = (state, event)
    if key not in TRANSITIONS:
        raise StateError(f"cannot {event.value} a zvol that is {state.value}")
    return TRANSITIONS[key]


def display(state: str) -> str:
    try:
        return DISPLAY[State(state)]
    except ValueError:
        return state
