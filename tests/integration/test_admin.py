"""imgstorageadmin on real simulated nodes, answered through a real pseudo-terminal.

The state to clean is made the way it happens in production: the daemons map
a zvol in sync mode (throttled, so the copy is still running), then both
daemons die (SIGKILL).  The operator then runs imgstorageadmin on the VM
container and on the NAS, answering the questions as the manual shows, and
the kernel (simulated) and the databases must have changed exactly as
answered, and the zvol must map again afterwards.
"""
from __future__ import annotations

import os
import pty
import re
import select
import sqlite3
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
from sqlalchemy.orm import Session

from imgstorage.db import make_engine
from imgstorage.drivers.sim.dm import device_names
from imgstorage.drivers.sim.initiator import read_sessions
from imgstorage.drivers.sim.target import read_targets
from imgstorage.nas.models import Lock

from .conftest import _cluster, ok

NAS, HOST, POOL = "nas-0-0", "vm-container-0-14", "tank"
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
ENTRY = "from admin.imgstorageadmin import main; main()"
SEPARATOR = "=" * 36
WAIT = 30.0


def target_of(zvol: str) -> str:
    return f"iqn.2001-04.com.{NAS}-{zvol}"


# ------------------------------------------------------------ the terminal
class Terminal:
    """A program on a pseudo-terminal, driven like an operator at a keyboard.

    The terminal echoes what is typed and turns ``\\n`` into ``\\r\\n`` as a real
    one does; the transcript is kept with plain ``\\n`` so failures read well.
    """

    def __init__(self, argv: Sequence[str], env: Dict[str, str]):
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the program, never return into pytest
            try:
                os.execve(argv[0], list(argv), env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.pending = ""          # output not consumed by expect() yet
        self.transcript = ""
        self.closed = False
        self.status: Optional[int] = None

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 4096)
        except OSError:            # EIO: the program closed the terminal (it exited)
            data = b""
        if not data:
            self.closed = True
            return
        text = data.decode("utf-8", errors="replace")
        self.transcript = (self.transcript + text).replace("\r\n", "\n")
        self.pending = (self.pending + text).replace("\r\n", "\n")

    def expect(self, text: str, timeout: float = WAIT) -> str:
        """Everything printed up to and including ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.pending:
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                raise AssertionError(f"expected {text!r}; the session so far:\n{self.transcript}")
            self._read(min(left, 0.5))
        end = self.pending.index(text) + len(text)
        seen, self.pending = self.pending[:end], self.pending[end:]
        return seen

    def answer(self, prompt: str, line: str) -> str:
        """Wait for ``prompt``, type ``line`` and Enter; what was printed before it."""
        seen = self.expect(prompt)
        os.write(self.fd, line.encode() + b"\n")
        return seen

    def key(self, prompt: str, char: bytes) -> str:
        """Wait for ``prompt`` and press a control key (Ctrl-D, Ctrl-C)."""
        seen = self.expect(prompt)
        os.write(self.fd, char)
        return seen

    def wait(self, timeout: float = WAIT) -> int:
        """The exit status, after reading everything the program printed."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read(0.5)
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                os.close(self.fd)
                return self.status
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the program did not exit; the session:\n{self.transcript}")

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.status = -9


def admin_env(cluster, node: str) -> Dict[str, str]:
    env = cluster.env(node)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["IMGSTORAGE_PIDDIR"] = str(cluster.workdir / "run")   # no daemon pid files here
    env["TERM"] = "dumb"
    return env


def terminal(cluster, node: str, *args: str) -> Terminal:
    return Terminal([sys.executable, "-c", ENTRY, *args], admin_env(cluster, node))


