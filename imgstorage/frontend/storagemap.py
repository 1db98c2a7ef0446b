"""The ``rocks list host storagemap`` table, built from the NASes' ``list_zvols`` rows.

The manual's columns come first and always (ZVOL HOST ZPOOL TARGET STATE
TIME, after the NAS when several are listed), so scripts written for the
original keep working; the others appear only while some row has something
to say in them: a running transfer's PROGRESS and RATE, how long ago the
NAS last had every write of a zvol that runs from a container's copy (SAFE),
the next periodic pull (NEXTSYNC), and the last error with the next retry.
SAFE sits beside NEXTSYNC, before it: together they read as "the last pull
that arrived, the next one due".

Building the table is kept apart from fetching the rows so that the one-shot
listing and watch mode (watch.py) show exactly the same thing, and so that
it can be checked without a broker.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .tables import Table, age, countdown, elapsed, percent, rate, short_error

SEED_COLUMNS = ("NAS", "ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME")
# Optional columns in their order; PROGRESS and RATE come and go together.
OPTIONAL_COLUMNS = ("PROGRESS", "RATE", "SAFE", "NEXTSYNC", "ERROR", "NEXT-RETRY")
# The zvol is on the container's copy and a periodic pull is due (``lifecycle``).
_NEXTSYNC_STATES = ("local", "pulling")


@dataclass(frozen=True)
class Transfer:
    """A copy or pull that runs now, with what a progress bar needs."""

    nas: str
    zvol: str
    state: str                      # as the STATE column shows it (NAS->VM, ...)
    percent: Optional[float]        # share of the estimated stream, None when unknown
    rate: Optional[float]           # bytes per second lately
    eta: Optional[float]            # seconds left, None when unknown


@dataclass
class Listing:
    """What one listing shows: the table, and the transfers running in it."""

    table: Table
    transfers: List[Transfer] = field(default_factory=list)


def build(answers: Sequence[Tuple[str, Sequence[Mapping[str, Any]]]], now: float) -> Listing:
    """The table of every NAS's rows (``answers``: NAS name, its rows), seen at ``now``."""
    cells: List[Dict[str, Any]] = []
    data: List[Dict[str, Any]] = []
    transfers: List[Transfer] = []
    for nas, rows in answers:
        for row in rows:
            nextsync = row.get("nextsync") if row.get("lifecycle") in _NEXTSYNC_STATES else None
            cells.append({
                "NAS": nas, "ZVOL": row.get("zvol"), "HOST": row.get("remotehost"),
                "ZPOOL": row.get("zpool"), "TARGET": row.get("iscsi_target"),
                "STATE": row.get("state"), "TIME": elapsed(row.get("time"), now),
                "PROGRESS": percent(row.get("progress")), "RATE": rate(row.get("rate")),
                "SAFE": age(row.get("recovery_point"), now), "NEXTSYNC": when(nextsync),
                "ERROR": short_error(row.get("error"), row.get("failures")),
                "NEXT-RETRY": countdown(row.get("retry_at"), now)})
            data.append({"error": row.get("error"), "failures": row.get("failures") or 0,
                         "retry_at": row.get("retry_at"),
                         "recovery_point": _number(row.get("recovery_point"))})
            transfer = _transfer(nas, row, now)
            if transfer is not None:
                transfers.append(transfer)
    used = {name for name in OPTIONAL_COLUMNS if any(c[name] for c in cells)}
    if used & {"PROGRESS", "RATE"}:
        used |= {"PROGRESS", "RATE"}
    headers = list(SEED_COLUMNS) + [name for name in OPTIONAL_COLUMNS if name in used]
    # JSON: the figures themselves beside the columns written for people
    raw: List[str] = []
    if used & {"ERROR", "NEXT-RETRY"}:
        raw += ["error", "failures", "retry_at"]
    if "SAFE" in used:
        raw.append("recovery_point")
    table = Table(headers)
    for row_cells, row_data in zip(cells, data):
        table.add(*(row_cells[h] for h in headers),
                  data={key: row_data[key] for key in raw} if raw else None)
    return Listing(table, transfers)


def when(epoch: Any) -> Optional[str]:
    """A next-sync time as the original printed it: ``Tue 14:05.09``."""
    if _number(epoch) is None:
        return None
    return time.strftime("%a %H:%M.%S", time.localtime(epoch))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _transfer(nas: str, row: Mapping[str, Any], now: float) -> Optional[Transfer]:
    """The row's running transfer: a NAS lists progress and rate only while one runs."""
    share, speed = _number(row.get("progress")), _number(row.get("rate"))
    if share is None and speed is None:
        return None
    eta = _number(row.get("eta"))
    started = _number(row.get("time"))
    if eta is None and share and started is not None and 0 < share < 100:
        # a NAS that sends no ETA: what the average speed so far leaves
        eta = max(0.0, now - started) * (100.0 - share) / share
    return Transfer(nas=nas, zvol=str(row.get("zvol")), state=str(row.get("state")),
                    percent=share, rate=speed, eta=eta)
