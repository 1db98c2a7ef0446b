"""Rocks-style table output.

Operators and their scripts read these tables the way they read the original
``rocks list ...`` output, so the layout follows Rocks exactly: upper-case
headers, the owner (host) first as ``owner:``, every column padded to its
widest cell with one space between, and an empty cell shown as dashes so that
``awk``-style column splitting never shifts.  ``output-format=json`` gives the
same rows for programs that would rather not parse text.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .. import naming
from ..errors import ValidationError

FORMATS = ("table", "json")
OUTPUT_PARAMS = ("output-header", "output-col", "output-format")


@dataclass(frozen=True)
class OutputOptions:
    """The standard Rocks ``output-*`` parameters, already checked."""

    header: bool = True
    columns: Optional[Sequence[str]] = None
    format: str = "table"

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "OutputOptions":
        """Check the output parameters once, before any work is done."""
        header = True
        if "output-header" in params:
            header = naming.parse_bool(params["output-header"], "output-header value")
        columns = None
        if "output-col" in params:
            columns = [c.strip().lower() for c in params["output-col"].split(",") if c.strip()]
            if not columns:
                raise ValidationError("output-col needs at least one column name")
        fmt = params.get("output-format", "table").strip().lower()
        if fmt not in FORMATS:
            raise ValidationError(f"invalid output-format {params['output-format']!r}: "
                                  f"use {' or '.join(FORMATS)}")
        return cls(header=header, columns=columns, format=fmt)


@dataclass
class Table:
    """Rows to print; ``owner`` says whether the first column names the row's owner.

    ``trim_owner=False`` keeps the owner column even when every row has the
    same owner, as Rocks does for listings whose rows *are* the hosts (a
    ``list host vm`` of one VM must still name it).
    """

    headers: Sequence[str]
    owner: bool = True
    trim_owner: bool = True
    rows: List[List[Any]] = field(default_factory=list)
    data: List[Mapping[str, Any]] = field(default_factory=list)

    def add(self, *cells: Any, data: Optional[Mapping[str, Any]] = None) -> None:
        """One row; ``data`` holds raw values that only the JSON output carries.

        A table cell is written for a person (``0:00:32``, an error cut to its
        first words); a program reading JSON wants the figure itself (the
        epoch, the whole error).  ``data`` keys are added to the row's object,
        and replace a column of the same name, unless ``output-col`` chose
        the columns.
        """
        if len(cells) != len(self.headers):
            raise ValueError(f"row has {len(cells)} cells for {len(self.headers)} columns")
        self.rows.append(list(cells))
        self.data.append(dict(data or {}))

    def render(self, options: OutputOptions = OutputOptions()) -> str:
        """The text to print (without a final newline); empty when there are no rows."""
        headers, rows, owner = self._select(options.columns)
        if options.format == "json":
            return render_json(headers, rows, None if options.columns else self.data)
        return "\n".join(render_lines(headers, rows, owner=owner, header=options.header,
                                      trim_owner=self.trim_owner))

    def _select(self, wanted: Optional[Sequence[str]]):
        headers = [h.upper() for h in self.headers]
        if not wanted:
            return headers, self.rows, self.owner
        index = {h.lower(): i for i, h in enumerate(headers)}
        unknown = [c for c in wanted if c not in index]
        if unknown:
            raise ValidationError(f"unknown output column {unknown[0]!r}: choose from "
                                  + ", ".join(h.lower() for h in headers))
        picked = [index[c] for c in wanted]
        # The owner keeps its meaning only where Rocks would print it: first.
        owner = self.owner and picked[0] == 0
        return ([headers[i] for i in picked],
                [[row[i] for i in picked] for row in self.rows], owner)


def is_empty(value: Any) -> bool:
    return value is None or value == ""


def cell_text(value: Any) -> str:
    """How one value looks in a table (empty values are handled by the caller)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def render_lines(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, owner: bool = True,
                 header: bool = True, trim_owner: bool = True) -> List[str]:
    """Lay out rows as Rocks does; ``owner`` treats column 0 as the row's owner."""
    if not rows:
        return []
    headers = [h.upper() for h in headers]
    cells: List[List[Optional[str]]] = [
        [None if is_empty(v) else cell_text(v) for v in row] for row in rows]
    if owner and headers:
        owners = {row[0] for row in cells}
        if trim_owner and len(owners) == 1:
            # One owner for every row says nothing: Rocks drops the column.
            headers = headers[1:]
            cells = [row[1:] for row in cells]
        else:
            cells = [[None if row[0] is None else row[0] + ":"] + row[1:] for row in cells]
    if not headers:
        return []
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            if text is not None and len(text) > widths[i]:
                widths[i] = len(text)

    def line(values: Sequence[Optional[str]]) -> str:
        return " ".join("-" * w if v is None else v.ljust(w) for v, w in zip(values, widths))

    out = [line(headers)] if header else []
    out.extend(line(row) for row in cells)
    return out


def render_json(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                data: Optional[Sequence[Mapping[str, Any]]] = None) -> str:
    """The same rows as objects; the owner is kept, since a program cannot guess it."""
    keys = [h.lower() for h in headers]
    objects: List[Dict[str, Any]] = [dict(zip(keys, row)) for row in rows]
    for obj, extra in zip(objects, data or ()):
        obj.update(extra)
    return json.dumps(objects, indent=2, default=str)


def elapsed(start: Any, now: float) -> Optional[str]:
    """``h:mm:ss`` since an epoch, like the original's TIME column; None when unknown."""
    if start is None or isinstance(start, bool):
        return None
    try:
        seconds = int(now - float(start))
    except (TypeError, ValueError):
        return None
    return str(timedelta(seconds=max(0, seconds)))


def age(epoch: Any, now: float) -> Optional[str]:
    """How long ago an epoch was: ``h:mm:ss``, and ``2d 3:04:05`` past a day; None when
    there is none.

    The SAFE column is read at a glance, and ``timedelta``'s ``2 days,
    3:04:05`` is twice as wide as it needs to be.  A time ahead of ``now``
    (the NAS's clock ahead of the frontend's) counts as ``0:00:00``.
    """
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch):
        return None
    return duration(now - epoch)


def duration(seconds: float) -> str:
    """Whole seconds as ``h:mm:ss``, with the days in front (``2d 3:04:05``) past a day."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def countdown(epoch: Any, now: float) -> Optional[str]:
    """``h:mm:ss`` until an epoch (``0:00:00`` once it is due); None when there is none."""
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool):
        return None
    return str(timedelta(seconds=max(0, int(math.ceil(epoch - now)))))


ERROR_WIDTH = 40


def short_error(text: Any, failures: Any = None) -> Optional[str]:
    """An error as a table cell: its first line, cut to ERROR_WIDTH, and how often it came.

    The whole text stays in the JSON output and in the daemon's log; a table
    row must stay one readable line.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    line = text.strip().splitlines()[0].strip()
    if len(line) > ERROR_WIDTH:
        line = line[:ERROR_WIDTH - 3].rstrip() + "..."
    if isinstance(failures, int) and not isinstance(failures, bool) and failures > 1:
        line += f" (x{failures})"
    return line


def percent(value: Any) -> Optional[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return f"{value:.0f}%"


def rate(value: Any) -> Optional[str]:
    """Bytes per second as an operator reads them."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return None
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if value < 1000 or unit == "GB/s":
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1000.0
    return None  # pragma: no cover


def synced(figures: Any, share: Any) -> Optional[str]:
    """The kernel's own figures, then how much of the merge is done."""
    if not isinstance(figures, str) or not figures:
        return None
    pct = percent(share)
    return f"{figures} ({pct})" if pct else figures
