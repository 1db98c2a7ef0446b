"""SQLite through SQLAlchemy, set up the same way for every database we keep.

WAL so the daemon's workers can read while one writes; foreign keys on; a
busy timeout so short write contention waits instead of failing.  A
connection is never waited for: every worker of a daemon may be in a short
transaction at once.  The writers of one process go through
imgstorage/groupcommit.py.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import DeclarativeBase

from .errors import ImgStorageError

log = logging.getLogger(__name__)

POOL_KEEP = 16      # connections kept open between transactions (more are opened at need)


def create_private(path: str) -> None:
    """Make the database file 0600 before SQLite opens it.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's mode, so
    a database created 0600 from the start never has a moment, nor a journal,
    that others can read (the NAS keeps CHAP secrets here).  A file an older
    release made wider is narrowed, its journal files with it.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)
    except OSError as exc:
        raise ImgStorageError(f"cannot open the database {path}: "
                              f"{exc.strerror or exc}") from None


def make_engine(path: str) -> Engine:
    if path != ":memory:":
        create_private(path)
    pool = {} if path == ":memory:" else {"pool_size": POOL_KEEP, "max_overflow": -1}
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False,
                                                              "timeout": 30}, **pool)

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
    add_missing_columns(engine, base)
    if engine.url.database and engine.url.database != ":memory:":
        try:
            os.chmod(engine.url.database, 0o600)  # CHAP secrets live here
        except OSError:
            pass


def add_missing_columns(engine: Engine, base: type[DeclarativeBase]) -> None:
    """Bring a database made by an older release up to the models.

    ``create_all`` makes missing tables but never touches existing ones, so a
    daemon upgraded in place would fail on its first query.  New columns are
    always nullable (or have a constant default), which SQLite can add in
    place; nothing is ever dropped or rewritten.
    """
    inspector = inspect(engine)
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        for table in base.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = ""
                if not column.nullable:
                    value = getattr(column.default, "arg", None)
                    if not isinstance(value, (int, float)) or isinstance(value, bool):
                        raise RuntimeError(f"cannot add column {table.name}.{column.name}: "
                                           "it is NOT NULL without a constant default")
                    default = f" NOT NULL DEFAULT {value!r}"
                conn.execute(text(f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN "
                                  f"{preparer.quote(column.name)} {kind}{default}"))
                log.warning("database %s: added column %s.%s (upgrade)", engine.url.database,
                            table.name, column.name)
