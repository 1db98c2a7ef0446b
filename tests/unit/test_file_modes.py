"""Databases, their journal files and written configuration files are 0600 from the start.

Every check runs under a permissive umask, so a file that is private only
because of the umask would fail it.
"""
from __future__ import annotations

import os
import stat

import pytest
from sqlalchemy import text

from imgstorage import dblock
from imgstorage.db import create_private, make_engine
from imgstorage.errors import ImgStorageError
from imgstorage.frontend.registry import Registry
from imgstorage.simcluster import SimCluster


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def open_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)
    dblock.release_all()


def write_through(engine) -> None:
    """A write that leaves the WAL and shared-memory files in place (the engine stays open)."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))


def test_a_new_database_and_its_journal_files_are_private_before_any_schema(tmp_path):
    db = str(tmp_path / "db" / "nas.db")
    engine = make_engine(db)
    write_through(engine)
    for path in (db, db + "-wal", db + "-shm"):
        assert os.path.exists(path) and mode(path) == 0o600, path
    engine.dispose()


def test_a_database_an_older_release_left_readable_is_narrowed(tmp_path):
    db = str(tmp_path / "nas.db")
    engine = make_engine(db)
    write_through(engine)
    for path in (db, db + "-wal", db + "-shm"):
        os.chmod(path, 0o644)
    create_private(db)
    assert [mode(p) for p in (db, db + "-wal", db + "-shm")] == [0o600] * 3
    engine.dispose()


def test_a_database_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ImgStorageError, match=f"cannot open the database {blocker}/nas.db: "):
        create_private(str(blocker / "nas.db"))


def test_the_database_lock_file_is_private(tmp_path):
    db = str(tmp_path / "vm.db")
    dblock.claim(db)
    assert mode(dblock.lock_path(db)) == 0o600


def test_the_frontend_registry_is_private_with_its_journal_files(tmp_path):
    path = tmp_path / "frontend.db"
    registry = Registry(str(path))
    write_through(registry.engine)
    for p in (path, f"{path}-wal", f"{path}-shm"):
        assert mode(p) == 0o600, p
    registry.engine.dispose()


def test_node_configurations_written_for_a_simulated_cluster_are_private(tmp_path):
    cluster = SimCluster(tmp_path / "c", "amqp://127.0.0.1:1")
    configs = [cluster.config_path(n) for n in cluster.nas + cluster.containers + ["frontend"]]
    assert [mode(p) for p in configs] == [0o600] * len(configs)
    os.chmod(configs[0], 0o644)
    cluster.write_config(cluster.nas[0])
    assert mode(configs[0]) == 0o600
