"""Block devices as a simulated host sees them, with real bytes behind them.

A device path means what it means on that host: ``/dev/zvol/<pool>/<vol>`` is
one of its zvols (``/dev/zvol/<pool>/<vol>@<snap>`` a read-only snapshot of
one, as with ``snapdev=visible``), ``/dev/sdX`` one of its iSCSI sessions (whose bytes live on
the NAS, behind the target's backing device), ``/dev/mapper/<name>`` one of its
device-mapper devices.  Every access resolves the path again, as the kernel
maps every request with the current state: a target deleted on the NAS or a
table swapped by ``resume`` takes effect on the very next read.
"""
from __future__ import annotations

import contextlib
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ContextManager, List, Union

from ...errors import DriverError, ValidationError
from . import hypervisor, initiator, state, target
from .snapshots import NoSuchVolume, Volume, snapshot_name

SECTOR = 512
# Deeper stacks than this are a cycle (a table reloaded to point at a device
# that points back at it); the kernel refuses those, the sim reports them.
MAX_DEPTH = 8

_ZVOL_RE = re.compile(r"^/dev/zvol/([^/]+)/([^/]+)$")
_SD_RE = re.compile(r"^/dev/(sd[a-z]{1,3})$")
_MAPPER_RE = re.compile(r"^/dev/mapper/([^/]+)$")


class DeviceIOError(DriverError):
    """A read or write failed, as ``EIO`` would (dead iSCSI link, invalid snapshot)."""