def admin(cluster, node: str, *args: str) -> subprocess.CompletedProcess:
    """imgstorageadmin with flags, as a script runs it (no terminal)."""
    return subprocess.run([sys.executable, "-c", ENTRY, *args], env=admin_env(cluster, node),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def numbered(listing: str, pattern: str) -> Dict[str, int]:
    """``{what: number}`` from the lines of a numbered list (``pattern`` has two groups)."""
    found = {}
    for line in listing.splitlines():
        m = re.fullmatch(pattern, line.strip())
        if m:
            found[m.group(2)] = int(m.group(1))
    return found


# ------------------------------------------------------------ the databases
def _row(path: Path, table: str, zvol: str) -> Optional[dict]:
    if not path.exists():
        return None
    db = sqlite3.connect(str(path), timeout=10)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute(f"SELECT * FROM {table} WHERE zvol = ?", (zvol,)).fetchone()
        return dict(row) if row is not None else None
    finally:
        db.close()


def nas_row(cluster, zvol: str) -> Optional[dict]:
    return _row(cluster.db_path(NAS), "nas_zvols", zvol)


def vm_row(cluster, host: str, zvol: str) -> Optional[dict]:
    return _row(cluster.db_path(host), "vm_zvols", zvol)


# ------------------------------------------------------------ the kernel
def sim(cluster, host: str, *args: str, data: Optional[bytes] = None) -> str:
    """``imgstorage-sim`` on ``host``, which must succeed."""
    return ok(cluster.run("sim", *args, "--host", host, input=data, node=host))


def zfs_names(cluster, host: str) -> List[str]:
    return [line.split()[0] for line in sim(cluster, host, "zfs", "list").splitlines()[1:]]


def sessions(cluster, host: str = HOST) -> List[str]:
    return [s["iqn"] for s in read_sessions(cluster.sim_root, host)]


def dm_devices(cluster, host: str = HOST) -> List[str]:
    return list(device_names(cluster.sim_root, host))


def add_stale_lock(cluster, zvol: str, action: str = "unmap_zvol") -> None:
    """The lock a NAS daemon killed in the middle of an operation leaves behind."""
    engine = make_engine(str(cluster.db_path(NAS)))
    try:
        with Session(engine) as s, s.begin():
            s.add(Lock(zvol=zvol, action=action, owner="amq.gen-Esp2W6XQojClmQ7APoHAvQ",
                       caller="guest", since=time.time() - 600, pid=None))
    finally:
        engine.dispose()


def lock_of(cluster, zvol: str):
    engine = make_engine(str(cluster.db_path(NAS)))
    try:
        with Session(engine) as s:
            return s.get(Lock, zvol)
    finally:
        engine.dispose()


# ------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def admin_cluster(tmp_path_factory, vhost):
    c = _cluster(tmp_path_factory, vhost, containers=(HOST,))
    try:
        for args in (["add", "host", NAS, "appliance=nas"],
                     ["add", "host", HOST, "appliance=vm-container"],
                     ["set", "host", "attr", NAS, "img_zpools", POOL]):
            ok(c.rocks(*args))
        yield c
    finally:
        c.stop_all()


def crashed_sync_map(c, zvol: str) -> None:
    """A sync map whose copy is still running when both daemons die."""
    c.start()
    # the zvol, with 3 MiB of data on the NAS for the copy to move
    ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, HOST, "1", "img_sync=false"))
    ok(c.rocks("remove", "host", "storagemap", NAS, zvol))
    sim(c, NAS, "write", f"/dev/zvol/{POOL}/{zvol}", "--offset", "0",
        data=os.urandom(3 * MIB))
    ok(c.rocks("set", "host", "zvolattr", NAS, zvol, "uploadspeed", "20000"))  # minutes
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, HOST, "1",
                     "img_sync=true", f"remotepool={POOL}"))
    dev = out.splitlines()[-1]
    assert dev == f"/dev/mapper/{zvol}-snap", out
    sim(c, HOST, "write", dev, "--offset", "0", data=b"written by the VM after the map" * 100)
    assert nas_row(c, zvol)["state"] == "uploading"
    assert vm_row(c, HOST, zvol)["state"] == "snapshot"
    c.stop(NAS, signal.SIGKILL)
    c.stop(HOST, signal.SIGKILL)


