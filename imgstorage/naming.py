"""Validation of every name and number that arrives from outside.

Names end up in command lines, device paths, iSCSI names and SQL parameters.
They are never interpolated into a shell, but a ``/`` or ``..`` would still
escape a pool or a folder, so each kind of name has one strict pattern here,
shared by the CLI and the daemons.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional

from .errors import ValidationError

_NAME_MAX = 200
# zvol, VM and generic object names: what ZFS allows in a dataset component,
# minus the characters that mean something in a path or a shell.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
# ZFS pool names must begin with a letter.
_POOL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]*\Z")
# RFC 1123 host names, dotted labels allowed (compute-0-3.ibnet).
_HOST_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}\Z")
RESUME_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,4096}\Z")
_IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[A-Za-z0-9.:_-]+\Z")
_RESERVED_POOL_NAMES = {"mirror", "raidz", "raidz1", "raidz2", "raidz3", "spare", "log", "cache"}

GIB = 1 << 30
SECTOR = 512
MAX_SIZE_GB = 1 << 20  # 1 PiB: larger is a typo, not a disk


def _check_str(kind: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"invalid {kind}: expected a string, got {type(value).__name__}")
    if value == "":
        raise ValidationError(f"invalid {kind}: empty")
    if len(value) > _NAME_MAX:
        raise ValidationError(f"invalid {kind}: longer than {_NAME_MAX} characters")
    return value


def _show(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57] + "...")


def zvol_name(value: Any) -> str:
    """A zvol (volume) name: one dataset component, no path."""
    value = _check_str("zvol name", value)
    if ".." in value or not _NAME_RE.match(value):
        raise ValidationError(f"invalid zvol name {_show(value)}: use letters, digits and _ . : -")
    return value


def zpool_name(value: Any) -> str:
    value = _check_str("zpool name", value)
    if ".." in value or not _POOL_RE.match(value) or value in _RESERVED_POOL_NAMES:
        raise ValidationError(f"invalid zpool name {_show(value)}: begin with a letter, then letters, digits and _ . : -")
    return value


def host_name(value: Any) -> str:
    value = _check_str("host name", value)
    if not _HOST_RE.match(value):
        raise ValidationError(f"invalid host name {_show(value)}")
    return value


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def is_host_or_ip(value: Any) -> bool:
    """A name or address a node may be reached at (never anything a socket would misread)."""
    return isinstance(value, str) and bool(_HOST_RE.match(value) or is_ip(value))


def attr_name(value: Any) -> str:
    value = _check_str("attribute name", value)
    if ".." in value or not _ATTR_RE.match(value):
        raise ValidationError(f"invalid attribute name {_show(value)}")
    return value


def attr_value(value: Any) -> Optional[str]:
    """Attribute values are free text, but single-line and bounded."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(f"invalid attribute value: expected a string, got {type(value).__name__}")
    if len(value) > 4096:
        raise ValidationError("invalid attribute value: longer than 4096 characters")
    if any(ord(c) < 32 for c in value):
        raise ValidationError("invalid attribute value: control characters are not allowed")
    return value


