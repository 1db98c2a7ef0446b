"""The JSON messages nodes exchange, and how a body becomes a checked request.

Action names and field names are those of the original tools so that the
wire format stays compatible; replies are ``{"action", "status", "error"?}``.
Every field of every request is checked here before a handler sees it, so a
malformed or hostile message gets an error reply and changes nothing.
"""
from __future__ import annotations

import json
from enum import Enum
from typing import Any, Dict, Optional

from . import naming
from .errors import ValidationError

# Size limits, checked by whoever reads a message.
#
# Requests are small: the largest a caller sends is ``set_attrs`` with a few
# attribute values (4096 characters each at most) or ``map_zvol`` with names of
# at most a few hundred characters; 64 KiB is ten times what any of them needs,
# and bounds what a hostile sender can make a daemon parse.
#
# Replies carry listings.  A listing row of a zvol is about 100 bytes when it
# is unmapped and 200 when it is mapped (measured with the project's own names;
# benchmarks/bench_list_zvols.py), and about 2.5 KB at worst (every name at its
# longest and a 1000-character error), so 1 MiB holds a whole NAS of 1000 busy
# zvols at worst and 5000 typical ones, far below the broker's own message
# limit.  A listing that does not fit is sent in pages (imgstorage/paging.py),
# so the limit only bounds what a caller must hold in memory at once.
MAX_REQUEST = 64 * 1024
MAX_REPLY = 1024 * 1024
MAX_BODY = MAX_REQUEST          # the name older code knew the request limit by

# request action -> reply action (the original names)
REPLY_ACTION = {
    "map_zvol": "zvol_mapped",
    "unmap_zvol": "zvol_unmapped",
    "del_zvol": "zvol_deleted",
    "list_zvols": "zvol_list",
    "list_dev": "dev_list",
    "sync_zvol": "sync_zvol",          # acknowledged at once; zvol_synced follows the merge
    "recv_zvol": "recv_zvol",
    "send_zvol": "send_zvol",
    "del_local": "del_local",
    "clean_zvol": "clean_zvol",
    "get_zvol_attrs": "get_zvol_attrs",
    "set_zvol_attrs": "set_zvol_attrs",
    "get_attrs": "get_attrs",
    "set_attrs": "set_attrs",
    "del_attrs": "del_attrs",
    "initiator_name": "initiator_name",
    "ping": "pong",
}

ZVOL_ATTRS = ("frequency", "nextsync", "uploadspeed", "downloadspeed")


class ContainerState(str, Enum):
    """A zvol's state on its VM container, as ``list_dev`` and ``recv_zvol`` report it.

    The NAS reads these to learn where a copy or a merge stands; both sides
    name them from here so that the wire values are written once
    (imgstorage/vm/states.py holds the transitions between them).
    """
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    SNAPSHOT = "snapshot"
    MERGING = "merging"
    SWITCHING = "switching"
    LOCAL = "local"
    FLUSHING = "flushing"
    FLUSHED = "flushed"
    DETACHED_LOCAL = "detached_local"
    KEPT = "kept"
    BROKEN = "broken"


def decode(body: bytes, limit: int = MAX_REQUEST) -> Dict[str, Any]:
    """Parse a message body; anything but a JSON object with an action is rejected.

    ``limit`` is MAX_REQUEST for what a daemon receives and MAX_REPLY for what
    a caller receives back: the size is checked before any parsing.
    """
    if len(body) > limit:
        raise ValidationError(f"message too large ({len(body)} bytes, at most {limit})")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("malformed message: expected a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise ValidationError("malformed message: no action")
    return data


def encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode("utf-8")


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes inside an encoded message (how pages are measured)."""
    return len(json.dumps(value, sort_keys=True).encode("utf-8"))


def oversized(message: Dict[str, Any], size: int) -> Dict[str, Any]:
    """The error reply sent instead of a reply over MAX_REPLY.

    A caller cannot read a reply over the limit; telling it why in a reply it
    can read beats an answer it can only call unreadable.
    """
    return error(str(message.get("action") or ""),
                 f"the reply would be {size} bytes, more than the {MAX_REPLY} a reply may carry",
                 code="too_large")


def success(action: str, **fields: Any) -> Dict[str, Any]:
    reply = {"action": REPLY_ACTION.get(action, action), "status": "success"}
    reply.update(fields)
    return reply


def error(action: Optional[str], text: str, code: str = "error") -> Dict[str, Any]:
    """An error reply: the text for people, ``code`` (see errors.py) for programs."""
    return {"action": REPLY_ACTION.get(action or "", action or "error"), "status": "error",
            "error": text, "code": code}


def error_code(reply: Dict[str, Any]) -> str:
    """The reply's code; ``error`` for a reply from a node that sends none."""
    code = reply.get("code")
    return code if isinstance(code, str) and code else "error"


def field(msg: Dict[str, Any], name: str, check, *, required: bool = True, default: Any = None) -> Any:
    """Fetch and validate one field of a request."""
    if name not in msg or msg[name] is None:
        if required:
            raise ValidationError(f"missing field '{name}'")
        return default
    return check(msg[name])


def optional_name(check):
    """A validator that also accepts null / empty for optional names."""
    def _check(value: Any) -> Optional[str]:
        if value in (None, ""):
            return None
        return check(value)
    return _check


def bool_field(value: Any) -> bool:
    return naming.parse_bool(value, "sync flag")
