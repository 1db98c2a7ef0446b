"""Simulated device mapper: ``linear``, ``snapshot`` and ``snapshot-merge`` on real bytes.

Tables use the kernel's syntax (``0 L linear DEV 0``, ``0 L snapshot ORIGIN
COW P 16``, ``0 L snapshot-merge ORIGIN COW P 16``).  A device's state is
``sim_root/<host>/dm/<name>.json`` (live table, staged table, suspended flag,
merge clock); its lock is ``dm/.locks/<name>``.

The snapshot store is persistent and lives in the COW device's own bytes, so
it survives a reload from ``snapshot`` to ``snapshot-merge`` (and a daemon
restart) exactly as dm-snapshot's does.  Layout (little-endian)::

    chunk 0                 header: magic "SIMCOW01", version, valid flag, chunk sectors
    chunk 1                 exception area 0: E entries (origin chunk u64, COW chunk u64)
    chunks 2 .. E+1         data chunks of the entries of area 0
    chunk E+2               exception area 1, and so on        (E = chunk bytes / 16)

An entry whose COW chunk is 0 ends the table.  Because the areas interleave
with the data like dm-snapshot's, the figures ``dmsetup status`` prints come
out as the kernel's: ``allocated/total metadata`` sectors, ``32/N 32`` when
empty, shrinking back to ``allocated == metadata`` as a merge completes.

A merge makes progress only when someone looks (``status``, a read or a write,
or ``merge_step``), by as many chunks as the elapsed time allows at the policy's
rate, so no background process is needed and tests can drive it explicitly.
"""
from __future__ import annotations

import os
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from ...errors import DriverError, ImgStorageError, ValidationError
from ..base import DmStatus
from . import blockdev, state

SECTOR = 512
TYPES = ("linear", "snapshot", "snapshot-merge")
MERGE_RATE_ENV = "IMGSTORAGE_SIM_MERGE_RATE"
DEFAULT_MERGE_RATE = 8192.0          # chunks per second: 64 MiB/s with 8 KiB chunks
MAX_MERGE_PER_CALL = 65536           # bounds how long one call holds the device

MAGIC = b"SIMCOW01"
_HEADER = struct.Struct("<8sIII")    # magic, version, valid, chunk sectors
_ENTRY = struct.Struct("<QQ")        # origin chunk, COW chunk


# ------------------------------------------------------------------ policy
def _env_rate() -> float:
    text = os.environ.get(MERGE_RATE_ENV)
    try:
        rate = float(text) if text else DEFAULT_MERGE_RATE
    except ValueError:
        rate = DEFAULT_MERGE_RATE
    return max(0.0, rate)


@dataclass
class MergePolicy:
    """How fast merges progress and how long I/O waits on a suspended device.

    ``rate`` is in chunks per second of the clock; 0 means "only
    ``merge_step`` merges".  The clock is injectable so tests need no sleeps.
    """
    rate: float = field(default_factory=_env_rate)
    clock: Callable[[], float] = time.time
    suspend_timeout: float = 60.0


policy = MergePolicy()


# ------------------------------------------------------------------ tables
class _Invalid(Exception):
    """A table the kernel would reject with EINVAL; the text says why."""


@dataclass(frozen=True)
class Table:
    length: int                      # sectors
    kind: str
    device: str                      # linear target, or snapshot origin
    offset: int = 0                  # linear only, sectors
    cow: Optional[str] = None
    chunk: int = 0                   # sectors

    def text(self) -> str:
        if self.kind == "linear":
            return f"0 {self.length} linear {self.device} {self.offset}"
        return f"0 {self.length} {self.kind} {self.device} {self.cow} P {self.chunk}"

    def devices(self) -> Tuple[str, ...]:
        return (self.device,) if self.cow is None else (self.device, self.cow)


def _device_arg(path: str) -> str:
    try:
        blockdev.parse_path(path)
    except ImgStorageError as exc:
        raise _Invalid(str(exc)) from None
    return path


def _number(text: str) -> Optional[int]:
    """A plain decimal number, or None (``str.isdigit`` also admits "²")."""
    return int(text) if text.isascii() and text.isdigit() else None


