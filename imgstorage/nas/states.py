"""The life cycle of a zvol on the NAS: every state and every transition, here.

Each transition is written to the database before the kernel is touched and
again after it answered, so a daemon restarted at any moment finds the
operation that was in flight in the zvol's state.

Direct iSCSI::

    unmapped --map--> mapping --attached--> mapped --unmap--> unmapping --detached--> unmapped

Sync mode (the VM boots at once on a dm snapshot: reads from the iSCSI disk,
writes into the container's ``<zvol>-temp-write``)::

    mapping --attached_sync--> uploading     NAS->VM copy of a NAS snapshot into the
                                             container's local zvol
    uploading --uploaded--> merging          the container merges temp writes into
                                             its local copy (dm snapshot-merge)
    merging --synced--> local                VM on dm linear over the local zvol; the
                                             iSCSI target is gone
    local --pull--> pulling --pulled--> local  periodic incremental NAS<-VM pull

Unmap loses nothing in any phase; where the VM's writes are decides how they
come home:

* ``mapped`` (direct): they are already on the NAS.
* ``uploading`` (copy not started, running, or failed): the local copy is
  incomplete, so the container merges ``temp-write`` back into the *iSCSI
  disk* (snapshot-merge with the iSCSI disk as origin), waits for the merge to
  finish, and throws its partial copy away.  ``detached`` -> ``unmapped``.
* ``merging``: the container first lets the local merge finish; then as ``local``.
* ``local`` / ``pulling`` (a periodic pull is cancelled first): the local zvol
  holds everything; the container removes the device and keeps the zvol,
  ``detached_local`` -> ``final_pull``: an incremental pull from the last
  common snapshot; only after it was received is the container's copy
  destroyed.  A failed final pull is retried and never destroys anything.
  The arrival is recorded before the container is asked to destroy its copy
  (``pulled`` -> ``releasing``), and the zvol is ``unmapped`` only once the
  container answered (``released``): a NAS killed in between, or a lost
  answer, asks again, and a container that has nothing left says so.

A failed unmap returns to the state it started from (``prior_state``).
"""
from __future__ import annotations

from enum import Enum
from typing import Dict, Optional, Tuple, Union

from .. import statemachine


class State(str, Enum):
    UNMAPPED = "unmapped"
    MAPPING = "mapping"
    MAPPED = "mapped"
    UPLOADING = "uploading"
    MERGING = "merging"
    LOCAL = "local"
    PULLING = "pulling"
    UNMAPPING = "unmapping"
    FINAL_PULL = "final_pull"
    RELEASING = "releasing"
    DELETING = "deleting"


class Event(str, Enum):
    MAP = "map"
    ATTACHED = "attached"
    ATTACHED_SYNC = "attached_sync"
    UPLOADED = "uploaded"
    SYNCED = "synced"
    PULL = "pull"
    PULLED = "pulled"
    UNMAP = "unmap"
    DETACHED = "detached"
    DETACHED_LOCAL = "detached_local"
    RELEASED = "released"
    DELETE = "delete"
    DELETED = "deleted"
    FAILED = "failed"
    CLEANED = "cleaned"


GONE = None            # the row is removed
PRIOR = statemachine.PRIOR        # back to the state recorded when the operation began

Target = Union[State, None, str]

TRANSITIONS: Dict[Tuple[State, Event], Target] = {
    (State.UNMAPPED, Event.MAP): State.MAPPING,
    (State.MAPPING, Event.ATTACHED): State.MAPPED,
    (State.MAPPING, Event.ATTACHED_SYNC): State.UPLOADING,
    (State.MAPPING, Event.FAILED): State.UNMAPPED,
    (State.UPLOADING, Event.UPLOADED): State.MERGING,
    (State.MERGING, Event.SYNCED): State.LOCAL,
    (State.LOCAL, Event.PULL): State.PULLING,
    (State.PULLING, Event.PULLED): State.LOCAL,
    (State.PULLING, Event.FAILED): State.LOCAL,
    (State.MAPPED, Event.UNMAP): State.UNMAPPING,
    (State.UPLOADING, Event.UNMAP): State.UNMAPPING,
    (State.MERGING, Event.UNMAP): State.UNMAPPING,
    (State.LOCAL, Event.UNMAP): State.UNMAPPING,
    (State.PULLING, Event.UNMAP): State.UNMAPPING,
    (State.UNMAPPING, Event.DETACHED): State.UNMAPPED,
    (State.UNMAPPING, Event.DETACHED_LOCAL): State.FINAL_PULL,
    (State.UNMAPPING, Event.FAILED): PRIOR,
    (State.FINAL_PULL, Event.PULLED): State.RELEASING,
    (State.RELEASING, Event.RELEASED): State.UNMAPPED,
    (State.UNMAPPED, Event.DELETE): State.DELETING,
    (State.DELETING, Event.DELETED): GONE,
    (State.DELETING, Event.FAILED): State.UNMAPPED,
}

