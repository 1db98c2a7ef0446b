"""SQLite through SQLAlchemy, set up the same way for every database we keep.

WAL so the daemon's workers can read while one writes; foreign keys on; a
busy timeout so short write contention waits instead of failing.
"""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase


def make_engine(path: str) -> Engine:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False,
                                                              "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # pragma: no branch - runs per connection
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def create_schema(engine: Engine, base: type[DeclarativeBase]) -> None:
    base.metadata.create_all(engine)
    if engine.url.database and engine.url.database != ":memory:":
        try:
            os.chmod(engine.url.database, 0o600)  # CHAP secrets live here
        except OSError:
            pass
