"""Who may ask what of a node: the one place that says so.

The broker checks that a message's ``user_id`` is the user of the
connection that published it, and every node has a broker user named after
it, so ``user_id`` says which node (or administrator) is asking.  Both
daemons ask the functions here and act only when they return no refusal.

Without ``admin_users`` a node is in open mode and accepts anyone, as
before (it says so when it starts).

A VM container (strict mode):

==========================  ==============================================
who                         may ask
==========================  ==============================================
anybody                     ``ping``
an administrator            anything
a NAS in ``nas_users``      ``list_dev``, ``initiator_name``; ``map_zvol``
                            naming itself as ``nas_node``; the zvol
                            actions (``ZVOL_ACTIONS``) only for a zvol
                            whose row records it as the NAS that mapped it
anybody else                nothing
==========================  ==============================================

A zvol with no row here may be mapped by any NAS of the container; a NAS may
also ask for the zvol actions that then only answer "nothing here" (an unmap
retried after a restart, a ``del_local`` repeated after the copy went, a
``recv_zvol`` asking where a copy stands), but not ``clean_zvol``, which
removes devices and local zvols by name.  An unmap or clean that names a
target must name the zvol's own (the row's; with no row, the sender's target
for that zvol), so that an owner of one zvol cannot log out of another's.

A NAS (strict mode): ``ping`` is open; a container's notifications are taken
only from the container the zvol is mapped to (the row's ``remotehost``),
and its report of a kept copy destroyed only about its own copy; everything
else, listings included, only from an administrator.
"""
from __future__ import annotations

import enum
import logging
from typing import Optional

from . import naming
from .config import Config
from .errors import ForbiddenError

log = logging.getLogger(__name__)


class Caller(enum.Enum):
    ADMINISTRATOR = "administrator"
    NAS = "a NAS of this container"
    STRANGER = "neither an administrator nor a NAS of this container"


# -- the VM container ---------------------------------------------------------
VM_OPEN = frozenset({"ping"})
VM_ANY_NAS = frozenset({"list_dev", "initiator_name"})
ZVOL_ACTIONS = frozenset({"unmap_zvol", "sync_zvol", "recv_zvol", "send_zvol", "del_local",
                          "clean_zvol"})
# Zvol actions a NAS may ask for a zvol this container has no row of: each then
# answers "nothing here" or "not attached" without touching the kernel.
VM_NO_ROW = frozenset({"map_zvol", "unmap_zvol", "sync_zvol", "recv_zvol", "send_zvol",
                       "del_local"})


def vm_caller(config: Config, user: Optional[str]) -> Caller:
    if user and user in (config.admin_users or ()):
        return Caller.ADMINISTRATOR
    if user and user in (config.nas_users or ()):
        return Caller.NAS
    return Caller.STRANGER


def vm_refusal(config: Config, user: Optional[str], action: str,
               has_row: bool = False, owner: Optional[str] = None) -> Optional[str]:
    """Why ``user`` may not ask this container for ``action`` (None: it may).

    ``has_row`` and ``owner`` describe the zvol the request names: whether
    this container has a row of it and which NAS (broker user) mapped it.
    """
    if not config.strict or action in VM_OPEN:
        return None
    caller = vm_caller(config, user)
    if caller is Caller.ADMINISTRATOR:
        return None
    if caller is Caller.STRANGER:
        return f"the sender is {caller.value}"
    if action in VM_ANY_NAS:
        return None
    if action != "map_zvol" and action not in ZVOL_ACTIONS:
        return f"{action} is not a request a NAS makes"
    if not has_row:
        if action in VM_NO_ROW:
            return None
        return f"this container has no record of the zvol; only an administrator may {action} it"
    if owner != user:
        return f"the zvol was mapped here by {owner or 'an unrecorded NAS'}, not by the sender"
    return None