# ------------------------------------------------------------ the sessions
def test_the_manual_session_on_the_container_and_the_nas(admin_cluster):
    c = admin_cluster
    c.start()
    direct = ok(c.rocks("add", "host", "storagemap", NAS, POOL, "keepvol", HOST, "1"))
    assert direct.splitlines()[1].startswith("/dev/sd")
    crashed_sync_map(c, "vol1")
    add_stale_lock(c, "vol1")
    assert {target_of("vol1"), target_of("keepvol")} <= set(sessions(c))
    assert "vol1-snap" in dm_devices(c)
    assert {f"{POOL}/vol1", f"{POOL}/vol1-temp-write"} <= set(zfs_names(c, HOST))

    # ---- on the VM container
    t = terminal(c, HOST)
    try:
        t.answer("Unmap iSCSI target? [y]|n: ", "maybe")
        t.answer("please enter y or n.\nUnmap iSCSI target? [y]|n: ", "")   # Enter: yes
        t.answer("From which NAS? (Don't forget .ibnet if used) ", NAS)
        listing = t.answer("Which target would you like to delete? (number)", "7")
        targets = numbered(listing, r"(\d+) \S+:3260 (\S+) sd[a-z]+")
        assert set(targets) == {target_of("vol1"), target_of("keepvol")}, listing
        t.answer("please enter a number from the list\n"
                 "Which target would you like to delete? (number)", "one")
        t.answer("please enter a number from the list\n"
                 "Which target would you like to delete? (number)", str(targets[target_of("vol1")]))
        done = t.expect(SEPARATOR)
        assert f"WARNING: {target_of('vol1')} is the NAS disk under the snapshot device of " \
               "vol1 (snapshot on vm-container-0-14)" in done, done
        assert f"logged out of {target_of('vol1')}; removed vol1 from the database" in done

        t.answer("Destroy lvm? [y]|n: ", "y")
        listing = t.answer("Which lvm would you like to destroy? (number)", "")
        assert "WARNING: nothing is copied back to the NAS" in listing, listing
        devices = numbered(listing, r"(\d+) (\S+): 0 \d+ snapshot \d+/\d+ \d+")
        assert set(devices) == {"vol1-snap"}, listing
        t.answer(SEPARATOR + "\nRemove zvol? [y]|n: ", "n")
        assert t.wait() == 0, t.transcript
    finally:
        t.kill()
    assert "vol1-snap" in dm_devices(c)     # Enter chose no device: it is still there

    # the operator runs the tool again for the device and the zvols
    t = terminal(c, HOST)
    try:
        t.answer("Unmap iSCSI target? [y]|n: ", "n")
        listing = t.answer("Destroy lvm? [y]|n: ", "Y")
        listing = t.answer("Which lvm would you like to destroy? (number)", "0")
        assert re.search(r"^0 vol1-snap: 0 \d+ snapshot \d+/\d+ \d+$", listing, re.M), listing
        done = t.expect(SEPARATOR)
        assert "removed device-mapper device vol1-snap" in done, done

        t.answer("Remove zvol? [y]|n: ", "")
        listing = t.expect("Which zvol would you like to delete? (number)")
        zvols = numbered(listing, r"(\d+) (\S+)")
        assert zvols == {POOL: 0, f"{POOL}/vol1": 1, f"{POOL}/vol1-temp-write": 2}, listing
        os.write(t.fd, b"0\n")                          # the pool itself: refused
        t.answer("that is a pool: choose zvols only\n"
                 "Which zvol would you like to delete? (number)",
                 f"{zvols[POOL + '/vol1']} {zvols[POOL + '/vol1-temp-write']}")
        done = t.expect(SEPARATOR)
        assert f"WARNING: {POOL}/vol1-temp-write holds writes of vol1's VM that were never " \
               "merged: the NAS does not have them." in done, done
        assert f"destroyed {POOL}/vol1\n" in done and f"destroyed {POOL}/vol1-temp-write" in done
        assert t.wait() == 0, t.transcript
    finally:
        t.kill()
    assert "Traceback" not in t.transcript
    # exactly what was answered changed on the container
    assert sessions(c) == [target_of("keepvol")]
    assert dm_devices(c) == []
    names = zfs_names(c, HOST)
    assert f"{POOL}/vol1" not in names and f"{POOL}/vol1-temp-write" not in names, names
    assert vm_row(c, HOST, "vol1") is None
    assert vm_row(c, HOST, "keepvol")["state"] == "attached"

    # ---- on the NAS
    t = terminal(c, NAS)
    try:
        listing = t.answer("Unmap iSCSI target? [y]|n: ", "y")
        listing = t.expect("Which target number would you like to delete? (number) ")
        numbers = numbered(listing, r"Target (\d+): (\S+)")
        assert set(numbers) == {target_of("vol1"), target_of("keepvol")}, listing
        assert min(numbers.values()) == 1
        os.write(t.fd, f"{numbers[target_of('vol1')]}\n".encode())
        done = t.answer("Remove zvol mapping to VM in DB? [y]|n: ", "")
        assert f"WARNING: {target_of('vol1')} exports vol1 to {HOST} (uploading)" in done, done
        assert f"deleted target {target_of('vol1')}" in done

        listing = t.answer("Which zvol? (number) ", "x")
        rows = numbered(listing, r"(\d+) (\S+) .*")
        assert re.search(rf"^\d+ vol1 {POOL} {re.escape(target_of('vol1'))} {HOST} uploading$",
                         listing, re.M), listing
        assert re.search(rf"^\d+ keepvol {POOL} {re.escape(target_of('keepvol'))} {HOST} mapped$",
                         listing, re.M), listing
        t.answer("please enter a number from the list\nWhich zvol? (number) ", str(rows["vol1"]))
        done = t.answer("Unbusy the zvol? [y]|n: ", "y")
        assert "WARNING: vol1 is uploading with vm-container-0-14: the container may hold the " \
               "only up-to-date data" in done, done
        assert done.endswith("vol1: mapping removed (uploading -> unmapped)\nDone\n"
                             "Unbusy the zvol? [y]|n: "), done

        listing = t.answer("Which zvol? (number) ", "0")
        assert re.search(r"^0 vol1 amq\.gen-Esp2W6XQojClmQ7APoHAvQ unmap_zvol \d+\.\d\d \(",
                         listing, re.M), listing
        assert t.wait() == 0, t.transcript
    finally:
        t.kill()
    assert "Traceback" not in t.transcript
    assert list(read_targets(c.sim_root, NAS)) == [target_of("keepvol")]
    row = nas_row(c, "vol1")
    assert (row["state"], row["zpool"], row["iscsi_target"], row["remotehost"],
            row["remotepool"]) == ("unmapped", POOL, None, None, None), row
    assert lock_of(c, "vol1") is None
    assert nas_row(c, "keepvol")["state"] == "mapped"

    # ---- "vol1 is now in clean unmapped state and is ready for mapping"
    c.start()
    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, "vol1", HOST, "1"))
    assert out.splitlines()[1].startswith("/dev/sd"), out
    ok(c.rocks("remove", "host", "storagemap", NAS, "vol1"))
    ok(c.rocks("remove", "host", "storagemap", NAS, "keepvol"))
    c.stop_all()


