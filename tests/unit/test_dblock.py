"""One daemon per database; a zvol lock is released at start only when its process is gone."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

from imgstorage import dblock
from imgstorage.errors import BusyError, ImgStorageError
from imgstorage.nas import main as nas_main
from imgstorage.nas.models import Lock
from imgstorage.vm import main as vm_main

from .nas_stub import nas_service

# A stand-in daemon: its command line names the NAS daemon's module, it holds
# the database given as its argument and waits until its stdin closes.
HOLDER = ("import sys, imgstorage.nas.main; from imgstorage import dblock; "
          "dblock.claim(sys.argv[1]); print('holding', flush=True); sys.stdin.read()")
# An unrelated process: alive, but no daemon.
SLEEPER = "import sys; print('up', flush=True); sys.stdin.read()"


class Process:
    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() in ("holding", "up")
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture(autouse=True)
def _release():
    yield
    dblock.release_all()


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "nas.db")


def test_claim_writes_our_pid_in_a_private_lock_file(db):
    dblock.claim(db)
    assert dblock.holder(db) == os.getpid()
    assert stat.S_IMODE(os.stat(dblock.lock_path(db)).st_mode) == 0o600


def test_a_second_claim_names_the_holder(db):
    holder = Process(HOLDER, db)
    try:
        with pytest.raises(BusyError) as err:
            dblock.claim(db)
        assert str(err.value) == f"{db} is in use by another daemon (pid {holder.pid})"
    finally:
        holder.stop()
    dblock.claim(db)            # its holder gone, the database is free again
    assert dblock.holder(db) == os.getpid()


def test_a_holder_that_died_leaves_the_database_free(db):
    holder = Process(HOLDER, db)
    holder.proc.kill()
    holder.proc.wait(10)
    holder.proc.stdout.close()
    dblock.claim(db)
    assert dblock.holder(db) == os.getpid()


def test_only_a_live_daemon_holding_the_database_counts_as_alive(db, tmp_path):
    other_db = str(tmp_path / "other.db")
    daemon, sleeper = Process(HOLDER, db), Process(SLEEPER)
    try:
        assert dblock.daemon_alive(daemon.pid, db)
        assert not dblock.daemon_alive(daemon.pid, other_db)      # not this database's
        assert not dblock.daemon_alive(sleeper.pid, db)           # a reused pid
        assert not dblock.daemon_alive(os.getpid(), db)           # ours: no lock taken yet
        assert not dblock.daemon_alive(None, db)
    finally:
        daemon.stop()
        sleeper.stop()
    assert not dblock.daemon_alive(daemon.pid, db)                # gone


# --------------------------------------------------------- stale zvol locks
def test_recovery_releases_the_locks_of_processes_that_are_not_a_live_daemon(tmp_path):
    service, _ = nas_service(tmp_path)
    db = service.config.db
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    daemon, sleeper = Process(HOLDER, db), Process(SLEEPER)
    try:
        owners = {"dead": dead.pid, "unrelated": sleeper.pid, "ours": os.getpid(),
                  "daemon": daemon.pid}
        for zvol, pid in owners.items():
            service.store.lock(zvol, "map_zvol", None, None)
            with service.store.session() as s, s.begin():
                s.get(Lock, zvol).pid = pid
        service.recover()
        assert [lock.zvol for lock in service.store.locks()] == ["daemon"]
    finally:
        daemon.stop()
        sleeper.stop()


# ------------------------------------------------------ a second daemon
@pytest.mark.parametrize("main,program", [(nas_main, "img-storage-nas"),
                                          (vm_main, "img-storage-vm")])
def test_a_second_daemon_on_the_database_refuses_to_start_and_changes_nothing(
        tmp_path, main, program):
    db = str(tmp_path / "node.db")
    conf = tmp_path / "node.conf"
    conf.write_text(json.dumps({"name": "node-0-0", "db": db, "broker_url": "amqp://127.0.0.1:1",
                                "backend": "sim", "sim_root": str(tmp_path / "sim"),
                                "log_file": str(tmp_path / "node.log")}))
    holder = Process(HOLDER, db)
    try:
        before = sorted(os.listdir(tmp_path))
        result = CliRunner().invoke(main.cli, ["--config", str(conf)])
        assert result.exit_code == 1
        assert result.output == f"{program}: {db} is in use by another daemon (pid {holder.pid})\n"
        assert set(os.listdir(tmp_path)) - set(before) <= {"node.log"}     # no database made
        assert not os.path.exists(db)
        assert dblock.holder(db) == holder.pid
    finally:
        holder.stop()


def test_a_lock_file_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ImgStorageError, match=f"cannot open {blocker}/nas.db.lock: "):
        dblock.claim(str(blocker / "nas.db"))