def vm_map_refusal(config: Config, user: Optional[str],
                   nas_node: Optional[str]) -> Optional[str]:
    """A NAS maps in its own name: the row's NAS is the one that will get its reports."""
    if not config.strict or vm_caller(config, user) is not Caller.NAS:
        return None
    if nas_node is not None and nas_node != user:
        return f"it names {nas_node} as the NAS, not itself"
    return None


def vm_target_refusal(config: Config, user: Optional[str], zvol: str, target: Optional[str],
                      has_row: bool, row_target: Optional[str]) -> Optional[str]:
    """A NAS's unmap or clean may name no target but the zvol's own: the row's, or with
    no row the one the sender itself would have exported the zvol as."""
    if not config.strict or target is None or vm_caller(config, user) is not Caller.NAS:
        return None
    expected = row_target if has_row else naming.target_iqn(user or "", zvol)
    if target != expected:
        return f"target {target} is not the zvol's target"
    return None


def map_as(config: Config, user: Optional[str], nas_node: Optional[str]) -> Optional[str]:
    """The NAS the row of a new mapping records: the sender itself, when a NAS maps."""
    if config.strict and vm_caller(config, user) is Caller.NAS:
        return user
    return nas_node


# -- the NAS -----------------------------------------------------------------
NAS_OPEN = frozenset({"ping"})
NOTIFICATIONS = frozenset({"zvol_synced", "kept_dropped"})


def nas_refusal(config: Config, user: Optional[str], action: str) -> Optional[str]:
    """Why ``user`` may not ask this NAS for ``action`` (None: it may, or it is a
    notification, checked by ``notification_refusal``)."""
    if not config.strict or action in NAS_OPEN or action in NOTIFICATIONS:
        return None
    if user and user in (config.admin_users or ()):
        return None
    return "only an administrator may ask a NAS for it"


def notification_refusal(config: Config, user: Optional[str],
                         remotehost: Optional[str]) -> Optional[str]:
    """A container reports only on a zvol mapped to it (``remotehost``: the row's, None
    when the NAS has no row or the zvol is mapped nowhere)."""
    if not config.strict:
        return None
    if user and user in (config.admin_users or ()):
        return None
    if remotehost is None:
        return "the zvol is mapped to no container here"
    if user != remotehost:
        return f"the zvol is mapped to {remotehost}, not to the sender"
    return None


def kept_refusal(config: Config, user: Optional[str], host: str) -> Optional[str]:
    """A container reports only on the copies it kept itself (``host``: the one named)."""
    if not config.strict:
        return None
    if user and user in (config.admin_users or ()):
        return None
    if user != host:
        return f"it reports for {host}, not for itself"
    return None


# -- saying no ----------------------------------------------------------------
def log_refusal(config: Config, user: Optional[str], action: str, zvol: Optional[str],
                why: str) -> str:
    """The one warning line of a refusal (who, what, which zvol, why); its text."""
    who = user or "an unidentified user"
    what = f"{action} of {zvol}" if zvol else action
    log.warning("refused %s from %s on %s: %s", what,
                f"broker user {user!r}" if user else who, config.name, why)
    return f"{who} may not ask {config.name} for {what}: {why}"


def refused(config: Config, user: Optional[str], action: str, zvol: Optional[str],
            why: str) -> ForbiddenError:
    """The error a refused caller gets, its refusal logged."""
    return ForbiddenError(log_refusal(config, user, action, zvol, why))


def announce(config: Config, role: str) -> None:
    """Say at start whom this node listens to, so an open node is never a surprise."""
    if not config.strict:
        log.warning("admin_users is not set: %s accepts every request from any broker user",
                    config.name)
        return
    admins = ", ".join(config.admin_users or ())
    if role == "nas":
        log.info("strict mode: management from %s; a container's reports only on the zvols "
                 "mapped to it", admins)
    else:
        nases = ", ".join(config.nas_users or ()) or "no NAS (nas_users is empty)"
        log.info("strict mode: requests from administrators %s and from %s, each NAS only "
                 "for the zvols it mapped here", admins, nases)