def resume_token(value: Any) -> str:
    """A ``zfs receive -s`` resume token, as it travels between daemons and to ``zfs send -t``.

    Checked before a token goes on any command line, so a token that came
    over the wire can never become an option or a second word.
    """
    if not isinstance(value, str) or not RESUME_TOKEN_RE.match(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ValidationError(f"invalid zfs resume token {shown}")
    return value


def iqn(value: Any) -> str:
    value = _check_str("iSCSI target name", value)
    if not _IQN_RE.match(value) or ".." in value:
        raise ValidationError(f"invalid iSCSI target name {_show(value)}")
    return value


def size_gb(value: Any) -> int:
    """A volume size in GB (GiB, as ``zfs create -V 10gb`` means it)."""
    if isinstance(value, bool):
        raise ValidationError("invalid size: expected a whole number of GB")
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("gb"):
            text = text[:-2]
        elif text.lower().endswith("g"):
            text = text[:-1]
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValidationError(f"invalid size {_show(value)}: expected a whole number of GB")
        value = int(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationError(f"invalid size {value}: expected a whole number of GB")
        value = int(value)
    if not isinstance(value, int):
        raise ValidationError("invalid size: expected a whole number of GB")
    if value <= 0:
        raise ValidationError(f"invalid size {value}: must be a positive number of GB")
    if value > MAX_SIZE_GB:
        raise ValidationError(f"invalid size {value}: larger than {MAX_SIZE_GB} GB")
    return value


def non_negative_int(kind: str, value: Any, *, allow_none: bool = True,
                     minimum: int = 0) -> Optional[int]:
    if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
        if allow_none:
            return None
        raise ValidationError(f"invalid {kind}: a value is required")
    if isinstance(value, bool):
        raise ValidationError(f"invalid {kind}: expected a whole number")
    if isinstance(value, str):
        if not re.fullmatch(r"[+-]?\d+", value.strip()):
            raise ValidationError(f"invalid {kind} {_show(value)}: expected a whole number")
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise ValidationError(f"invalid {kind}: expected a whole number")
    if value < minimum:
        raise ValidationError(f"invalid {kind} {value}: must be at least {minimum}")
    if value > (1 << 62):
        raise ValidationError(f"invalid {kind} {value}: too large")
    return value


def parse_bool(value: Any, kind: str = "boolean") -> bool:
    """Rocks-style truth values: true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1", "true", "yes", "on", "y", "t"):
            return True
        if v in ("0", "false", "no", "off", "n", "f", ""):
            return False
    raise ValidationError(f"invalid {kind} {value!r}: use true or false")


_IQN_PREFIX = "iqn.2001-04.com."
# The longest target name every part accepts: RFC 3720 allows 223 bytes, but
# a target name travels through ``iqn()`` above, which takes at most _NAME_MAX.
IQN_MAX = _NAME_MAX
_KERNEL_SAFE_RE = re.compile(r"^[a-z0-9.:-]+\Z")
_IQN_HASH_LEN = 10


def _kernel_safe(name: str) -> bool:
    """Whether LIO (and tgt) keep this target name exactly as given.

    rtslib-fb lowercases a target name and refuses ``_``, so a name with
    capitals or ``_`` could be created once and never be found again.
    """
    return len(name) <= IQN_MAX and bool(_KERNEL_SAFE_RE.match(name))


def target_iqn(nas: str, zvol: str) -> str:
    """The iSCSI target name of a zvol's export on ``nas``: valid for LIO and tgt, one per zvol.

    A name the kernel keeps as given is the original tools' name, so the
    targets of a NAS upgraded in place are still found.  Any other (capitals,
    ``_``, too long) becomes ``iqn.2001-04.com.<nas>:<lowercased zvol>-<hash>``:
    the ``:`` right after the NAS name never follows it in the first form
    (which has ``-`` there), so the two forms cannot meet, and the hash of the
    original name keeps ``Vol1`` and ``vol1`` (or ``a_b`` and ``a-b``) apart.
    """
    plain = f"{_IQN_PREFIX}{nas}-{zvol}"
    if _kernel_safe(plain):
        return plain
    import hashlib      # here: every command imports this module, few need a hash
    digest = hashlib.sha256(f"{nas}/{zvol}".encode()).hexdigest()[:_IQN_HASH_LEN]
    head = f"{_IQN_PREFIX}{nas.lower()}"
    tail = f"-{digest}"
    room = IQN_MAX - len(head) - 1 - len(tail)
    if room < 1:    # an absurdly long NAS name: its own prefix, shortened, stays fixed
        head = head[:IQN_MAX - 1 - 1 - len(tail)]
        room = 1
    body = zvol.lower().replace("_", "-")[:room]
    return f"{head}:{body}{tail}"


def volume_for_vm(vm: str) -> str:
    return f"{vm}-vol"
