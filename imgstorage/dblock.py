"""One daemon per database, and who that daemon is.

Two daemons on one SQLite database would each take the other's zvol locks
for stale, run recovery over the other's work in flight and drive the same
kernel objects.  The first daemon holds an exclusive ``flock`` on
``<db>.lock`` (the lock file also records its pid) for as long as it runs;
a second one is refused before it changes anything.  The kernel drops the
lock when its holder dies, however it dies, so a crash never leaves the
database claimed.

``flock`` rather than POSIX record locks: those vanish when the process
closes *any* descriptor of the file, which reading the pid back would do.
"""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import List, Optional

from .errors import BusyError, ImgStorageError

# How a daemon's command line names it: the installed scripts or their modules.
_DAEMON_RE = re.compile(r"img-storage-(nas|vm)\b|imgstorage\.(nas|vm)\.main\b")

# Descriptors of the locks this process holds: kept open until it exits.
_held: List[int] = []


def lock_path(db: str) -> str:
    return f"{db}.lock"


def _in_memory(db: str) -> bool:
    return db in ("", ":memory:")


def holder(db: str) -> Optional[int]:
    """The pid recorded in the database's lock file (None when there is none or it is unreadable)."""
    try:
        text = Path(lock_path(db)).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def claim(db: str) -> None:
    """Hold the database for this process, or refuse with one line naming the holder.

    Called before the daemon opens the database, so a refused start changes
    nothing.  The lock file is created 0600 like the database beside it.
    """
    if _in_memory(db):
        return
    path = lock_path(db)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ImgStorageError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder(db)
        raise BusyError(f"{db} is in use by another daemon "
                        f"({f'pid {pid}' if pid else 'pid unknown'})") from None
    except OSError as exc:
        os.close(fd)
        raise ImgStorageError(f"cannot lock {path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.append(fd)


def release_all() -> None:
    """Let go of every database this process holds (tests; a daemon just exits)."""
    while _held:
        os.close(_held.pop())


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _is_locked(db: str) -> bool:
    """Whether some process holds the database's lock (tested without taking it for long)."""
    try:
        fd = os.open(lock_path(db), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)        # closing drops a lock this descriptor may just have taken
    return False


def daemon_alive(pid: Optional[int], db: str) -> bool:
    """Whether ``pid`` is a running imgstorage daemon that holds ``db``.

    A process that is alive is not enough: after a crash or a reboot its
    pid may belong to anything.  It must be an img-storage daemon (its
    command line says so) and be the one the lock file names while that
    lock is held.  This process itself never counts: it has taken no zvol
    lock before it recovers, so a lock carrying its pid is one of an earlier
    process that had the same pid.
    """
    if not pid or pid == os.getpid() or _in_memory(db):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                # alive, another user's: the checks below decide
    if not _DAEMON_RE.search(_cmdline(pid)):
        return False
    return holder(db) == pid and _is_locked(db)

