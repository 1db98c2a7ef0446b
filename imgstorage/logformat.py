"""How a node's log lines look: the human line (``text``) or one JSON object per line.

``log_format: "json"`` is for log shippers (Loki, Elasticsearch, journald
readers): they index fields, and a regular expression over free text breaks
with the first rewording of a message.  Each line is one object::

    {"time": "2026-11-29T21:25:03.123Z", "level": "INFO", "node": "nas-0-0",
     "logger": "imgstorage.rowstore", "thread": "sync_0", "event": "transition",
     "zvol": "vol1", "from": "local", "to": "pulling", "on": "pull", ...,
     "message": "zvol vol1: local -> pulling on pull (...)"}

``time`` is ISO 8601 in UTC, so lines of nodes in different time zones sort
together.  ``event`` is a short machine name for what happened, given by the
code that logs (``extra={"event": ...}``), and ``log`` for the plain lines
that name none; ``zvol`` is the zvol a line concerns: given the same way, or
else read from messages written as ``zvol %s`` (most of the daemons' lines
about one zvol are), absent when the line concerns none.  Every other field
passed in ``extra`` is kept under its own name; an exception is one string
field, ``exception``.
"""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from typing import Any, Dict, Optional

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"

# What every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", (), None))) | {
    "message", "asctime", "taskName"}
# Fields a record's ``extra`` may not replace: they are the line's own.
_OWN = ("time", "level", "node", "logger", "thread", "event", "zvol", "message")

# printf conversions of a message, to find which argument follows "zvol "
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?"
                         r"([diouxXeEfFgGcrsa%])")
_ZVOL_AT = re.compile(r"\bzvol %s(/%s)?")


def formatter(log_format: str = "text", node: Optional[str] = None) -> logging.Formatter:
    """The formatter of a node's log handlers for its configured ``log_format``."""
    if log_format == "json":
        return JsonFormatter(node)
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}")  # config.py lets no other through


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message are escaped)."""

    def __init__(self, node: Optional[str] = None):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: Dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "node": self.node,
            "logger": record.name,
            "thread": record.threadName,
            "event": getattr(record, "event", None) or "log",
        }
        zvol = getattr(record, "zvol", None) or zvol_of(record)
        if zvol is not None:
            line["zvol"] = str(zvol)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _OWN:
                line[key] = value
        line["message"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def zvol_of(record: logging.LogRecord) -> Optional[str]:
    """The argument a message puts after ``zvol `` (``zvol %s/%s``: the second, the
    first being its pool), when the message has one."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return None
    found = _ZVOL_AT.search(record.msg)
    if found is None:
        return None
    index = _argument_index(record.msg, found.start() + len("zvol "))
    if index is None:
        return None
    if found.group(1):
        index += 1
    if index >= len(record.args):
        return None
    value = record.args[index]
    return value if isinstance(value, str) else None


def _argument_index(msg: str, at: int) -> Optional[int]:
    """Which argument the conversion at ``at`` formats (None with ``*`` widths or names)."""
    index = 0
    for match in _CONVERSION.finditer(msg, 0, at):
        text = match.group(0)
        if match.group(1) == "%":
            continue
        if "*" in text or "(" in text:
            return None
        index += 1
    return index

