"""The life cycle of a zvol on a VM container: every state and every transition, here.

A row is created ``attaching`` when a map arrives and removed (``GONE``) when
the container has nothing of the zvol left.  Each transition is recorded
before the kernel is touched and again after it answered, so a daemon that
starts after a crash -- or after its host rebooted and the kernel lost its
iSCSI sessions and device-mapper tables -- reads in the row what the kernel
should hold and can finish, undo or rebuild it (vm/rebuild.py).

Direct iSCSI::

    attaching --attached--> attached --detach--> detaching --detached--> (gone)

Sync mode (the VM sees ``/dev/mapper/<zvol>-snap`` throughout)::

    attaching --snapshotted--> snapshot      dm snapshot: reads the iSCSI disk,
                                             writes into <zvol>-temp-write
    snapshot --merge--> merging              the NAS's copy arrived: dm
                                             snapshot-merge onto the local zvol
    merging --merged--> switching            merge complete: dm linear over the
                                             local zvol, temp-write destroyed,
                                             iSCSI logged out
    switching --switched--> local
    local --release--> detached_local        unmap: device removed, the copy is
                                             kept until the NAS has pulled it
    detached_local --deleted--> (gone)       the NAS has it: copy destroyed

An unmap before the copy completed sends the VM's writes home over iSCSI::

    snapshot --flush--> flushing             dm snapshot-merge onto the iSCSI disk
    flushing --flushed--> flushed            every write is on the NAS; tearing down
    flushed --detached--> (gone)

A copy kept after the VM stopped (the container attribute ``img_keep_local``)
is only the base of the next start here: the NAS's copy is the authority::

    detached_local --keep--> kept            the NAS has it and the snapshot both
                                             sides share; the copy stays, held
    kept --reuse--> attaching                a sync map from the same NAS: only a
                                             temp-write zvol is made; the NAS sends
                                             what changed since the shared snapshot
                                             (the copy is rolled back to it first)
    attaching --unused--> kept               that map failed: the copy is as it was
    flushed --keep--> kept                   an unmap before the changes arrived:
                                             the copy goes back to the shared snapshot
    kept --deleted--> (gone)                 the NAS removed the zvol
    kept --dropped--> (gone)                 the pool needed the space, or the copy
                                             cannot serve the next map

A device that cannot be rebuilt after a reboot (its local zvol is gone) is
``broken``: the row keeps what it knew, nothing is destroyed, and the listing
says so until an administrator cleans it.  ``cleaned`` (rocks clean host
storagemap, imgstorageadmin) removes a row from any state.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, FrozenSet, Optional, Tuple, Union

from .. import statemachine
from ..protocol import ContainerState as State


class Event(str, Enum):
    ATTACHED = "attached"
    SNAPSHOTTED = "snapshotted"
    FAILED = "failed"
    DETACH = "detach"
    DETACHED = "detached"
    MERGE = "merge"
    MERGED = "merged"
    SWITCHED = "switched"
    FLUSH = "flush"
    FLUSHED = "flushed"
    RELEASE = "release"
    DELETED = "deleted"
    BROKE = "broke"
    REBUILT = "rebuilt"
    CLEANED = "cleaned"
    KEEP = "keep"
    REUSE = "reuse"
    UNUSED = "unused"
    DROPPED = "dropped"


GONE = None             # the row is removed
PRIOR = statemachine.PRIOR         # back to the state recorded when the row broke

Target = Union[State, None, str]

START = State.ATTACHING     # a new row's state

TRANSITIONS: Dict[Tuple[State, Event], Target] = {
    (State.ATTACHING, Event.ATTACHED): State.ATTACHED,
    (State.ATTACHING, Event.SNAPSHOTTED): State.SNAPSHOT,
    (State.ATTACHING, Event.FAILED): GONE,
    (State.ATTACHED, Event.DETACH): State.DETACHING,
    (State.DETACHING, Event.DETACHED): GONE,
    (State.SNAPSHOT, Event.MERGE): State.MERGING,
    (State.MERGING, Event.FAILED): State.SNAPSHOT,          # the merge table was refused
    (State.MERGING, Event.MERGED): State.SWITCHING,
    (State.SWITCHING, Event.SWITCHED): State.LOCAL,
    (State.LOCAL, Event.RELEASE): State.DETACHED_LOCAL,
    (State.DETACHED_LOCAL, Event.DELETED): GONE,
    (State.SNAPSHOT, Event.FLUSH): State.FLUSHING,
    (State.FLUSHING, Event.FLUSHED): State.FLUSHED,
    (State.FLUSHED, Event.DETACHED): GONE,
    (State.BROKEN, Event.REBUILT): PRIOR,
    (State.DETACHED_LOCAL, Event.KEEP): State.KEPT,
    (State.FLUSHED, Event.KEEP): State.KEPT,
    (State.KEPT, Event.REUSE): State.ATTACHING,
    (State.ATTACHING, Event.UNUSED): State.KEPT,
    (State.KEPT, Event.DELETED): GONE,
    (State.KEPT, Event.DROPPED): GONE,
}


# The phase of a zvol's life on this side the metrics time (imgstorage/metrics.py): the
# transition that ends it, and the row's column saying when it began (None: when the
# state left began): the kernel's merge of the VM's writes into the local copy.
PHASES: Dict[Tuple[State, Event], Tuple[str, Optional[str]]] = {
    (State.MERGING, Event.MERGED): ("merge", None),
}


@dataclass(frozen=True)
class Kernel:
    """What the kernel of this host holds for a zvol in a state.

    ``session``: an iSCSI session to the NAS's target.  ``table``: the dm
    target type of ``<zvol>-snap`` and ``origin`` whether it stacks on the
    iSCSI disk or on the local zvol.  ``writes_here``: the container holds
    writes of the VM that the NAS does not have yet.
    """
    session: bool = False
    table: Optional[str] = None
    origin: Optional[str] = None          # "iscsi" | "local"
    writes_here: bool = False
    settled: bool = True                  # False: an operation was in flight


KERNEL: Dict[State, Kernel] = {
    State.ATTACHING: Kernel(settled=False),
    State.ATTACHED: Kernel(session=True),
    State.DETACHING: Kernel(settled=False),
    State.SNAPSHOT: Kernel(session=True, table="snapshot", origin="iscsi", writes_here=True),
    State.MERGING: Kernel(table="snapshot-merge", origin="local", writes_here=True),
    State.SWITCHING: Kernel(table="linear", origin="local", writes_here=True, settled=False),
    State.LOCAL: Kernel(table="linear", origin="local", writes_here=True),
    State.FLUSHING: Kernel(session=True, table="snapshot-merge", origin="iscsi",
                           writes_here=True),
    State.FLUSHED: Kernel(settled=False),
    State.DETACHED_LOCAL: Kernel(writes_here=True),
    State.KEPT: Kernel(),                 # a zvol and its held snapshot; nothing the NAS lacks
    State.BROKEN: Kernel(writes_here=True),
}

# A device that breaks can only break from a state whose device is rebuilt.
for _state, _kernel in KERNEL.items():
    if _kernel.settled and (_kernel.session or _kernel.table):
        TRANSITIONS[(_state, Event.BROKE)] = State.BROKEN
for _state in State:
    TRANSITIONS[(_state, Event.CLEANED)] = GONE

# -- sets the code asks about, derived from the tables --------------------------
#: the events of a disk's normal way out (not failures, breakage, cleaning, or a kept
#: copy's own life, which starts after the disk was let go)
_ONWARD = frozenset(Event) - {Event.FAILED, Event.BROKE, Event.CLEANED, Event.REBUILT,
                              Event.REUSE, Event.UNUSED, Event.DROPPED}


def _leads_out(state: State) -> bool:
    """Whether the normal way on from ``state`` ends with the device let go."""
    seen, todo = set(), [state]
    while todo:
        here = todo.pop()
        if here in seen:
            continue
        seen.add(here)
        for (src, event), dst in TRANSITIONS.items():
            if src is here and event in _ONWARD:
                if dst is GONE or dst is State.DETACHED_LOCAL:
                    return True
                todo.append(dst)
    return False


#: a copy kept after the VM stopped: no device, no writes of the VM, only a base
KEPT_STATES: FrozenSet[State] = frozenset(s for (s, e) in TRANSITIONS if e is Event.REUSE)
#: states an unmap request can start from: each leads on to the device let go
UNMAP_FROM: FrozenSet[State] = frozenset(
    s for s in State if s is not START and s not in KEPT_STATES and _leads_out(s))
#: states whose row holds the only copy of some of the VM's writes
AT_RISK: FrozenSet[State] = frozenset(s for s, k in KERNEL.items() if k.writes_here)
#: states in which the kernel should hold a device or a session for the row
REBUILDABLE: FrozenSet[State] = frozenset(s for (s, e) in TRANSITIONS if e is Event.BROKE)
#: states with a device the VM is (or may be) running on
IN_SERVICE: FrozenSet[State] = frozenset(
    s for s, k in KERNEL.items() if k.settled and (k.table or k.session))
#: states that hold a local copy or a temp-write zvol on this host
HOLDS_COPY: FrozenSet[State] = frozenset(s for s, k in KERNEL.items()
                                         if k.origin is not None or s in (
                                             State.DETACHED_LOCAL, State.BROKEN))
#: states whose temp-write zvol still holds writes not merged anywhere
HOLDS_TEMP: FrozenSet[State] = frozenset(s for s, k in KERNEL.items()
                                         if k.table in ("snapshot", "snapshot-merge"))
#: states of a copy the NAS may snapshot and pull
PULLABLE: FrozenSet[State] = frozenset({State.LOCAL, State.DETACHED_LOCAL})
#: states in which the NAS->VM copy may still arrive
RECEIVING: FrozenSet[State] = frozenset({State.SNAPSHOT})


def next_state(current: str, event: Event, prior: Optional[str] = None) -> Optional[State]:
    """The state after ``event``; StateError when the event is not allowed now."""
    return statemachine.apply(TRANSITIONS, State, current, event, prior, "container")


__all__ = ["State", "Event", "Kernel", "KERNEL", "TRANSITIONS", "GONE", "PRIOR", "START",
           "UNMAP_FROM", "AT_RISK", "REBUILDABLE", "IN_SERVICE", "HOLDS_COPY", "HOLDS_TEMP",
           "PULLABLE", "RECEIVING", "KEPT_STATES", "PHASES", "next_state"]