def test_end_of_input_and_ctrl_c_stop_cleanly_and_change_nothing(admin_cluster):
    c = admin_cluster
    before = (sessions(c), dm_devices(c), zfs_names(c, HOST))

    t = terminal(c, HOST)
    try:
        t.key("Unmap iSCSI target? [y]|n: ", b"\x04")          # Ctrl-D
        assert t.wait() == 0
    finally:
        t.kill()
    assert "end of input: stopped" in t.transcript and "Traceback" not in t.transcript

    t = terminal(c, HOST)
    try:
        t.answer("Unmap iSCSI target? [y]|n: ", "y")
        t.key("From which NAS? (Don't forget .ibnet if used) ", b"\x03")   # Ctrl-C
        assert t.wait() == 130
    finally:
        t.kill()
    assert "interrupted" in t.transcript and "Traceback" not in t.transcript

    t = terminal(c, NAS)
    try:
        for question in ("Unmap iSCSI target?", "Remove zvol mapping to VM in DB?",
                         "Unbusy the zvol?"):
            t.answer(f"{question} [y]|n: ", "n")
        assert t.wait() == 0
    finally:
        t.kill()
    assert (sessions(c), dm_devices(c), zfs_names(c, HOST)) == before


# ------------------------------------------------------------ the flags
def test_flags_do_the_same_without_questions(admin_cluster):
    c = admin_cluster
    crashed_sync_map(c, "fvol")
    add_stale_lock(c, "fvol", "map_zvol")
    target = target_of("fvol")

    # destroying actions are refused without --yes, and nothing changes
    proc = admin(c, HOST, "--unmap-target", target, "--destroy-dm", "fvol-snap",
                 "--remove-zvol", f"{POOL}/fvol")
    assert proc.returncode == 1, proc
    assert proc.stderr.count("not done; add --yes to do it anyway") == 3, proc.stderr
    assert "WARNING: " in proc.stderr and "Traceback" not in proc.stderr
    assert target in sessions(c) and "fvol-snap" in dm_devices(c)
    assert f"{POOL}/fvol" in zfs_names(c, HOST)

    proc = admin(c, HOST, "--yes", "--unmap-target", target, "--destroy-dm", "fvol-snap",
                 "--remove-zvol", f"{POOL}/fvol", "--remove-zvol", f"{POOL}/fvol-temp-write")
    assert proc.returncode == 0, proc
    said = [line for line in proc.stdout.splitlines()
            if not line.startswith(("WARNING: ", "A container in sync mode"))]
    assert said == [
        f"logged out of {target}; removed fvol from the database",
        "removed device-mapper device fvol-snap",
        f"destroyed {POOL}/fvol",
        f"destroyed {POOL}/fvol-temp-write"], proc.stdout
    assert target not in sessions(c) and "fvol-snap" not in dm_devices(c)
    names = zfs_names(c, HOST)
    assert f"{POOL}/fvol" not in names and f"{POOL}/fvol-temp-write" not in names
    assert vm_row(c, HOST, "fvol") is None

    # again: nothing left to do, one line per refusal
    proc = admin(c, HOST, "--yes", "--destroy-dm", "fvol-snap", "--remove-zvol", f"{POOL}/fvol")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: removing fvol-snap: no device-mapper device fvol-snap on {HOST}",
        f"error: destroying {POOL}/fvol: no zvol {POOL}/fvol on {HOST}"], proc.stderr
    proc = admin(c, HOST, "--yes", "--remove-zvol", POOL)
    assert proc.returncode == 1 and "is not a zvol: expected POOL/ZVOL" in proc.stderr
    proc = admin(c, HOST, "--unbusy", "fvol")
    assert proc.returncode == 2 and "--unbusy cannot be used on a VM container" in proc.stderr

    # the NAS: the mapping of a zvol whose copy was running is refused without --yes
    proc = admin(c, NAS, "--unmap-target", target, "--clear-mapping", "fvol", "--unbusy", "fvol")
    assert proc.returncode == 1, proc
    assert proc.stderr.count("not done; add --yes") == 2, proc.stderr   # target, mapping
    assert "released the map_zvol lock" in proc.stdout
    assert lock_of(c, "fvol") is None
    assert nas_row(c, "fvol")["state"] == "uploading"

    proc = admin(c, NAS, "--yes", "--unmap-target", target, "--clear-mapping", "fvol")
    assert proc.returncode == 0, proc
    assert proc.stdout.splitlines()[-1] == "fvol: mapping removed (uploading -> unmapped)"
    assert target not in read_targets(c.sim_root, NAS)
    row = nas_row(c, "fvol")
    assert (row["state"], row["zpool"], row["iscsi_target"], row["remotehost"],
            row["remotepool"]) == ("unmapped", POOL, None, None, None), row

    proc = admin(c, NAS, "--unbusy", "fvol", "--clear-mapping", "nosuch")
    assert proc.returncode == 1
    assert sorted(proc.stderr.splitlines()) == [
        f"error: clearing nosuch: no zvol nosuch in the database of {NAS}",
        f"error: unbusying fvol: fvol is not busy on {NAS}"], proc.stderr
    proc = admin(c, NAS, "--destroy-dm", "x")
    assert proc.returncode == 2 and "cannot be used on a NAS" in proc.stderr

    # every change made by hand is in the daemons' own logs, with who made it
    nas_log = c.log_path(NAS).read_text()
    assert re.search(r"imgstorageadmin \(\S+.*\): fvol: mapping removed \(uploading -> unmapped\)",
                     nas_log), nas_log[-2000:]
    assert "failed: fvol is not busy" in nas_log
    assert "imgstorageadmin (" in c.log_path(HOST).read_text()
    assert f"): destroyed {POOL}/fvol-temp-write" in c.log_path(HOST).read_text()


def test_role_comes_from_the_database_or_the_flag(admin_cluster, tmp_path):
    c = admin_cluster
    conf = tmp_path / "fresh.conf"
    conf.write_text(c.config_path(HOST).read_text().replace(str(c.db_path(HOST)),
                                                             str(tmp_path / "none.db")))
    env = admin_env(c, HOST)
    env["IMGSTORAGE_CONF"] = str(conf)
    proc = subprocess.run([sys.executable, "-c", ENTRY, "--destroy-dm", "x"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("pass --role nas or --role vm"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    proc = subprocess.run([sys.executable, "-c", ENTRY, "--role", "vm", "--yes",
                           "--destroy-dm", "x"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: removing x: no device-mapper device x on {HOST}"]

    proc = subprocess.run([sys.executable, "-c", ENTRY, "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "Unmap iSCSI target?" in proc.stdout
