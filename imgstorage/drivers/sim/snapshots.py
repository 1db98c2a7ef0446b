"""Copy-on-write snapshots of a simulated zvol, one volblocksize block at a time.

Layout inside a zvol's folder (``sim_root/<host>/zfs/<pool>/<vol>/``)::

    data                       the live volume (sparse, volsize bytes)
    snapshots/<snap>/meta.json guid, creation order (``seq``), creation time
    snapshots/<snap>/blocks    sparse, volsize bytes: blocks this snapshot had to keep
    snapshots/<snap>/changed   bitmap, one bit per block (block b: byte b // 8,
                               value 1 << b % 8): blocks written while it was the newest
    snapshots/<snap>/holds.json  the tags of its holds (``zfs hold``), sorted; absent: none

Taking a snapshot copies nothing, so it costs the same for a 64 GiB volume as
for an empty one.  The live volume pays instead, on the first write to each
block after the newest snapshot: the block's old content moves into that
snapshot's ``blocks`` and its bit is set.  With snapshots S1..Sn (oldest first)
it follows that

* block b of Sk is in the ``blocks`` of the oldest Si (i >= k) that has b in
  its changed set, or still in the live volume if none has, and
* the blocks that differ between Sa and a later Sb are the union of the
  changed sets of Sa..Sb-1, known without reading any data.

Invariant: a block that is all zeros is a hole, in the live volume and in
every ``blocks`` file (writes punch such blocks, copies skip them).  Which
blocks hold data is then answered by the file's extents (``SEEK_DATA``), as
ZFS answers it from its block pointers, and a send can be sized exactly
without reading a byte.

Every change of a zvol's bytes goes through :meth:`Volume.write` or
:meth:`Volume.discard`, under the host's ``zfs`` lock, which is also held
while a snapshot is resolved: daemons and the ``imgstorage-sim`` tool change
the same volumes from several processes.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, ContextManager, Iterable, Iterator, List, Optional, Sequence, Set,
                    Tuple, Union)

from ...errors import DriverError, ValidationError
from . import state
from .sparse import (Bitmap, BlockMap, data_extents, empty, pread_all, punch_hole, pwrite_all,
                     read_range, zeros)

VOLBLOCKSIZE = 128 * 1024
DATA = "data"
META = "meta.json"
SNAPSHOTS = "snapshots"
BLOCKS = "blocks"
CHANGED = "changed"
HOLDS = "holds.json"
MAX_TAG = 255                     # zfs refuses tags that do not fit a dataset name


class NoSuchVolume(DriverError):
    """The volume's files are gone (destroyed, or replaced by a receive)."""


def snapshot_name(value: Any) -> str:
    """Snapshot names follow the zvol rules: they end up as folder names too."""
    try:
        return state.zvol_name(value)
    except ValidationError:
        raise ValidationError(f"invalid snapshot name {value!r}: "
                              "use letters, digits and _ . : -") from None


def hold_tag(value: Any) -> str:
    """A hold's tag: free text for zfs, but one word, as it goes on a command line there."""
    if (not isinstance(value, str) or not value or len(value) > MAX_TAG or value.startswith("-")
            or any(c.isspace() or not c.isprintable() for c in value)):
        raise ValidationError(f"invalid zfs hold tag {value!r}")
    return value


def _copy_kept(kept: Path, dest: Path, blocks, block: int) -> None:
    """Give ``dest`` these blocks as a snapshot's ``kept`` file has them.

    A block the snapshot kept is copied; one it never had to keep was a hole
    then, so it becomes a hole in ``dest`` too.
    """
    held = BlockMap(kept, block)
    src, dst = os.open(kept, os.O_RDONLY), os.open(dest, os.O_WRONLY)
    try:
        for b in blocks:
            if b in held:
                pwrite_all(dst, pread_all(src, block, b * block), b * block)
            else:
                punch_hole(dst, b * block, block)
    finally:
        os.close(src)
        os.close(dst)


