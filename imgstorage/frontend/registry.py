"""The cluster registry: what the Rocks database told the original tools.

The frontend needs to know which hosts exist and what they are (a NAS, a VM
container, a VM on a container), the attributes that steer img-storage
(``img_sync``, ``img_zpools``, ``vm_container_zpool`` ...) and, for each VM
disk, which NAS and zpool hold it.  Rocks kept all of this in MySQL; here it
is a small SQLite file so a frontend needs nothing else.

One ``Registry`` is one unit of work: a command validates everything, makes
its changes and commits once, so a command that fails part-way changes
nothing.
"""
from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from sqlalchemy import ForeignKey, String, UniqueConstraint, event, select
from sqlalchemy.engine import URL, Engine, create_engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from .. import naming
from ..db import create_private
from .lookup import HostQueries
from ..errors import ImgStorageError, NotFoundError, StateError, ValidationError

APPLIANCES = ("nas", "vm-container", "compute", "frontend")
SCHEMA_VERSION = "1"

DEFAULT_DISK_GB = 36
DEFAULT_MEMORY_MB = 1024
DEFAULT_CPUS = 1
DISK_DIR = "/state/partition1/kvm/disks"

# What the original roll's post-install put in the Rocks database.
DEFAULT_APPLIANCE_ATTRS = (
    ("vm-container", "img_storage_vm", "true"),
    ("nas", "img_storage_nas", "true"),
    ("compute", "vm_container_zpool", "tank"),
    ("vm-container", "vm_container_zpool", "tank"),
)
DEFAULT_GLOBAL_ATTRS = (("img_sync", "false"),)

SOURCE_HOST, SOURCE_APPLIANCE, SOURCE_GLOBAL = "H", "A", "G"

_RACK_RANK_RE = re.compile(r"-(\d+)-(\d+)$")


class RegistryError(ImgStorageError):
    """The registry file cannot be opened or written."""


# ------------------------------------------------------------------ schema
class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "registry_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Host(Base):
    """A node; a VM is a host whose ``container`` is the physical host running it."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    appliance: Mapped[str] = mapped_column(String(32))
    ip: Mapped[Optional[str]] = mapped_column(String(64))
    rack: Mapped[Optional[int]]
    rank: Mapped[Optional[int]]
    container_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("hosts.id", ondelete="RESTRICT"), index=True)
    membership: Mapped[Optional[str]] = mapped_column(String(32))
    slice_no: Mapped[Optional[int]] = mapped_column("slice")
    memory_mb: Mapped[Optional[int]]
    cpus: Mapped[Optional[int]]

    container: Mapped[Optional["Host"]] = relationship(
        remote_side=[id], back_populates="vms", foreign_keys=[container_id])
    vms: Mapped[List["Host"]] = relationship(
        back_populates="container", foreign_keys=[container_id])
    disks: Mapped[List["Disk"]] = relationship(
        back_populates="vm", foreign_keys="Disk.vm_id", order_by="Disk.index",
        cascade="all, delete-orphan", passive_deletes=True)
    attrs: Mapped[List["HostAttr"]] = relationship(
        back_populates="host", cascade="all, delete-orphan", passive_deletes=True)

    @property
    def is_virtual(self) -> bool:
        return self.container_id is not None or self.container is not None


class Disk(Base):
    """One disk of a VM; ``nas``/``zpool`` set means it lives on a NAS as ``<vm>-vol``."""

    __tablename__ = "vm_disks"
    __table_args__ = (UniqueConstraint("vm_id", "disk_index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column("disk_index")
    size_gb: Mapped[int]
    path: Mapped[str] = mapped_column(String(1024))
    vbd_type: Mapped[str] = mapped_column(String(16), default="file")
    nas_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("hosts.id", ondelete="RESTRICT"), index=True)
    zpool: Mapped[Optional[str]] = mapped_column(String(256))

    vm: Mapped[Host] = relationship(back_populates="disks", foreign_keys=[vm_id])
    nas: Mapped[Optional[Host]] = relationship(foreign_keys=[nas_id])

    @property
    def device(self) -> str:
        """The guest's device name, vda for disk 0, as libvirt names virtio disks."""
        return "vd" + chr(ord("a") + self.index) if self.index < 26 else f"vd{self.index}"