def parse_table(text: str) -> Table:
    """Parse one table line, checking what ``dmsetup`` and the kernel check."""
    if not isinstance(text, str):
        raise _Invalid("a table must be text")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        raise _Invalid("exactly one target line is supported")
    parts = lines[0].split()
    if len(parts) < 3:
        raise _Invalid("expected 'START LENGTH TYPE ARGS...'")
    start, length, kind, args = parts[0], parts[1], parts[2], parts[3:]
    if start != "0":
        raise _Invalid("the target must start at sector 0")
    sectors = _number(length)
    if not sectors:
        raise _Invalid(f"invalid length '{length}'")
    if kind not in TYPES:
        raise _Invalid(f"unknown target type '{kind}'")
    if kind == "linear":
        offset = _number(args[1]) if len(args) == 2 else None
        if offset is None:
            raise _Invalid("linear needs 'DEVICE OFFSET'")
        return Table(sectors, kind, _device_arg(args[0]), offset=offset)
    if len(args) != 4:
        raise _Invalid(f"{kind} needs 'ORIGIN COW P CHUNK'")
    origin, cow, persist, chunk = args
    if persist.upper() != "P":
        raise _Invalid("only persistent (P) snapshots are simulated")
    size = _number(chunk)
    if size is None or not 8 <= size <= 2048 or size & (size - 1):
        raise _Invalid(f"invalid chunk size '{chunk}': a power of two from 8 to 2048 sectors")
    if origin == cow:
        raise _Invalid("origin and COW must be different devices")
    return Table(sectors, kind, _device_arg(origin), cow=_device_arg(cow), chunk=size)


# -------------------------------------------------------------- COW store
class _CowFull(Exception):
    pass