def _consecutive(blocks: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """``(first, count)`` of each run of consecutive block numbers, in the order given."""
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i] != blocks[i - 1] + 1:
            yield blocks[start], i - start
            start = i


# --------------------------------------------------------------- volumes
@dataclass(frozen=True)
class Snapshot:
    name: str
    guid: int
    seq: int
    creation: int
    folder: Path

    @property
    def blocks(self) -> Path:
        return self.folder / BLOCKS

    @property
    def changed(self) -> Bitmap:
        return Bitmap(self.folder / CHANGED)

    @property
    def holds(self) -> List[str]:
        return list(state.read_json(self.folder / HOLDS, []))


def new_guid() -> int:
    """A snapshot's identity; a received snapshot keeps its sender's, as in ZFS."""
    return secrets.randbits(63) | 1


class Volume:
    """One zvol's folder: its live bytes, its snapshots, and the one way to change them.

    ``label`` is the dataset name used in error texts (``tank/v``); the folder
    may also be a receive's hidden staging folder, which behaves the same.
    """

    def __init__(self, root: Union[str, Path], host: str, folder: Path, label: str):
        self.root = Path(root)
        self.host = host
        self.folder = folder
        self.label = label
        self.data = folder / DATA

    @classmethod
    def of(cls, root: Union[str, Path], host: str, pool: str, zvol: str) -> "Volume":
        return cls(root, host, state.zvol_dir(root, host, pool, zvol),
                   f"{state.zpool_name(pool)}/{state.zvol_name(zvol)}")

    def lock(self) -> ContextManager[None]:
        """The host's ``zfs`` lock; an unknown host has no volumes (and gets no folder)."""
        if not state.host_exists(self.root, self.host):
            raise self._missing()
        return state.subsystem_lock(self.root, self.host, "zfs")

    def exists(self) -> bool:
        return (self.folder / META).is_file() and self.data.is_file()

    def geometry(self) -> Tuple[int, int]:
        """``(volsize, volblocksize)``."""
        meta = state.read_json(self.folder / META)
        if meta is None:
            raise self._missing()
        return int(meta["volsize"]), int(meta.get("volblocksize", VOLBLOCKSIZE))

    def _missing(self) -> NoSuchVolume:
        return NoSuchVolume(f"cannot open '{self.label}': dataset does not exist")

    # ---------------------------------------------------------- snapshots
    def snapshots(self) -> List[Snapshot]:
        """Oldest first.  A folder without meta is one being made or removed: not a snapshot."""
        out = []
        try:
            entries = list(os.scandir(self.folder / SNAPSHOTS))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            meta = state.read_json(Path(entry.path) / META)
            if meta is None:
                continue
            out.append(Snapshot(entry.name, int(meta["guid"]), int(meta["seq"]),
                                int(meta.get("creation", 0)), Path(entry.path)))
        return sorted(out, key=lambda s: s.seq)

    def _index(self, snaps: Sequence[Snapshot], name: str) -> Optional[int]:
        for i, snap in enumerate(snaps):
            if snap.name == name:
                return i
        return None

    def create_snapshot(self, name: str, guid: Optional[int] = None) -> Snapshot:
        """Take a snapshot: two empty sparse files and a little JSON, whatever the volume's size."""
        snapshot_name(name)
        missing = self._missing()
        if not self.exists():
            raise missing
        with self.lock():
            if not self.exists():
                raise missing
            snaps = self.snapshots()
            if self._index(snaps, name) is not None:
                raise DriverError(f"cannot create snapshot '{self.label}@{name}': "
                                  "dataset already exists")
            volsize, block = self.geometry()
            top = self.folder / SNAPSHOTS
            top.mkdir(exist_ok=True)
            tmp = top / f".creating-{name}-{uuid.uuid4().hex}"
            try:
                tmp.mkdir()
                with open(tmp / BLOCKS, "xb") as fh:
                    fh.truncate(volsize)
                Bitmap.create(tmp / CHANGED, -(-volsize // block))
                meta = {"guid": guid if guid is not None else new_guid(),
                        "seq": max((s.seq for s in snaps), default=0) + 1,
                        "creation": int(time.time())}
                state.write_json(tmp / META, meta)
                os.rename(tmp, top / name)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return Snapshot(name, meta["guid"], meta["seq"], meta["creation"], top / name)

    def destroy_snapshot(self, name: str) -> None:
        """Drop a snapshot; what it kept for older snapshots moves to its older neighbour.

        Blocks it kept that the neighbour did not are exactly the ones the
        neighbour now needs (unchanged between the two, then overwritten), and
        the neighbour's changed set becomes the union, so the incremental sets
        between the remaining snapshots stay right.
        """
        none = DriverError("could not find any snapshots to destroy; check snapshot names.")
        if not self.exists():
            raise none
        with self.lock():
            snaps = self.snapshots()
            index = self._index(snaps, name)
            if index is None:
                raise none
            gone = snaps[index]
            if gone.holds:
                raise self.held(gone)
            if index > 0:
                self._fold(snaps[index - 1], gone)
            trash = gone.folder.with_name(f".destroying-{name}-{uuid.uuid4().hex}")
            os.rename(gone.folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def held(self, snap: Snapshot) -> DriverError:
        """What zfs says when a destroy meets a hold."""
        return DriverError(f"cannot destroy snapshot {self.label}@{snap.name}: dataset is busy")

    # -------------------------------------------------------------- holds
    def _held_snapshot(self, name: str, verb: str) -> Snapshot:
        snapshot_name(name)
        missing = DriverError(f"{verb} '{self.label}@{name}': dataset does not exist")
        if not self.exists():
            raise missing
        snaps = self.snapshots()
        index = self._index(snaps, name)
        if index is None:
            raise missing
        return snaps[index]

    def hold(self, name: str, tag: str) -> None:
        """``zfs hold``; a tag already on the snapshot is fine (callers re-assert holds)."""
        hold_tag(tag)
        if not state.host_exists(self.root, self.host):
            raise DriverError(f"cannot hold snapshot '{self.label}@{name}': "
                              "dataset does not exist")
        with self.lock():
            snap = self._held_snapshot(name, "cannot hold snapshot")
            tags = snap.holds
            if tag not in tags:
                state.write_json(snap.folder / HOLDS, sorted(tags + [tag]))

    def release(self, name: str, tag: str) -> None:
        """``zfs release``; a tag that is not there is fine (the goal is that it is not)."""
        hold_tag(tag)
        if not state.host_exists(self.root, self.host):
            raise DriverError(f"cannot release hold from snapshot '{self.label}@{name}': "
                              "dataset does not exist")
        with self.lock():
            snap = self._held_snapshot(name, "cannot release hold from snapshot")
            tags = snap.holds
            if tag not in tags:
                return
            tags.remove(tag)
            if tags:
                state.write_json(snap.folder / HOLDS, tags)
            else:
                os.unlink(snap.folder / HOLDS)

    def holds(self, name: str) -> List[str]:
        """The tags on a snapshot, sorted (``zfs holds``)."""
        return sorted(self._held_snapshot(name, "cannot open").holds)

    def _fold(self, older: Snapshot, newer: Snapshot) -> None:
        _, block = self.geometry()
        mine, theirs = older.changed.all(), newer.changed.all()
        if not mine:                                    # nothing kept yet: take the newer's files
            os.replace(newer.blocks, older.blocks)
            os.replace(newer.changed.path, older.changed.path)
            return
        move = sorted(theirs - mine)
        if not move:
            return
        _copy_kept(newer.blocks, older.blocks, move, block)
        older.changed.add(move)                           # only now do reads look there

    def rollback(self, name: Optional[str] = None) -> bool:
        """Make the live volume the most recent snapshot again; True if anything changed.

        Only the blocks in its changed set are touched, so this costs what was
        written since, not the volume's size.
        """
        with self.lock():
            if not self.exists():
                raise self._missing()
            snaps = self.snapshots()
            if name is not None:
                index = self._index(snaps, name)
                if index is None:
                    raise DriverError(f"cannot open '{self.label}@{name}': dataset does not exist")
                if index != len(snaps) - 1:
                    raise DriverError(f"cannot rollback to '{self.label}@{name}': more recent "
                                      "snapshots or bookmarks exist")
            if not snaps:
                raise DriverError(f"cannot rollback '{self.label}': no snapshots")
            last = snaps[-1]
            changed = sorted(last.changed.all())
            if not changed:
                return False
            volsize, block = self.geometry()
            _copy_kept(last.blocks, self.data, changed, block)
            last.changed.clear()                          # after the data: a crash repeats it
            empty(last.blocks, volsize)
            return True

    # ------------------------------------------------------------ writes
    def write(self, offset: int, data: Union[bytes, bytearray]) -> None:
        if data:
            self._change(offset, len(data), bytes(data))

    def discard(self, offset: int, length: int) -> None:
        """Free a range, as a TRIM/UNMAP of the zvol does: it reads as zeros and costs nothing."""
        if length > 0:
            self._change(offset, length, None)

    def _change(self, offset: int, length: int, data: Optional[bytes]) -> None:
        """The single path by which a zvol's bytes change (``data`` None: zeros, punched)."""
        with self.lock():
            try:
                fd = os.open(self.data, os.O_RDWR)
            except FileNotFoundError:
                raise self._missing() from None
            try:
                volsize, block = self.geometry()
                if offset < 0 or offset + length > volsize:
                    raise DriverError(f"{self.label}: {length} bytes at offset {offset} go beyond "
                                      f"the end of the volume ({volsize} bytes)")
                first, last = offset // block, (offset + length - 1) // block
                snaps = self.snapshots()
                if snaps:
                    self._keep_old(fd, snaps[-1], first, last, block)
                if data is None:
                    punch_hole(fd, offset, length)
                else:
                    pwrite_all(fd, data, offset)
                self._punch_zero_blocks(fd, offset, length, data, block)
            finally:
                os.close(fd)

    def _keep_old(self, fd: int, newest: Snapshot, first: int, last: int, block: int) -> None:
        """Before a block first changes after the newest snapshot, move its content there."""
        bits = newest.changed
        done = bits.members(first, last)
        todo = [b for b in range(first, last + 1) if b not in done]
        if not todo:
            return
        held: Set[int] = set()
        for begin, stop in data_extents(fd, todo[0] * block, (todo[-1] + 1) * block):
            held.update(range(begin // block, (stop - 1) // block + 1))
        out = os.open(newest.blocks, os.O_WRONLY)
        try:
            for b in todo:
                old = pread_all(fd, block, b * block) if b in held else None
                if old is not None and old != zeros(block):
                    pwrite_all(out, old, b * block)
                else:                       # a hole kept as a hole, over any copy a crash left
                    punch_hole(out, b * block, block)
        finally:
            os.close(out)
        bits.add(todo)                                    # after the copy: a crash copies again

    def _punch_zero_blocks(self, fd: int, offset: int, length: int, data: Optional[bytes],
                           block: int) -> None:
        end = offset + length
        for b in range(offset // block, (end - 1) // block + 1):
            lo, hi = max(offset, b * block), min(end, (b + 1) * block)
            if data is not None and (data[lo - offset] or data[hi - offset - 1]
                                     or data.count(0, lo - offset, hi - offset) != hi - lo):
                continue                                  # something non-zero landed here
            if hi - lo < block and pread_all(fd, block, b * block) != zeros(block):
                continue
            if data is None and hi - lo == block:
                continue                                  # punched already
            punch_hole(fd, b * block, block)

    # ------------------------------------------------------------- reads
    def _layers(self, snaps: Sequence[Snapshot], index: int, first: int, last: int) -> List[Path]:
        """For blocks ``first..last`` of snapshot ``index``: the file holding each one."""
        holders: List[Optional[Path]] = [None] * (last - first + 1)
        for snap in snaps[index:]:
            for b in snap.changed.members(first, last):
                if holders[b - first] is None:
                    holders[b - first] = snap.blocks
        return [h or self.data for h in holders]

    def _find(self, name: str, guid: Optional[int] = None) -> Tuple[List[Snapshot], int]:
        snaps = self.snapshots()
        index = self._index(snaps, name)
        if index is None or (guid is not None and snaps[index].guid != guid):
            raise DriverError(f"cannot open '{self.label}@{name}': dataset does not exist")
        return snaps, index

    def read_snapshot(self, name: str, offset: int, length: int) -> bytes:
        """Bytes of a snapshot, exactly as the volume was when it was taken."""
        with self.lock():
            if not self.exists():
                raise self._missing()
            snaps, index = self._find(name)
            volsize, block = self.geometry()
            if offset < 0 or length < 0 or offset + length > volsize:
                raise DriverError(f"{self.label}@{name}: {length} bytes at offset {offset} go "
                                  f"beyond the end of the volume ({volsize} bytes)")
            if length == 0:
                return b""
            first, last = offset // block, (offset + length - 1) // block
            out = bytearray()
            for b, path in zip(range(first, last + 1), self._layers(snaps, index, first, last)):
                lo, hi = max(offset, b * block), min(offset + length, (b + 1) * block)
                out += read_range(path, lo, hi - lo)
            return bytes(out)

    def read_blocks(self, name: str, guid: int,
                    blocks: Sequence[int]) -> List[Union[bytes, memoryview]]:
        """Whole blocks of a snapshot that must still be the same one (a send in progress).

        Neighbouring blocks kept in the same file are read with one call.
        """
        with self.lock():
            if not self.exists():
                raise self._missing()
            snaps, index = self._find(name, guid)
            _, block = self.geometry()
            out: List[Union[bytes, memoryview]] = []
            for first, count in _consecutive(blocks):
                layers = self._layers(snaps, index, first, first + count - 1)
                i = 0
                while i < count:
                    j = i + 1
                    while j < count and layers[j] == layers[i]:
                        j += 1
                    raw = memoryview(read_range(layers[i], (first + i) * block, (j - i) * block))
                    out.extend(raw[k * block:(k + 1) * block] for k in range(j - i))
                    i = j
            return out

    # ---------------------------------------------------- what a send needs
    def data_blocks(self, name: str, among: Optional[Iterable[int]] = None) -> Set[int]:
        """Blocks of snapshot ``name`` holding data (all, or those ``among``): extents only."""
        with self.lock():
            snaps, index = self._find(name)
            _, block = self.geometry()
            layers = [(snap.changed.all(), BlockMap(snap.blocks, block))
                      for snap in snaps[index:]]
            live = BlockMap(self.data, block)
            if among is None:
                candidates: Set[int] = set(live)
                for changed, _ in layers:
                    candidates |= changed
            else:
                candidates = set(among)
            out = set()
            for b in candidates:
                for changed, held in layers:
                    if b in changed:
                        if b in held:
                            out.add(b)
                        break
                else:
                    if b in live:
                        out.add(b)
            return out

    def changed_between(self, base: str, name: str) -> Set[int]:
        """Blocks written after ``base`` and before ``name`` (``base`` must be older)."""
        with self.lock():
            snaps, first = self._find(base)
            _, last = self._find(name)
            out: Set[int] = set()
            for snap in snaps[first:last]:
                out |= snap.changed.all()
            return out

    def snapshot_bytes(self) -> int:
        """Disk the snapshots hold (ZFS's ``usedbysnapshots``)."""
        total = 0
        for snap in self.snapshots():
            try:
                total += snap.blocks.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total
