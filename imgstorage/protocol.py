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

MAX_BODY = 64 * 1024

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
    BROKEN = "broken"


def decode(body: bytes) -> Dict[str, Any]:
    """Parse a message body; anything but a JSON object with an action is rejected."""
    if len(body) > MAX_BODY:
        raise ValidationError(f"message too large ({len(body)} bytes, at most {MAX_BODY})")
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


def success(action: str, **fields: Any) -> Dict[str, Any]:
    reply = {"action": REPLY_ACTION.get(action, action), "status": "success"}
    reply.update(fields)
    return reply


def error(action: Optional[str], text: str) -> Dict[str, Any]:
    return {"action": REPLY_ACTION.get(action or "", action or "error"), "status": "error",
            "error": text}


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