class GlobalAttr(Base):
    __tablename__ = "global_attrs"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(4096))


class ApplianceAttr(Base):
    __tablename__ = "appliance_attrs"
    appliance: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(4096))


class HostAttr(Base):
    __tablename__ = "host_attrs"
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"),
                                         primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(String(4096))
    host: Mapped[Host] = relationship(back_populates="attrs")


class BrokerIdentity(Base):
    """A node's own broker user and its generated password.

    Kept apart from the attributes so that no listing of attributes can
    show the password; the row goes with its host.
    """

    __tablename__ = "broker_identities"
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"),
                                         primary_key=True)
    user: Mapped[str] = mapped_column(String(253))
    password: Mapped[str] = mapped_column(String(256))


@dataclass(frozen=True)
class ResolvedAttr:
    name: str
    value: str
    source: str          # H, A or G: where the winning value was set


# ------------------------------------------------------------- helpers
def natural_key(name: str) -> Tuple:
    """compute-0-2 before compute-0-10, as an operator reads a rack."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                 for t in re.split(r"(\d+)", name) if t)


def appliance_name(value: str) -> str:
    if value not in APPLIANCES:
        raise ValidationError(f"invalid appliance {value!r}: use one of {', '.join(APPLIANCES)}")
    return value


def split_pools(text: Optional[str]) -> List[str]:
    """The zpools listed in an ``img_zpools`` attribute (comma separated, blanks ignored)."""
    if not text:
        return []
    return [p.strip() for p in text.split(",") if p.strip()]


def _engine(path: str) -> Engine:
    create_private(path)
    engine = create_engine(URL.create("sqlite", database=path))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    return engine


HostRef = Union[str, Host]


# ------------------------------------------------------------- the registry
class Registry(HostQueries):
    """The registry file, opened for one command (one transaction).

    ``attr_bool``, ``is_nas`` and ``get_nas`` come from lookup.HostQueries,
    which the read-only reader shares.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not Path(self.path).parent.is_dir():
            raise RegistryError(f"cannot open the cluster registry {self.path}: "
                                f"folder {Path(self.path).parent} does not exist")
        self.engine = _engine(self.path)
        for attempt in (1, 2):
            try:
                Base.metadata.create_all(self.engine)
                self._seed_defaults()
                break
            except DBAPIError as exc:
                # Two commands creating a new registry at once: the loser of
                # the race finds the tables made and simply goes on.
                if attempt == 1 and "already exists" in str(exc.orig):
                    continue
                self.engine.dispose()
                raise RegistryError(f"cannot open the cluster registry {self.path}: "
                                    f"{exc.orig}") from None
        self.session = Session(self.engine, autoflush=True)

    def _seed_defaults(self) -> None:
        """Set the original roll's default attributes, once, when the file is new."""
        with Session(self.engine) as s:
            if s.get(Meta, "schema_version") is not None:
                return
            s.add(Meta(key="schema_version", value=SCHEMA_VERSION))
            for appliance, name, value in DEFAULT_APPLIANCE_ATTRS:
                s.add(ApplianceAttr(appliance=appliance, name=name, value=value))
            for name, value in DEFAULT_GLOBAL_ATTRS:
                s.add(GlobalAttr(name=name, value=value))
            try:
                s.commit()
            except IntegrityError:  # another command created the file at the same moment
                s.rollback()

    # -- unit of work ------------------------------------------------------
    def commit(self) -> None:
        try:
            self.session.commit()
        except DBAPIError as exc:
            self.session.rollback()
            raise RegistryError(f"cannot write the cluster registry {self.path}: "
                                f"{exc.orig}") from None

    def rollback(self) -> None:
        self.session.rollback()

    def close(self) -> None:
        self.session.close()
        self.engine.dispose()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.rollback()
        finally:
            self.close()

    # -- hosts -------------------------------------------------------------
    def find_host(self, name: str) -> Optional[Host]:
        return self.session.scalars(select(Host).where(Host.name == name)).first()

    def get_host(self, ref: HostRef) -> Host:
        """The registered host, or ``unknown host X`` (names are checked first)."""
        if isinstance(ref, Host):
            return ref
        name = naming.host_name(ref)
        host = self.find_host(name)
        if host is None:
            raise NotFoundError(f"unknown host {name}")
        return host

    def hosts(self, names: Optional[Iterable[str]] = None) -> List[Host]:
        if names:
            return [self.get_host(n) for n in names]
        return sorted(self.session.scalars(select(Host)), key=lambda h: natural_key(h.name))

    def add_host(self, name: str, appliance: str, ip: Optional[str] = None,
                 rack: Optional[int] = None, rank: Optional[int] = None) -> Host:
        """Register a physical host; rack/rank default to its name's ``-R-N`` suffix."""
        name = naming.host_name(name)
        appliance = appliance_name(appliance)
        if ip is not None:
            try:
                ip = str(ipaddress.ip_address(ip))
            except ValueError:
                raise ValidationError(f"invalid ip {ip!r}: expected an IPv4 or IPv6 address") from None
        rack = naming.non_negative_int("rack", rack)
        rank = naming.non_negative_int("rank", rank)
        if self.find_host(name) is not None:
            raise ValidationError(f"host {name} already exists")
        m = _RACK_RANK_RE.search(name)
        if m:
            rack = int(m.group(1)) if rack is None else rack
            rank = int(m.group(2)) if rank is None else rank
        host = Host(name=name, appliance=appliance, ip=ip, rack=rack, rank=rank)
        self.session.add(host)
        self.session.flush()
        return host

    def remove_host(self, ref: HostRef) -> None:
        """Forget a host; refused while it still runs VMs or holds VM disks."""
        host = self.get_host(ref)
        # Queries, not the cached ``vms`` collection: a VM deleted earlier in
        # the same command must no longer count.
        vms = self.session.scalars(select(Host.name).where(Host.container_id == host.id)).all()
        if vms:
            names = ", ".join(sorted(vms, key=natural_key))
            raise StateError(f"host {host.name} still has VMs ({names}): remove them first "
                             f"with 'rocks remove host vm'")
        users = self.session.scalars(select(Disk).where(Disk.nas_id == host.id)).all()
        if users:
            names = ", ".join(sorted({d.vm.name for d in users}, key=natural_key))
            raise StateError(f"host {host.name} holds the disks of VMs ({names}): move them "
                             f"first with 'rocks set host vm nas' or 'rocks remove host vm nas'")
        self.session.delete(host)
        self.session.flush()

    # -- attributes --------------------------------------------------------
    def set_attr(self, name: str, value: str, *, host: Optional[HostRef] = None,
                 appliance: Optional[str] = None) -> None:
        """Set an attribute globally, for an appliance, or for one host."""
        name = naming.attr_name(name)
        value = naming.attr_value(value)
        if value is None:
            raise ValidationError(f"attribute {name} needs a value")
        row = self._attr_row(name, host=host, appliance=appliance)
        if row is not None:
            row.value = value
        elif host is not None:
            self.session.add(HostAttr(host=self.get_host(host), name=name, value=value))
        elif appliance is not None:
            self.session.add(ApplianceAttr(appliance=appliance_name(appliance), name=name,
                                           value=value))
        else:
            self.session.add(GlobalAttr(name=name, value=value))
        self.session.flush()

    def remove_attr(self, name: str, *, host: Optional[HostRef] = None,
                    appliance: Optional[str] = None) -> None:
        name = naming.attr_name(name)
        row = self._attr_row(name, host=host, appliance=appliance)
        if row is None:
            if host is not None:
                h = self.get_host(host)
                inherited = {a.name: a for a in self.resolved_attrs(h)}.get(name)
                if inherited is not None:
                    where = ("its appliance " + h.appliance
                             if inherited.source == SOURCE_APPLIANCE else "the global attributes")
                    raise NotFoundError(f"attribute {name} is not set on host {h.name} itself "
                                        f"(it comes from {where})")
                raise NotFoundError(f"host {h.name} has no attribute {name}")
            if appliance is not None:
                raise NotFoundError(f"appliance {appliance} has no attribute {name}")
            raise NotFoundError(f"there is no global attribute {name}")
        self.session.delete(row)
        self.session.flush()

    def _attr_row(self, name: str, *, host: Optional[HostRef], appliance: Optional[str]):
        if host is not None and appliance is not None:
            raise ValueError("an attribute belongs to a host or to an appliance, not both")
        if host is not None:
            h = self.get_host(host)
            return self.session.get(HostAttr, (h.id, name))
        if appliance is not None:
            return self.session.get(ApplianceAttr, (appliance_name(appliance), name))
        return self.session.get(GlobalAttr, name)

    def global_attrs(self) -> List[Tuple[str, str]]:
        rows = self.session.scalars(select(GlobalAttr).order_by(GlobalAttr.name))
        return [(r.name, r.value) for r in rows]

    def appliance_attrs(self, appliance: Optional[str] = None) -> List[Tuple[str, str, str]]:
        stmt = select(ApplianceAttr).order_by(ApplianceAttr.appliance, ApplianceAttr.name)
        if appliance is not None:
            stmt = stmt.where(ApplianceAttr.appliance == appliance_name(appliance))
        return [(r.appliance, r.name, r.value) for r in self.session.scalars(stmt)]

    def resolved_attrs(self, ref: HostRef) -> List[ResolvedAttr]:
        """Every attribute a host sees, with where it came from (host > appliance > global)."""
        host = self.get_host(ref)
        merged: Dict[str, ResolvedAttr] = {}
        for name, value in self.global_attrs():
            merged[name] = ResolvedAttr(name, value, SOURCE_GLOBAL)
        for _appliance, name, value in self.appliance_attrs(host.appliance):
            merged[name] = ResolvedAttr(name, value, SOURCE_APPLIANCE)
        for row in self.session.scalars(select(HostAttr).where(HostAttr.host_id == host.id)):
            merged[row.name] = ResolvedAttr(row.name, row.value, SOURCE_HOST)
        return [merged[k] for k in sorted(merged)]

    def attr(self, ref: HostRef, name: str) -> Optional[str]:
        """The value a host sees for ``name``: its own, else its appliance's, else the global one."""
        host = self.get_host(ref)
        row = self.session.get(HostAttr, (host.id, name))
        if row is not None:
            return row.value
        row = self.session.get(ApplianceAttr, (host.appliance, name))
        if row is not None:
            return row.value
        row = self.session.get(GlobalAttr, name)
        return row.value if row is not None else None

    def node_role(self, ref: HostRef) -> Optional[str]:
        """"nas", "vm" (a VM container) or None: which daemon a physical host runs."""
        host = self.get_host(ref)
        if host.is_virtual:
            return None
        if self.is_nas(host):
            return "nas"
        if host.appliance == "vm-container" or self.attr_bool(host, "img_storage_vm"):
            return "vm"
        return None

    # -- broker identities -------------------------------------------------
    def broker_identity(self, ref: HostRef) -> Optional[Tuple[str, str]]:
        """The node's broker ``(user, password)``, or None before the first sync."""
        row = self.session.get(BrokerIdentity, self.get_host(ref).id)
        return (row.user, row.password) if row is not None else None

    def set_broker_identity(self, ref: HostRef, user: str, password: str) -> None:
        host = self.get_host(ref)
        row = self.session.get(BrokerIdentity, host.id)
        if row is None:
            self.session.add(BrokerIdentity(host_id=host.id, user=user, password=password))
        else:
            row.user, row.password = user, password
        self.session.flush()

    # -- VMs ---------------------------------------------------------------
    def get_vm(self, ref: HostRef) -> Host:
        host = self.get_host(ref)
        if not host.is_virtual:
            raise ValidationError(f"node {host.name} is not a virtual node")
        return host

    def vms(self, names: Optional[Sequence[str]] = None) -> List[Host]:
        if names:
            return [self.get_vm(n) for n in names]
        hosts = self.session.scalars(select(Host).where(Host.container_id.is_not(None)))
        return sorted(hosts, key=lambda h: natural_key(h.name))

    def vm_name_base(self, container: Host, membership: str) -> str:
        """Rocks names a VM after its membership and its container's rack and rank."""
        m = _RACK_RANK_RE.search(container.name)
        if m:
            return f"{membership}-{m.group(1)}-{m.group(2)}"
        if container.rack is not None and container.rank is not None:
            return f"{membership}-{container.rack}-{container.rank}"
        return f"vm-{container.name}"

    def add_vm(self, container: HostRef, membership: str, *, disksize: int = DEFAULT_DISK_GB,
               memory_mb: int = DEFAULT_MEMORY_MB, cpus: int = DEFAULT_CPUS,
               name: Optional[str] = None) -> Host:
        """Define a VM on a physical host, with one local disk, as ``rocks add host vm`` did."""
        membership = appliance_name(membership)
        disksize = naming.size_gb(disksize)
        memory_mb = naming.non_negative_int("mem", memory_mb, allow_none=False, minimum=1)
        cpus = naming.non_negative_int("cpus", cpus, allow_none=False, minimum=1)
        if cpus > 1024:
            raise ValidationError(f"invalid cpus {cpus}: at most 1024")
        phys = self.get_host(container)
        if phys.is_virtual:
            raise ValidationError(f"host {phys.name} is a VM itself and cannot run VMs")
        taken = set(self.session.scalars(select(Host.name)))
        if name is not None:
            name = naming.host_name(name)
            if name in taken:
                raise ValidationError(f"host {name} already exists")
        else:
            base = self.vm_name_base(phys, membership)
            n = 0
            while f"{base}-{n}" in taken:
                n += 1
            name = naming.host_name(f"{base}-{n}")
        used_slices = set(self.session.scalars(
            select(Host.slice_no).where(Host.container_id == phys.id)))
        slice_no = 0
        while slice_no in used_slices:
            slice_no += 1
        vm = Host(name=name, appliance=membership, membership=membership, container=phys,
                  slice_no=slice_no, memory_mb=memory_mb, cpus=cpus)
        vm.disks.append(Disk(index=0, size_gb=disksize, path=f"{DISK_DIR}/{name}.vda",
                             vbd_type="file"))
        self.session.add(vm)
        self.session.flush()
        return vm

    def remove_vm(self, ref: HostRef) -> None:
        vm = self.get_vm(ref)
        self.session.delete(vm)
        self.session.flush()

    # -- VM disks on a NAS -------------------------------------------------
    def choose_zpool(self, nas: HostRef, rng: Optional[random.Random] = None) -> str:
        """A zpool from the NAS's ``img_zpools``, at random so disks spread over the pools."""
        host = self.get_host(nas)
        pools = split_pools(self.attr(host, "img_zpools"))
        if not pools:
            raise ValidationError("you need to specify a zpool parameter or set the "
                                  "img_zpools attribute")
        for pool in pools:
            try:
                naming.zpool_name(pool)
            except ValidationError as exc:
                raise ValidationError(f"attribute img_zpools of host {host.name}: {exc}") from None
        return (rng or random).choice(pools)

    def _disk(self, vm: Host, index: int) -> Disk:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValidationError("index must be an integer")
        if not 0 <= index < len(vm.disks):
            count = len(vm.disks)
            raise ValidationError(f"index {index} is out of range: VM {vm.name} has {count} "
                                  f"disk{'s' if count != 1 else ''}"
                                  + (f" (index 0 to {count - 1})" if count else ""))
        return vm.disks[index]

    def set_vm_nas(self, vm: HostRef, nas: HostRef, zpool: Optional[str] = None,
                   index: int = 0, rng: Optional[random.Random] = None) -> Disk:
        """Put a VM's disk on a NAS; without ``zpool`` one is picked from ``img_zpools``."""
        vm_host = self.get_vm(vm)
        nas_host = self.get_nas(nas)
        disk = self._disk(vm_host, index)
        pool = naming.zpool_name(zpool) if zpool is not None else self.choose_zpool(nas_host, rng)
        disk.nas = nas_host
        disk.zpool = pool
        self.session.flush()
        return disk

    def clear_vm_nas(self, vm: HostRef, index: Optional[int] = None) -> None:
        """Back to the local disk: for one disk, or every disk when ``index`` is None."""
        vm_host = self.get_vm(vm)
        disks = vm_host.disks if index is None else [self._disk(vm_host, index)]
        for disk in disks:
            disk.nas = None
            disk.zpool = None
        self.session.flush()
