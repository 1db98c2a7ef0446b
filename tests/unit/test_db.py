"""The schema upgrade: a database made by an older release gains the new columns."""
import sqlite3

from sqlalchemy import select

from imgstorage.db import create_schema, make_engine
from imgstorage.nas.models import Base, Zvol


def test_an_old_database_gains_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "nas.db"
    con = sqlite3.connect(path)
    # nas_zvols as an older release made it: no transfer_snapshot column
    con.execute("CREATE TABLE nas_zvols (zvol VARCHAR(200) PRIMARY KEY, zpool VARCHAR(200), "
                "size_bytes INTEGER, state VARCHAR(32), iscsi_target VARCHAR(300) UNIQUE, "
                "remotehost VARCHAR(253), remotepool VARCHAR(200), sync BOOLEAN, "
                "bdev VARCHAR(300), initiator VARCHAR(300), chap_user VARCHAR(64), "
                "chap_secret VARCHAR(64), state_since FLOAT, prior_state VARCHAR(32), "
                "last_snapshot VARCHAR(200), retry_at FLOAT, failures INTEGER, "
                "last_error VARCHAR(1000))")
    con.execute("INSERT INTO nas_zvols (zvol, zpool, state, sync, state_since, failures, "
                "last_snapshot) VALUES ('vm-1-vol', 'tank', 'local', 1, 0, 0, 'IMG-STORAGE-x')")
    con.commit()
    con.close()

    engine = make_engine(str(path))
    create_schema(engine, Base)
    create_schema(engine, Base)          # a second start changes nothing
    from sqlalchemy.orm import Session
    with Session(engine) as s:
        row = s.scalars(select(Zvol)).one()
        assert (row.zvol, row.state, row.last_snapshot) == ("vm-1-vol", "local", "IMG-STORAGE-x")
        assert row.transfer_snapshot is None
        row.transfer_snapshot = "IMG-STORAGE-y"
        s.commit()
    columns = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(nas_zvols)")]
    assert columns.count("transfer_snapshot") == 1


def test_a_fresh_database_has_every_column(tmp_path):
    engine = make_engine(str(tmp_path / "fresh.db"))
    create_schema(engine, Base)
    with engine.connect() as conn:
        columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(nas_zvols)")}
    assert {c.name for c in Zvol.__table__.columns} == columns
