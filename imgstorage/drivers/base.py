"""The small interfaces between imgstorage and the kernel.

One protocol per subsystem, each with a real implementation (the tools and
libraries a production node has) and a simulated one that keeps real bytes
under ``sim_root`` so a whole cluster can run on one machine.  Services only
ever see these protocols.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, runtime_checkable


# --------------------------------------------------------------------- ZFS
HOLD_TAG = "imgstorage"        # the tag of the holds imgstorage puts on its snapshots
# The tag on a NAS snapshot that a container's kept copy (``img_keep_local``) is
# the same as: the base of that container's next start, kept apart from the
# sync's own holds, which move with every transfer.
KEPT_TAG = "imgstorage-kept"

@dataclass(frozen=True)
class ZvolInfo:
    """One volume as ``zfs list -Hp -t volume`` reports it."""
    name: str            # "pool/vol"
    volsize: int         # bytes
    used: int = 0        # bytes
    refer: int = 0       # bytes

    @property
    def pool(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def zvol(self) -> str:
        return self.name.rsplit("/", 1)[-1]


class ByteSource(Protocol):
    """A stream being produced (``zfs send``): read until b"", then close()."""
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...        # raises DriverError if the producer failed
    def abort(self) -> None: ...        # stop early; never raises


class ByteSink(Protocol):
    """A stream being consumed (``zfs receive``): write, then close() to commit."""
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...        # raises DriverError if the stream was incomplete/invalid
    def abort(self) -> None: ...        # discard what was received; never raises


@runtime_checkable
class ZfsDriver(Protocol):
    def pool_exists(self, pool: str) -> bool: ...
    def list_pools(self) -> List[str]: ...
    def list_zvols(self, pool: Optional[str] = None) -> List[ZvolInfo]: ...
    def get_zvol(self, pool: str, zvol: str) -> Optional[ZvolInfo]: ...
    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None: ...
    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None: ...
    def device_path(self, pool: str, zvol: str) -> str: ...
    # snapshots and streams (sync mode)
    def snapshot(self, pool: str, zvol: str, snap: str) -> None: ...
    def list_snapshots(self, pool: str, zvol: str) -> List[str]: ...      # oldest first
    def destroy_snapshot(self, pool: str, zvol: str, snap: str) -> None: ...
    def send_size(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> int: ...
    def send(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> ByteSource: ...
    def receive(self, pool: str, zvol: str, resumable: bool = False) -> ByteSink: ...
    # Resumable streams.  A ``receive(..., resumable=True)`` that is cut short
    # (the sender died, the connection broke, this process was killed) keeps
    # what arrived, as ``zfs receive -s`` does, and the destination then has a
    # resume token.  The sender continues from it with ``send_resume`` (``zfs
    # send -t``).  While a partial state exists a new stream is refused until
    # ``abort_resume`` (``zfs receive -A``) throws the partial state away.
    def resume_token(self, pool: str, zvol: str) -> Optional[str]: ...   # None: nothing partial
    def abort_resume(self, pool: str, zvol: str) -> None: ...            # no partial state: no-op
    def send_resume(self, pool: str, zvol: str, token: str) -> ByteSource: ...
    def send_resume_size(self, pool: str, zvol: str, token: str) -> int: ...
    # Holds (``zfs hold``): a held snapshot cannot be destroyed, by us or anyone,
    # until every tag on it is released; a recursive destroy of the zvol fails too.
    def hold(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None: ...     # idempotent
    def release(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None: ...  # idempotent
    def holds(self, pool: str, zvol: str, snap: str) -> List[str]: ...   # the tags on it
    # Kept copies (``img_keep_local``): a snapshot's identity, which a received
    # snapshot shares with the one it was sent from, and going back to one.
    def snapshot_guid(self, pool: str, zvol: str, snap: str) -> int: ...
    # ``zfs rollback [-r]``: the zvol becomes ``snap`` again; ``recursive``
    # destroys the snapshots taken after it (held ones refuse).
    def rollback(self, pool: str, zvol: str, snap: str, recursive: bool = False) -> None: ...
    def pool_available(self, pool: str) -> int: ...     # bytes a new thick zvol may take


# ------------------------------------------------------------ iSCSI target
@dataclass
class TargetInfo:
    iqn: str
    device: Optional[str] = None                         # backing block device
    acls: List[str] = field(default_factory=list)        # initiator IQNs admitted
    tid: Optional[int] = None                            # tgt only


@runtime_checkable
class TargetDriver(Protocol):
    def create_target(self, iqn: str, device: str, initiator: str,
                      chap: Optional["ChapCredentials"] = None) -> None: ...
    def delete_target(self, iqn: str) -> None: ...
    def list_targets(self) -> List[TargetInfo]: ...


@dataclass(frozen=True)
class ChapCredentials:
    userid: str
    password: str


# --------------------------------------------------------- iSCSI initiator
@dataclass(frozen=True)
class DiscoveredTarget:
    portal: str          # "10.2.20.250:3260"
    tpgt: int
    iqn: str


@dataclass(frozen=True)
class SessionInfo:
    iqn: str
    portal: Optional[str] = None
    device: Optional[str] = None   # "sdc", once the kernel attached the disk
    sid: Optional[int] = None


@runtime_checkable
class InitiatorDriver(Protocol):
    # ``timeout``: seconds the caller can still wait (what is left of a map's
    # budget); past it the step fails with DriverError and leaves no session.
    def initiator_name(self) -> str: ...
    def discover(self, portal: str, timeout: Optional[float] = None) -> List[DiscoveredTarget]: ...
    def login(self, iqn: str, portal: str, chap: Optional[ChapCredentials] = None,
              timeout: Optional[float] = None) -> None: ...
    def logout(self, iqn: str, portal: Optional[str] = None) -> None: ...
    def sessions(self) -> List[SessionInfo]: ...


# ----------------------------------------------------------- device mapper
@dataclass(frozen=True)
class DmStatus:
    """One line of ``dmsetup status``: ``name: start length type args...``."""
    name: str
    start: int
    length: int          # sectors
    target_type: str     # snapshot | snapshot-merge | linear | ...
    args: str = ""       # the rest of the line, exactly as the kernel printed it

    def snapshot_figures(self) -> Optional[tuple]:
        """``(allocated, total, metadata)`` sectors for snapshot targets."""
        if self.target_type not in ("snapshot", "snapshot-merge"):
            return None
        parts = self.args.split()
        if len(parts) < 2 or "/" not in parts[0]:
            return None
        try:
            alloc, total = (int(x) for x in parts[0].split("/", 1))
            return alloc, total, int(parts[1])
        except ValueError:
            return None


@runtime_checkable
class DeviceMapperDriver(Protocol):
    def create(self, name: str, table: str) -> None: ...
    def reload(self, name: str, table: str) -> None: ...
    def suspend(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def status(self, name: Optional[str] = None) -> List[DmStatus]: ...
    def table(self, name: str) -> str: ...
    def exists(self, name: str) -> bool: ...


# ------------------------------------------------------------ block layer
@runtime_checkable
class BlockDevices(Protocol):
    def size_bytes(self, device: str) -> int: ...
    def in_use(self, device: str) -> bool: ...


# -------------------------------------------------------------- hypervisor
@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: str                      # "running" | "shut off"
    disks: tuple = ()               # block devices in use


@runtime_checkable
class HypervisorDriver(Protocol):
    def start(self, host: str, vm: str, disk: str, memory_mb: int, cpus: int) -> None: ...
    def stop(self, host: str, vm: str) -> None: ...
    def domains(self, host: str) -> List[DomainInfo]: ...