class SimDevice(ABC):
    """A block device: a size and byte-addressed reads and writes.

    Bounds are checked here once for every kind of device, so a bad offset is
    always a clear error and never a short read or a file silently grown.
    """

    def __init__(self, path: str):
        self.path = path

    @property
    def size(self) -> int:
        with self._guard():
            return self._size()

    def read(self, offset: int, length: int) -> bytes:
        with self._guard():
            self._check(offset, length, "read")
            return self._read(offset, length) if length else b""

    def write(self, offset: int, data: bytes) -> None:
        data = bytes(data)
        with self._guard():
            self._check(offset, len(data), "write")
            if data:
                self._write(offset, data)

    def _check(self, offset: int, length: int, what: str) -> None:
        for label, value in (("offset", offset), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(f"{self.path}: {what} {label} must be a whole number")
            if value < 0:
                raise ValidationError(f"{self.path}: negative {what} {label} {value}")
        size = self._size()
        if offset + length > size:
            raise DeviceIOError(f"{self.path}: {what} of {length} bytes at offset {offset} "
                                f"goes beyond the end of the device ({size} bytes)")

    def _guard(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    @abstractmethod
    def _size(self) -> int: ...

    @abstractmethod
    def _read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def _write(self, offset: int, data: bytes) -> None: ...


class FileDevice(SimDevice):
    """A zvol: its sparse data file.  Holes read as zeros, as on ZFS.

    Writes go through the volume's one write path, which keeps its snapshots'
    copy-on-write bookkeeping; reads of the live volume need no lock.
    """

    def __init__(self, path: str, volume: Volume):
        super().__init__(path)
        self.volume = volume
        self.data = volume.data

    def _gone(self) -> DeviceIOError:
        return DeviceIOError(f"I/O error on {self.path}: the volume no longer exists")

    def _size(self) -> int:
        try:
            return self.data.stat().st_size
        except FileNotFoundError:
            raise self._gone() from None

    def _read(self, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self.data, os.O_RDONLY)
        except FileNotFoundError:
            raise self._gone() from None
        try:
            chunks = []
            while length > 0:
                got = os.pread(fd, length, offset)
                if not got:
                    break
                chunks.append(got)
                offset += len(got)
                length -= len(got)
            out = b"".join(chunks)
            return out + bytes(length) if length > 0 else out
        finally:
            os.close(fd)

    def _write(self, offset: int, data: bytes) -> None:
        try:
            self.volume.write(offset, data)
        except NoSuchVolume:
            raise self._gone() from None


class SnapshotDevice(SimDevice):
    """``/dev/zvol/<pool>/<vol>@<snap>``: a snapshot's bytes, read-only."""

    def __init__(self, path: str, volume: Volume, snap: str):
        super().__init__(path)
        self.volume, self.snap = volume, snap

    def _gone(self) -> DeviceIOError:
        return DeviceIOError(f"I/O error on {self.path}: the snapshot no longer exists")

    def _size(self) -> int:
        try:
            if self.snap not in [s.name for s in self.volume.snapshots()]:
                raise self._gone()
            return self.volume.geometry()[0]
        except NoSuchVolume:
            raise self._gone() from None

    def _read(self, offset: int, length: int) -> bytes:
        try:
            return self.volume.read_snapshot(self.snap, offset, length)
        except DriverError:
            raise self._gone() from None

    def _write(self, offset: int, data: bytes) -> None:
        raise DeviceIOError(f"I/O error on {self.path}: Read-only file system")


class IscsiDevice(SimDevice):
    """``/dev/sdX`` of an iSCSI session: the target's backing device on the NAS.

    The session and the target are looked up on every request, so a target
    deleted on the NAS (or an initiator removed from its ACL) turns every
    later request into an I/O error, like a dead iSCSI link.
    """

    def __init__(self, root: Path, host: str, disk: str, depth: int):
        super().__init__(f"/dev/{disk}")
        self.root, self.host, self.disk, self.depth = root, host, disk, depth

    def _backing(self) -> SimDevice:
        session = initiator.session_for_disk(self.root, self.host, self.disk)
        if session is None:
            raise DeviceIOError(f"I/O error on {self.path}: the iSCSI session was logged out")
        info = target.read_targets(self.root, session["nas"]).get(session["iqn"])
        if info is None or session["initiator"] not in info.get("acls", []):
            raise DeviceIOError(f"I/O error on {self.path}: connection to iSCSI target "
                                f"{session['iqn']} on {session['nas']} lost")
        return open_device(self.root, session["nas"], info["device"], _depth=self.depth + 1)

    def _size(self) -> int:
        return self._backing().size

    def _read(self, offset: int, length: int) -> bytes:
        return self._backing().read(offset, length)

    def _write(self, offset: int, data: bytes) -> None:
        self._backing().write(offset, data)


def _dm():
    """The device-mapper module, imported late: its devices subclass SimDevice,
    so it must load after this module, while this module resolves its paths."""
    from . import dm
    return dm


def parse_path(path: str) -> tuple:
    """``("zvol", pool, vol)``, ``("snapshot", pool, vol, snap)``, ``("sd", "sdb")``
    or ``("mapper", name)``."""
    if not isinstance(path, str):
        raise ValidationError("invalid device path: expected a string")
    m = _ZVOL_RE.match(path)
    if m:
        vol, at, snap = m.group(2).partition("@")
        if at:
            return ("snapshot", state.zpool_name(m.group(1)), state.zvol_name(vol),
                    snapshot_name(snap))
        return ("zvol", state.zpool_name(m.group(1)), state.zvol_name(vol))
    m = _SD_RE.match(path)
    if m:
        return ("sd", m.group(1))
    m = _MAPPER_RE.match(path)
    if m:
        return ("mapper", _dm().check_name(m.group(1)))
    raise DriverError(f"cannot open {path!r}: No such device "
                      "(expected /dev/zvol/POOL/VOL, /dev/sdX or /dev/mapper/NAME)")


def open_device(root: Union[str, Path], host: str, path: str, *, _depth: int = 0) -> SimDevice:
    """The device at ``path`` as seen on ``host``; fails if it does not exist there."""
    if _depth > MAX_DEPTH:
        raise DeviceIOError(f"{path}: devices stacked more than {MAX_DEPTH} deep "
                            "(a table refers back to itself)")
    root = Path(root)
    state.sim_host(host)
    kind = parse_path(path)
    if kind[0] in ("zvol", "snapshot"):
        volume = Volume.of(root, host, kind[1], kind[2])
        if not volume.data.is_file():
            raise DriverError(f"cannot open {path}: No such device on {host}")
        if kind[0] == "zvol":
            return FileDevice(path, volume)
        if kind[3] not in [s.name for s in volume.snapshots()]:
            raise DriverError(f"cannot open {path}: No such device on {host}")
        return SnapshotDevice(path, volume, kind[3])
    if kind[0] == "sd":
        if initiator.session_for_disk(root, host, kind[1]) is None:
            raise DriverError(f"cannot open {path}: No such device on {host}")
        return IscsiDevice(root, host, kind[1], _depth)
    return _dm().mapped_device(root, host, kind[1], _depth)


def device_exists(root: Union[str, Path], host: str, path: str) -> bool:
    try:
        open_device(root, host, path)
    except DriverError:
        return False
    return True


def device_users(root: Union[str, Path], host: str, path: str) -> List[str]:
    """Who holds ``path`` open on ``host``: running domains, dm tables, targets.

    These are the holders that make the real kernel answer "busy" to
    ``dmsetup remove`` or ``zfs destroy``.
    """
    users = []
    for dom in hypervisor.read_domains(root, host).values():
        if dom.get("state") == "running" and path in dom.get("disks", []):
            users.append(f"domain {dom['name']}")
    for name, paths in sorted(_dm().referenced_devices(root, host).items()):
        if path in paths:
            users.append(f"device-mapper device {name}")
    for iqn, info in sorted(target.read_targets(root, host).items()):
        if info.get("device") == path:
            users.append(f"iSCSI target {iqn}")
    return users


class SimBlockDevices:
    """The BlockDevices driver of one simulated host."""

    def __init__(self, root: Union[str, Path], host: str):
        self.root = Path(root)
        self.host = state.sim_host(host)

    def size_bytes(self, device: str) -> int:
        return open_device(self.root, self.host, device).size

    def in_use(self, device: str) -> bool:
        return bool(device_users(self.root, self.host, device))
