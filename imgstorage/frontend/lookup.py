"""Questions to the cluster registry, answered with the sqlite3 module alone.

Most commands only ask the registry whether a host is registered and what it
is (``rocks list host storagemap NAS`` needs to know that NAS is a NAS, then
talks to its daemon).  The registry proper (registry.py) is SQLAlchemy's
mapped classes, and importing those took a command longer than everything
else it did.  ``RegistryReader`` answers the same questions from the same
file through plain queries with bound parameters, read-only; the answers
that need more than a host's row and its attributes (``HostQueries``) are
written once, here, and the registry proper inherits them.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from .. import naming
from ..errors import NotFoundError, ValidationError


@dataclass(frozen=True)
class HostRecord:
    """A registered host as a reader sees it (the columns these questions need)."""

    id: int
    name: str
    appliance: str
    container_id: Optional[int]

    @property
    def is_virtual(self) -> bool:
        return self.container_id is not None


class HostQueries:
    """What is asked of a host beyond its row: its kind, resolved through attributes.

    A subclass gives ``get_host(ref)`` (a host object with ``name``,
    ``appliance`` and ``is_virtual``, or ``unknown host X``) and
    ``attr(host, name)`` (host > appliance > global).
    """

    def get_host(self, ref: Any) -> Any:
        raise NotImplementedError

    def attr(self, ref: Any, name: str) -> Optional[str]:
        raise NotImplementedError

    def attr_bool(self, ref: Any, name: str, default: bool = False) -> bool:
        """A boolean attribute; a value that is not a truth value is an error naming it."""
        host = self.get_host(ref)
        value = self.attr(host, name)
        if value is None or value.strip() == "":
            return default
        try:
            return naming.parse_bool(value)
        except ValidationError:
            raise ValidationError(f"attribute {name} of host {host.name} is {value!r}: "
                                  f"set it to true or false") from None

    def is_nas(self, ref: Any) -> bool:
        host = self.get_host(ref)
        return host.appliance == "nas" or self.attr_bool(host, "img_storage_nas")

    def get_nas(self, ref: Any) -> Any:
        """A registered host that runs img-storage-nas."""
        host = self.get_host(ref)
        if not self.is_nas(host):
            raise ValidationError(f"host {host.name} is not a NAS (its appliance is "
                                  f"{host.appliance}; set its img_storage_nas attribute to true "
                                  f"if it runs img-storage-nas)")
        return host


class RegistryReader(HostQueries):
    """The registry file, read-only, for one command."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    @classmethod
    def open(cls, path: str) -> Optional["RegistryReader"]:
        """A reader of ``path``; None when there is no registry there yet (the registry
        proper creates it, with its defaults)."""
        if not Path(path).is_file():
            return None
        try:
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=10.0)
        except sqlite3.Error:
            return None
        try:
            conn.execute("PRAGMA query_only=1")
            conn.execute("SELECT value FROM registry_meta WHERE key = ?",
                         ("schema_version",)).fetchone()
        except sqlite3.Error:
            conn.close()
            return None
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    def find_host(self, name: str) -> Optional[HostRecord]:
        row = self.conn.execute("SELECT id, name, appliance, container_id FROM hosts "
                                "WHERE name = ?", (name,)).fetchone()
        return HostRecord(*row) if row is not None else None

    def get_host(self, ref: Any) -> HostRecord:
        """The registered host, or ``unknown host X`` (names are checked first)."""
        if isinstance(ref, HostRecord):
            return ref
        name = naming.host_name(ref)
        host = self.find_host(name)
        if host is None:
            raise NotFoundError(f"unknown host {name}")
        return host

    def attr(self, ref: Any, name: str) -> Optional[str]:
        """The value a host sees for ``name``: its own, else its appliance's, else the global one."""
        host = self.get_host(ref)
        for query, params in (
                ("SELECT value FROM host_attrs WHERE host_id = ? AND name = ?", (host.id, name)),
                ("SELECT value FROM appliance_attrs WHERE appliance = ? AND name = ?",
                 (host.appliance, name)),
                ("SELECT value FROM global_attrs WHERE name = ?", (name,))):
            row = self.conn.execute(query, params).fetchone()
            if row is not None:
                return row[0]
        return None
