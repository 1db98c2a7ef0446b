"""Where the simulated kernel keeps its state, and how it is changed safely.

Every simulated host is a folder ``sim_root/<host>/`` with one sub-folder per
subsystem (``zfs``, ``target``, ``iscsi``, ``dm``, ``libvirt``).  Daemons of
several hosts and the ``imgstorage-sim`` tool share these folders, so:

* a read-modify-write of state happens under an ``fcntl.flock`` on a lock file
  of that subsystem (or of one device), and
* JSON files are replaced atomically (temporary file + ``os.replace``), so a
  reader never needs a lock and never sees half a file, even if the writer is
  killed midway.

Lock files and temporary files start with a dot: no simulated object name may
begin with one, so they can never collide with a pool, zvol or device name.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Union

from ... import naming
from ...errors import ValidationError

SUBSYSTEMS = ("zfs", "target", "iscsi", "dm", "libvirt")
LOCK_NAME = ".lock"

_held = threading.local()


def _strict(check: Callable[[Any], str], value: Any) -> str:
    """Run a naming check, then refuse the one thing its patterns let through.

    The patterns end in ``$``, which also matches before a final newline, so
    ``"tank\\n"`` would pass and become a file name.
    """
    result = check(value)
    if "\n" in result:
        raise ValidationError(f"invalid name {value!r}: contains a newline")
    return result


def zpool_name(value: Any) -> str:
    return _strict(naming.zpool_name, value)


def zvol_name(value: Any) -> str:
    return _strict(naming.zvol_name, value)


def host_name(value: Any) -> str:
    return _strict(naming.host_name, value)


def iqn(value: Any) -> str:
    return _strict(naming.iqn, value)


def sim_host(host: str) -> str:
    """Check a simulated host name.

    A sim host name may not contain a dot: in a portal or a host name the
    part after the first dot names a network (``nas-0-0.ibnet``), and the sim
    maps every network name of a host to that host's single folder.
    """
    host_name(host)
    if "." in host:
        raise ValidationError(f"invalid sim host name {host!r}: a dot would start a network suffix")
    return host


def host_dir(root: Union[str, Path], host: str) -> Path:
    return Path(root) / sim_host(host)


def host_exists(root: Union[str, Path], host: str) -> bool:
    return host_dir(root, host).is_dir()


def subsystem_dir(root: Union[str, Path], host: str, subsystem: str) -> Path:
    if subsystem not in SUBSYSTEMS:
        raise ValueError(f"unknown sim subsystem {subsystem!r}")
    return host_dir(root, host) / subsystem


def pool_dir(root: Union[str, Path], host: str, pool: str) -> Path:
    return subsystem_dir(root, host, "zfs") / zpool_name(pool)


def zvol_dir(root: Union[str, Path], host: str, pool: str, zvol: str) -> Path:
    return pool_dir(root, host, pool) / zvol_name(zvol)


def zvol_data(root: Union[str, Path], host: str, pool: str, zvol: str) -> Path:
    """The sparse file holding the zvol's bytes."""
    return zvol_dir(root, host, pool, zvol) / "data"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing).

    Re-entrant within one thread: a second ``flock`` through a new file
    descriptor of the same process would wait for itself forever, and nested
    holds happen naturally (a device stacked on a device of the same host).
    Other threads open their own descriptor and so exclude each other.
    """
    held: Dict[str, int] = getattr(_held, "paths", None)
    if held is None:
        held = _held.paths = {}
    key = str(path)
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def subsystem_lock(root: Union[str, Path], host: str, subsystem: str):
    """The lock serialising state changes of one subsystem of one host."""
    return locked(subsystem_dir(root, host, subsystem) / LOCK_NAME)


def read_json(path: Path, default: Any = None) -> Any:
    """Read a state file; a missing file is ``default`` (nothing created yet)."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return default


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically, so concurrent readers need no lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: Path, text: str) -> None:
    """Atomic replacement for small text files (same reason as write_json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