class CowStore:
    """The persistent exception store kept inside a COW device."""

    def __init__(self, cow: "blockdev.SimDevice", chunk: int, exceptions: List[Tuple[int, int]],
                 valid: bool):
        self.cow = cow
        self.chunk = chunk                           # sectors
        self.chunk_bytes = chunk * SECTOR
        self.per_area = self.chunk_bytes // _ENTRY.size
        self.exceptions = exceptions                 # in allocation order
        self.lookup: Dict[int, int] = dict(exceptions)
        self.valid = valid
        self.total_chunks = cow.size // self.chunk_bytes

    @classmethod
    def open(cls, cow: "blockdev.SimDevice", chunk: int, create: bool) -> "CowStore":
        """Read the store; with ``create``, a zeroed device becomes a new, empty store."""
        chunk_bytes = chunk * SECTOR
        if cow.size < 3 * chunk_bytes:
            raise _Invalid(f"COW device {cow.path} is smaller than 3 chunks")
        magic, version, valid, disk_chunk = _HEADER.unpack(cow.read(0, _HEADER.size))
        if magic == bytes(len(MAGIC)):
            if not create:
                raise _Invalid(f"no snapshot store on {cow.path}")
            store = cls(cow, chunk, [], True)
            cow.write(store._area_offset(0), bytes(chunk_bytes))
            store._write_header()
            return store
        if magic != MAGIC or version != 1 or disk_chunk < 8 or disk_chunk & (disk_chunk - 1):
            raise _Invalid(f"invalid or corrupt snapshot store on {cow.path}")
        store = cls(cow, disk_chunk, [], bool(valid))  # the store's own chunk size wins
        store._load()
        return store

    def _area_chunk(self, area: int) -> int:
        return 1 + area * (self.per_area + 1)

    def _area_offset(self, area: int) -> int:
        return self._area_chunk(area) * self.chunk_bytes

    def _data_chunk(self, index: int) -> int:
        return self._area_chunk(index // self.per_area) + 1 + index % self.per_area

    def _write_header(self) -> None:
        self.cow.write(0, _HEADER.pack(MAGIC, 1, 1 if self.valid else 0, self.chunk))

    def _load(self) -> None:
        area = 0
        while self._area_chunk(area) < self.total_chunks:
            raw = self.cow.read(self._area_offset(area), self.chunk_bytes)
            for slot in range(self.per_area):
                old, new = _ENTRY.unpack_from(raw, slot * _ENTRY.size)
                if new == 0:
                    return
                index = len(self.exceptions)
                if new != self._data_chunk(index) or old in self.lookup:
                    raise _Invalid(f"invalid or corrupt snapshot store on {self.cow.path}")
                self.exceptions.append((old, new))
                self.lookup[old] = new
            area += 1

    def figures(self) -> Tuple[int, int, int]:
        """``(allocated, total, metadata)`` sectors, as dm-snapshot counts them."""
        n = len(self.exceptions)
        areas = n // self.per_area
        return ((2 + n + areas) * self.chunk, self.cow.size // SECTOR, (areas + 2) * self.chunk)

    def allocate(self, origin_chunk: int) -> int:
        new = self._data_chunk(len(self.exceptions))
        if new >= self.total_chunks:
            raise _CowFull()
        self.exceptions.append((origin_chunk, new))
        self.lookup[origin_chunk] = new
        return new

    def commit(self, first_index: int) -> None:
        """Write the areas from the one holding ``first_index`` to the end.

        Rewriting through the area after the last entry also zeroes the area a
        full one leads to, which is what ends the table there.
        """
        for area in range(first_index // self.per_area, len(self.exceptions) // self.per_area + 1):
            if self._area_chunk(area) >= self.total_chunks:
                break
            entries = self.exceptions[area * self.per_area:(area + 1) * self.per_area]
            raw = bytearray(self.chunk_bytes)
            for slot, (old, new) in enumerate(entries):
                _ENTRY.pack_into(raw, slot * _ENTRY.size, old, new)
            self.cow.write(self._area_offset(area), bytes(raw))

    def drop_last(self, count: int) -> None:
        """Forget the newest ``count`` exceptions (they were merged)."""
        keep = len(self.exceptions) - count
        for old, _ in self.exceptions[keep:]:
            del self.lookup[old]
        del self.exceptions[keep:]
        self.commit(keep)

    def invalidate(self) -> None:
        self.valid = False
        self._write_header()


# ----------------------------------------------------------------- state
def check_name(name: str) -> str:
    try:
        return state.zvol_name(name)
    except ValidationError:
        raise ValidationError(f"invalid device-mapper name {name!r}") from None


def _dir(root: Union[str, Path], host: str) -> Path:
    return state.subsystem_dir(root, host, "dm")


def _state_path(root: Union[str, Path], host: str, name: str) -> Path:
    return _dir(root, host) / f"{check_name(name)}.json"


def _lock(root: Union[str, Path], host: str, name: str):
    return state.locked(_dir(root, host) / ".locks" / check_name(name))


def _read_state(root: Union[str, Path], host: str, name: str) -> Optional[dict]:
    if not state.host_exists(root, host):
        return None
    return state.read_json(_state_path(root, host, name))


def device_names(root: Union[str, Path], host: str) -> List[str]:
    folder = _dir(root, host)
    if not state.host_exists(root, host) or not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir()
                  if p.name.endswith(".json") and not p.name.startswith("."))


def referenced_devices(root: Union[str, Path], host: str) -> Dict[str, Set[str]]:
    """The devices each dm device holds open, through its live and its staged table."""
    out: Dict[str, Set[str]] = {}
    for name in device_names(root, host):
        st = _read_state(root, host, name) or {}
        paths: Set[str] = set()
        for text in (st.get("live"), st.get("inactive")):
            if text:
                try:
                    paths.update(parse_table(text).devices())
                except _Invalid:
                    pass
        out[name] = paths
    return out


def _fail(op: str, name: str, why: str) -> DriverError:
    return DriverError(f"device-mapper: {op} ioctl on {name} failed: {why}")


class _Engine:
    """Reads, writes and merges through one table; the caller holds the device lock."""

    def __init__(self, root: Path, host: str, table: Table, depth: int):
        self.root, self.host, self.table, self.depth = root, host, table, depth
        self._origin_dev: Optional["blockdev.SimDevice"] = None

    def open(self, path: str) -> "blockdev.SimDevice":
        try:
            return blockdev.open_device(self.root, self.host, path, _depth=self.depth + 1)
        except blockdev.DeviceIOError:
            raise
        except DriverError as exc:
            raise blockdev.DeviceIOError(f"I/O error: {exc}") from None

    def store(self) -> CowStore:
        try:
            return CowStore.open(self.open(self.table.cow), self.table.chunk, create=False)
        except _Invalid as exc:
            raise blockdev.DeviceIOError(f"I/O error: {exc}") from None

    def _runs(self, store: CowStore, offset: int, length: int) -> Iterator[Tuple[bool, int, int, int]]:
        """``(in_cow, device_offset, position_in_request, length)`` runs, contiguous ones joined."""
        cb = store.chunk_bytes
        pos, run = 0, None
        while pos < length:
            at = offset + pos
            chunk, inner = divmod(at, cb)
            n = min(cb - inner, length - pos)
            new = store.lookup.get(chunk)
            piece = (new is not None, (new * cb + inner) if new is not None else at, pos, n)
            if run and run[0] == piece[0] and run[1] + run[3] == piece[1]:
                run = (run[0], run[1], run[2], run[3] + n)
            else:
                if run:
                    yield run
                run = piece
            pos += n
        if run:
            yield run

    def _origin(self) -> "blockdev.SimDevice":
        """The origin, opened only when a request reaches it (a dead origin does not
        stop reads of chunks the store holds)."""
        if self._origin_dev is None:
            self._origin_dev = self.open(self.table.device)
        return self._origin_dev

    def _valid_store(self) -> CowStore:
        store = self.store()
        if not store.valid:
            raise blockdev.DeviceIOError(f"I/O error: snapshot on {self.table.cow} is invalid")
        return store

    def read(self, offset: int, length: int) -> bytes:
        t = self.table
        if t.kind == "linear":
            return self.open(t.device).read(t.offset * SECTOR + offset, length)
        store, out = self._valid_store(), bytearray(length)
        for in_cow, where, pos, n in self._runs(store, offset, length):
            out[pos:pos + n] = (store.cow if in_cow else self._origin()).read(where, n)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        t = self.table
        if t.kind == "linear":
            self.open(t.device).write(t.offset * SECTOR + offset, data)
            return
        store = self._valid_store()
        cb, first, pos = store.chunk_bytes, len(store.exceptions), 0
        while pos < len(data):
            chunk, inner = divmod(offset + pos, cb)
            n = min(cb - inner, len(data) - pos)
            piece = data[pos:pos + n]
            new = store.lookup.get(chunk)
            if new is not None:
                store.cow.write(new * cb + inner, piece)
            elif t.kind == "snapshot-merge":
                self._origin().write(offset + pos, piece)  # not in the store: the origin is current
            else:
                whole = bytearray(cb)
                if n < cb:                                 # copy-on-write of the rest of the chunk
                    origin = self._origin()
                    avail = min(cb, origin.size - chunk * cb)
                    whole[:avail] = origin.read(chunk * cb, avail)
                whole[inner:inner + n] = piece
                try:
                    new = store.allocate(chunk)
                except _CowFull:
                    store.invalidate()
                    raise blockdev.DeviceIOError(f"I/O error: snapshot COW {t.cow} is full; "
                                                 "the snapshot is now invalid") from None
                store.cow.write(new * cb, bytes(whole))
            pos += n
        if len(store.exceptions) != first:
            store.commit(first)                            # data first, then the table

    def merge(self, limit: int) -> int:
        """Copy up to ``limit`` of the newest exceptions back to the origin."""
        store = self.store()
        count = min(limit, len(store.exceptions))
        if count <= 0 or not store.valid:
            return 0
        origin, cb = self._origin(), store.chunk_bytes
        size = origin.size
        for old, new in reversed(store.exceptions[-count:]):
            take = min(cb, size - old * cb)
            if take > 0:
                origin.write(old * cb, store.cow.read(new * cb, take))
        store.drop_last(count)
        return count

    def status_args(self) -> str:
        if self.table.kind == "linear":
            return ""
        try:
            store = self.store()
        except DriverError:
            return "Invalid"
        if not store.valid:
            return "Invalid"
        alloc, total, meta = store.figures()
        return f"{alloc}/{total} {meta}"


def _advance_merge(root: Path, host: str, name: str, st: dict, pol: MergePolicy,
                   depth: int = 0) -> None:
    """Credit a merging device with the chunks the time since it was last looked at allows."""
    if st.get("suspended") or not st.get("live") or pol.rate <= 0:
        return
    table = parse_table(st["live"])
    if table.kind != "snapshot-merge":
        return
    now = pol.clock()
    last = st.get("merge_clock")
    if last is None or last > now:
        st["merge_clock"] = now
        state.write_json(_state_path(root, host, name), st)
        return
    budget = min(int((now - last) * pol.rate), MAX_MERGE_PER_CALL)
    if budget <= 0:
        return
    merged = _Engine(root, host, table, depth).merge(budget)
    st["merge_clock"] = now if merged < budget else last + merged / pol.rate
    state.write_json(_state_path(root, host, name), st)


class MappedDevice(blockdev.SimDevice):
    """``/dev/mapper/<name>``: every request goes through the table live at that moment."""

    def __init__(self, root: Path, host: str, name: str, depth: int):
        super().__init__(f"/dev/mapper/{name}")
        self.root, self.host, self.name, self.depth = root, host, name, depth
        self._table: Optional[Table] = None

    def _current(self) -> dict:
        st = _read_state(self.root, self.host, self.name)
        if st is None:
            raise blockdev.DeviceIOError(f"I/O error on {self.path}: the device was removed")
        return st

    @property
    def size(self) -> int:                     # answered even while suspended, as the kernel does
        return parse_table(self._current()["live"]).length * SECTOR

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the device; a suspended device makes I/O wait for resume, as in the kernel."""
        deadline = time.monotonic() + policy.suspend_timeout      # real waiting: real time
        while True:
            with _lock(self.root, self.host, self.name):
                st = self._current()
                if not st.get("suspended"):
                    try:
                        _advance_merge(self.root, self.host, self.name, st, policy, self.depth)
                    except DriverError:
                        pass                   # a failed merge stalls; it does not fail the I/O
                    self._table = parse_table(st["live"])
                    try:
                        yield
                    finally:
                        self._table = None
                    return
            if time.monotonic() >= deadline:
                raise blockdev.DeviceIOError(f"I/O error on {self.path}: the device stayed "
                                             f"suspended for {policy.suspend_timeout:g} s")
            time.sleep(0.01)

    def _engine(self) -> _Engine:
        assert self._table is not None
        return _Engine(self.root, self.host, self._table, self.depth)

    def _size(self) -> int:
        assert self._table is not None
        return self._table.length * SECTOR

    def _read(self, offset: int, length: int) -> bytes:
        return self._engine().read(offset, length)

    def _write(self, offset: int, data: bytes) -> None:
        self._engine().write(offset, data)


def mapped_device(root: Union[str, Path], host: str, name: str, depth: int = 0) -> MappedDevice:
    if _read_state(root, host, check_name(name)) is None:
        raise DriverError(f"cannot open /dev/mapper/{name}: No such device on {host}")
    return MappedDevice(Path(root), host, name, depth)


# ----------------------------------------------------------------- driver
class SimDeviceMapper:
    """The DeviceMapperDriver of one simulated host.

    ``merge_policy`` applies to this object's calls; I/O through
    ``/dev/mapper/<name>`` follows the module's ``policy``, which is what the
    daemons and the tool share.
    """

    def __init__(self, root: Union[str, Path], host: str, *,
                 merge_policy: Optional[MergePolicy] = None):
        self.root = Path(root)
        self.host = state.sim_host(host)
        self._policy = merge_policy

    @property
    def policy(self) -> MergePolicy:
        return self._policy or policy

    def _check(self, op: str, name: str, table: str) -> Table:
        """Parse a table and check it against this host's devices, changing nothing."""
        try:
            t = parse_table(table)
        except _Invalid as exc:
            raise _fail(op, name, f"Invalid argument ({exc})") from None
        if f"/dev/mapper/{name}" in t.devices():
            raise _fail(op, name, "Invalid argument (a device cannot map onto itself)")
        sizes = {}
        for path in t.devices():
            try:
                sizes[path] = blockdev.open_device(self.root, self.host, path, _depth=1).size
            except DriverError:
                raise _fail(op, name, f"No such device or address ({path} not found)") from None
        if sizes[t.device] < (t.offset + t.length) * SECTOR:
            raise _fail(op, name, f"Invalid argument (device {t.device} too small for target)")
        return t

    def _prepare(self, op: str, name: str, t: Table) -> None:
        """Read (or, on a zeroed COW, start) the snapshot store, as loading the table does."""
        if t.cow is None:
            return
        try:
            store = CowStore.open(blockdev.open_device(self.root, self.host, t.cow, _depth=1),
                                  t.chunk, create=True)
        except _Invalid as exc:
            raise _fail(op, name, f"Invalid argument ({exc})") from None
        if t.kind == "snapshot-merge" and not store.valid:
            raise _fail(op, name, "Invalid argument (snapshot is invalid, cannot merge)")

    def _existing(self, op: str, name: str) -> dict:
        st = _read_state(self.root, self.host, name)
        if st is None:
            raise _fail(op, name, "No such device or address")
        return st

    def _save(self, name: str, st: dict) -> None:
        state.write_json(_state_path(self.root, self.host, name), st)

    def create(self, name: str, table: str) -> None:
        check_name(name)
        if self.exists(name):
            raise _fail("create", name, "Device or resource busy")
        t = self._check("create", name, table)
        with _lock(self.root, self.host, name):
            if _read_state(self.root, self.host, name) is not None:
                raise _fail("create", name, "Device or resource busy")
            self._prepare("create", name, t)
            merging = t.kind == "snapshot-merge"
            self._save(name, {"name": name, "live": t.text(), "inactive": None, "suspended": False,
                              "merge_clock": self.policy.clock() if merging else None})

    def reload(self, name: str, table: str) -> None:
        check_name(name)
        self._existing("reload", name)
        t = self._check("reload", name, table)
        with _lock(self.root, self.host, name):
            st = self._existing("reload", name)
            self._prepare("reload", name, t)
            st["inactive"] = t.text()
            self._save(name, st)

    def suspend(self, name: str) -> None:
        check_name(name)
        self._existing("suspend", name)  # first, so a typo leaves no lock file
        with _lock(self.root, self.host, name):
            st = self._existing("suspend", name)
            if not st.get("suspended"):
                _advance_merge(self.root, self.host, name, st, self.policy)
                st["suspended"] = True
                self._save(name, st)

    def resume(self, name: str) -> None:
        check_name(name)
        self._existing("resume", name)  # first, so a typo leaves no lock file
        with _lock(self.root, self.host, name):
            st = self._existing("resume", name)
            swapped = bool(st.get("inactive"))
            if not swapped and not st.get("suspended"):
                return
            if swapped:
                st["live"], st["inactive"] = st["inactive"], None
            merging = parse_table(st["live"]).kind == "snapshot-merge"
            st["merge_clock"] = self.policy.clock() if merging else None  # no credit for the pause
            st["suspended"] = False
            self._save(name, st)

    def remove(self, name: str) -> None:
        check_name(name)
        self._existing("remove", name)  # first, so a typo leaves no lock file
        with _lock(self.root, self.host, name):
            self._existing("remove", name)
            if blockdev.device_users(self.root, self.host, f"/dev/mapper/{name}"):
                raise _fail("remove", name, "Device or resource busy")
            _state_path(self.root, self.host, name).unlink()

    def status(self, name: Optional[str] = None) -> List[DmStatus]:
        names = [check_name(name)] if name is not None else device_names(self.root, self.host)
        if name is not None and not self.exists(name):
            raise DriverError(f"Device {name} does not exist")
        out = []
        for each in names:
            with _lock(self.root, self.host, each):
                st = _read_state(self.root, self.host, each)
                if st is None:
                    if name is None:
                        continue                       # removed while listing
                    raise DriverError(f"Device {each} does not exist")
                merge_failed = False
                try:
                    _advance_merge(self.root, self.host, each, st, self.policy)
                except DriverError:
                    merge_failed = True                # an origin or COW that cannot be written
                t = parse_table(st["live"])
                args = ("Merge failed" if merge_failed
                        else _Engine(self.root, self.host, t, 0).status_args())
            out.append(DmStatus(name=each, start=0, length=t.length, target_type=t.kind, args=args))
        return out

    def table(self, name: str) -> str:
        check_name(name)
        return parse_table(self._existing("table", name)["live"]).text()

    def exists(self, name: str) -> bool:
        return _read_state(self.root, self.host, check_name(name)) is not None

    def merge_step(self, name: str, max_chunks: int) -> int:
        """Merge up to ``max_chunks`` now, whatever the clock says.

        Lets tests and tools drive a merge step by step, without time passing.
        """
        check_name(name)
        self._existing("merge", name)
        with _lock(self.root, self.host, name):
            st = self._existing("merge", name)
            t = parse_table(st["live"])
            if t.kind != "snapshot-merge" or st.get("suspended"):
                return 0
            return _Engine(self.root, self.host, t, 0).merge(max_chunks)