# An administrator's clean (rocks clean host storagemap, imgstorageadmin) forgets a
# mapping from any state but a delete in progress.
for _state in State:
    if _state is not State.DELETING:
        TRANSITIONS[(_state, Event.CLEANED)] = State.UNMAPPED

# The phases of a zvol's life the metrics time (imgstorage/metrics.py): the transition
# that ends each, and the row's column that says when it began (None: when the state
# left began).  A map's and an unmap's answers are timed by their requests instead.
# Until the first periodic pull, a zvol's recovery point is the moment its sync map
# was answered (the VM wrote nothing before, and no pull runs before it is local), so
# it times the map's answer to the VM running from the container's copy.
PHASES: Dict[Tuple[State, Event], Tuple[str, Optional[str]]] = {
    (State.UPLOADING, Event.UPLOADED): ("copy", None),
    (State.MERGING, Event.SYNCED): ("map_to_local", "recovery_point"),
    (State.PULLING, Event.PULLED): ("pull", None),
    (State.FINAL_PULL, Event.PULLED): ("final_pull", None),
}

# What ``rocks list host storagemap`` shows for each state.
DISPLAY = {
    State.UNMAPPED: "unmapped",
    State.MAPPING: "mapped",
    State.MAPPED: "mapped",
    State.UPLOADING: "NAS->VM",
    State.MERGING: "mapped",
    State.LOCAL: "mapped",
    State.PULLING: "NAS<-VM sched",
    State.UNMAPPING: "mapped",
    State.FINAL_PULL: "NAS<-VM",
    State.RELEASING: "NAS<-VM",
    State.DELETING: "unmapped",
}

# -- sets the code asks about, derived from the table ---------------------------
def _reach(start: State, stop: frozenset) -> frozenset:
    """The states reached from ``start`` by events not in ``stop`` (start included)."""
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (source, event), target in TRANSITIONS.items():
            if source is state and event not in stop and isinstance(target, State) \
                    and target not in seen:
                seen.add(target)
                todo.append(target)
    return frozenset(seen)


_ADMIN = frozenset({Event.CLEANED})

#: States an unmap may start from.
UNMAPPABLE = frozenset(s for (s, e) in TRANSITIONS if e is Event.UNMAP)

#: States whose unmap must end in a final pull: once ``uploaded`` the VM writes only
#: into the container's copy, which is ahead of the NAS until an unmap brings it home.
RUNNING_FROM_COPY = _reach(TRANSITIONS[(State.UPLOADING, Event.UPLOADED)],
                           _ADMIN | {Event.UNMAP})

#: States in which the container holds data the NAS does not have yet: from the start
#: of the copy until an unmap, and from the container's letting go until the final pull
#: arrived.
SYNC_ACTIVE = (_reach(TRANSITIONS[(State.MAPPING, Event.ATTACHED_SYNC)], _ADMIN | {Event.UNMAP})
               | _reach(TRANSITIONS[(State.UNMAPPING, Event.DETACHED_LOCAL)],
                        _ADMIN | {Event.PULLED}))

#: States with a transfer running or due: those a transfer's arrival leaves.
MOVING = frozenset(s for (s, e) in TRANSITIONS if e in (Event.UPLOADED, Event.PULLED))

# States in which a container reads or writes the zvol through its iSCSI target,
# so the row keeps ``iscsi_target`` and the target must exist: ``mapped``
# (direct), ``uploading`` and ``merging`` (the dm snapshot's origin is the
# iSCSI disk until the merge is done) and ``unmapping`` (the container may
# still be merging its writes back through it).  ``local`` and ``pulling`` run
# from the container's copy: their target was removed on ``synced``.  A NAS
# that rebooted exports exactly these again when its daemon starts.
TARGET_IN_USE = frozenset({State.MAPPED, State.UPLOADING, State.MERGING, State.UNMAPPING})


def next_state(current: str, event: Event, prior: Optional[str] = None) -> Optional[State]:
    """The state after ``event``; StateError when the event is not allowed now."""
    return statemachine.apply(TRANSITIONS, State, current, event, prior, "zvol")


def display(state: str) -> str:
    try:
        return DISPLAY[State(state)]
    except ValueError:
        return state
