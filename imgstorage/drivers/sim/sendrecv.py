"""``zfs send``, ``zfs receive -F`` and their resumable forms (stream format: stream.py).

Send.  What goes into a stream is decided at once, under the host's ``zfs``
lock, from the snapshots' changed sets and the files' extents, so its exact
size is known before a byte of data is read (``send -nP``).  The blocks are
read only as the consumer reads, a batch at a time under the lock, from
wherever the snapshot keeps them at that moment: writes meanwhile move blocks
from the live volume into a snapshot but never change a snapshot's content.

Receive.  Nothing a stream says becomes visible before its END record checked
out.  Blocks land in a hidden staging volume next to the destination
(``<pool>/.receiving-<pid>-<id>-<vol>/``, laid out like a zvol); ``close()`` then

* full stream, no such zvol: renames the staging volume into place;
* full stream, existing zvol without snapshots: swaps its data file for the
  staged one in one rename, so the content is exactly the stream's;
* incremental stream: rolls the destination back to its most recent
  snapshot if it was written since (``-F``), applies the staged blocks and
  frees through the zvol's one write path (so that snapshot keeps its
  content), and takes the snapshot with the sender's guid.

The staging is the receiver's alone and holds no snapshot, so the receiver
writes it directly, each run of neighbouring blocks in one call, blocks of
zeros left as the holes they are there.

A refused, truncated, corrupt or aborted receive removes its staging folder
and leaves the destination as it was.  Staging costs what the stream carries,
never a read of the destination.  A receiver killed midway cannot clean up,
so each new receive on the host removes the staging of receivers whose
process is gone (the pid in the folder's name says whose it is).

Resumable receive (``zfs receive -s``).  The staging belongs to the
destination rather than to a process: ``<pool>/.resume-<vol>/``, made under a
pid name as above and renamed into place once complete, holding besides the
volume files

* ``resume.json``: what the stream brings (snapshot, guids, geometry), and
* ``journal``: fixed-size entries ``(kind u8, first u64, count u64)``, one
  per record received, appended only after the record's block is in the
  staged ``data``.  A DATA record is journaled as ``(1, block, 1)``, a FREE
  as ``(2, first, count)``; frees are kept for the commit only.

The first block not yet received (the resume block) is the end of the last
whole journal entry.  A record staged but not journaled when the receiver
died is simply sent again; a torn entry at the tail is cut off and whatever
the staged data holds from the resume block on is punched away before a
resume stream continues, so a SIGKILL at any instant leaves a state that
resumes to the same bytes.  A receive that is cut short (``abort``, a
truncated stream at ``close``, the process killed) keeps its staging, and the
destination has a resume token (:class:`ResumePoint`) until a resume stream
(``zfs send -t``) completes it, or ``abort_resume`` throws it away.  A stream
that is refused or fails its checks discards the staging as before: its
records were journaled before the digest could vouch for them.  While a
receiver works on the staging it holds an ``flock`` on its ``.receiver``
file, which the kernel releases however the process ends, so nobody else
touches a staging in use and nothing has to guess whether its owner lives.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ...errors import DriverError, NotResumableError, ValidationError
from . import state, stream
from .snapshots import (DATA, META, SNAPSHOTS, VOLBLOCKSIZE, NoSuchVolume, Volume,
                        snapshot_name)
from .sparse import is_zero, pread_all, punch_hole, pwritev_all

READ_BATCH = 32                       # blocks read per hold of the lock: 4 MiB
APPLY_RUN = 64                        # blocks applied per write: 8 MiB
STAGING = ".receiving"
RESUME_STAGING = ".resume"
RESUME_STATE = "resume.json"
JOURNAL = "journal"
RECEIVER = ".receiver"
TOKEN_VERSION = "1"
_ENTRY = struct.Struct("<BQQ")         # a journal entry: kind, first block, count
_J_DATA, _J_FREE = 1, 2
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,4096}\Z")


@dataclass
class Plan:
    """What one send carries: the header, the DATA blocks and the FREE runs, in order."""
    header: stream.Header
    data: List[int] = field(default_factory=list)
    frees: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return stream.stream_size(self.header, len(self.data), len(self.frees))


def _runs(blocks: Sequence[int]) -> List[Tuple[int, int]]:
    """Sorted block numbers as ``(first, count)`` runs, so long frees cost one record."""
    out: List[Tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def make_plan(volume: Volume, snap: str, base: Optional[str] = None) -> Plan:
    """Decide a send in one go under the lock, so its size and its content always agree.

    Only changed sets and extents are consulted: sizing a send of a 64 GiB
    volume costs what its written blocks cost, as ``zfs send -nP`` does.
    """
    snapshot_name(snap)
    if base is not None:
        snapshot_name(base)
    with volume.lock():
        if not volume.exists():
            raise DriverError(f"cannot open '{volume.label}': dataset does not exist")
        snaps = volume.snapshots()
        names = [s.name for s in snaps]
        for wanted in (snap, base):
            if wanted is not None and wanted not in names:
                raise DriverError(f"cannot open '{volume.label}@{wanted}': dataset does not exist")
        volsize, block = volume.geometry()
        target = snaps[names.index(snap)]
        if base is None:
            header = stream.Header(volsize, block, snap, target.guid)
            return Plan(header, sorted(volume.data_blocks(snap)))
        if names.index(base) >= names.index(snap):
            raise DriverError(f"cannot send '{volume.label}@{snap}': not an earlier snapshot "
                              "from the same fs")
        changed = volume.changed_between(base, snap)
        now = volume.data_blocks(snap, changed)
        before = volume.data_blocks(base, changed - now)
        header = stream.Header(volsize, block, snap, target.guid, base,
                               snaps[names.index(base)].guid)
        return Plan(header, sorted(now), _runs(sorted(before)))


def _int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in [{low}, {high}]")
    return value


@dataclass(frozen=True)
class ResumePoint:
    """Where a cut resumable receive stands: which stream it was, and its resume block.

    Its token is what ``zfs get receive_resume_token`` shows: ``1-`` (the
    format), eight hex digits of the SHA-256 of the rest (a mangled token is
    refused rather than misread), ``-``, then the fields as compact JSON in
    unpadded URL-safe base64, which uses only letters, digits, ``_`` and ``-``.
    """
    name: str
    to_guid: int
    base: Optional[str]
    from_guid: int
    volsize: int
    volblocksize: int
    block: int = 0                       # first block not yet received

    @classmethod
    def of(cls, h: stream.Header, block: int = 0) -> "ResumePoint":
        return cls(h.name, h.to_guid, h.base, h.from_guid, h.volsize, h.volblocksize, block)

    @property
    def nblocks(self) -> int:
        return self.volsize // self.volblocksize

    def fields(self) -> Dict[str, Any]:
        return {"name": self.name, "guid": self.to_guid, "base": self.base,
                "fromguid": self.from_guid, "volsize": self.volsize,
                "volblocksize": self.volblocksize, "block": self.block}

    @classmethod
    def parse(cls, data: Any, block: Optional[int] = None) -> "ResumePoint":
        """Fields checked as a stream header's are; ValueError if any is not right.

        ``block`` given: it comes from elsewhere (the journal), not from ``data``.
        """
        keys = {"name", "guid", "base", "fromguid", "volsize", "volblocksize", "block"}
        if block is not None:
            keys.discard("block")
        if not isinstance(data, dict) or set(data) != keys:
            raise ValueError("unexpected fields")
        try:
            name = snapshot_name(data["name"])
            base = None if data["base"] is None else snapshot_name(data["base"])
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        size = _int(data["volblocksize"], 512, 1 << 20)
        if size & (size - 1):
            raise ValueError("volblocksize is not a power of two")
        volsize = _int(data["volsize"], size, stream.MAX_VOLSIZE)
        if volsize % size:
            raise ValueError("volsize is not a whole number of blocks")
        to_guid = _int(data["guid"], 1, (1 << 64) - 1)
        from_guid = _int(data["fromguid"], 0, (1 << 64) - 1)
        if (base is None) != (from_guid == 0):
            raise ValueError("base and fromguid disagree")
        at = _int(data["block"] if block is None else block, 0, volsize // size)
        return cls(name, to_guid, base, from_guid, volsize, size, at)

    def token(self) -> str:
        raw = json.dumps(self.fields(), separators=(",", ":"), sort_keys=True).encode()
        payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return f"{TOKEN_VERSION}-{_token_check(payload)}-{payload}"

    @classmethod
    def from_token(cls, token: Any) -> "ResumePoint":
        corrupt = NotResumableError("cannot resume send: resume token is corrupt")
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise corrupt
        parts = token.split("-", 2)
        if len(parts) != 3 or parts[0] != TOKEN_VERSION or parts[1] != _token_check(parts[2]):
            raise corrupt
        try:
            raw = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
            return cls.parse(json.loads(raw.decode()))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise corrupt from None


def _token_check(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def _journal_end(path: Path) -> int:
    """The resume block from the journal's last whole entry (a torn tail does not count)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        whole = size - size % _ENTRY.size
        if whole == 0:
            return 0
        fh.seek(whole - _ENTRY.size)
        kind, first, count = _ENTRY.unpack(fh.read(_ENTRY.size))
    if kind not in (_J_DATA, _J_FREE) or count < 1:
        raise ValueError("damaged journal")
    return first + count


def _read_journal(path: Path, point: ResumePoint) -> Tuple[List[int], List[Tuple[int, int]], int]:
    """The staged DATA blocks and FREE runs, and the length of the journal's whole entries.

    They must be in the order a stream brings them, as a journal written only
    by receivers is; anything else means the staging was damaged.
    """
    raw = path.read_bytes()
    whole = len(raw) - len(raw) % _ENTRY.size
    written: List[int] = []
    frees: List[Tuple[int, int]] = []
    end = 0
    for kind, first, count in _ENTRY.iter_unpack(raw[:whole]):
        if (first < end or count < 1 or first + count > point.nblocks
                or kind not in (_J_DATA, _J_FREE) or (kind == _J_DATA and count != 1)
                or (kind == _J_FREE and point.base is None)):
            raise ValueError("damaged journal")
        if kind == _J_DATA:
            written.append(first)
        else:
            frees.append((first, count))
        end = first + count
    return written, frees, whole


class Staging:
    """The resumable staging of one destination: ``<pool>/.resume-<vol>/``.

    Callers hold the host's ``zfs`` lock, except to remove it (a rename first,
    so it is gone for everyone at once).
    """

    def __init__(self, root: Union[str, Path], host: str, pool: str, zvol: str):
        self.root = Path(root)
        self.host = host
        self.pool = state.zpool_name(pool)
        self.zvol = state.zvol_name(zvol)
        self.pool_dir = state.pool_dir(root, host, pool)
        self.folder = self.pool_dir / f"{RESUME_STAGING}-{self.zvol}"

    def exists(self) -> bool:
        return self.folder.is_dir()

    def point(self) -> Optional[ResumePoint]:
        """What it holds, or None if there is no staging or one that cannot be resumed."""
        try:
            data = state.read_json(self.folder / RESUME_STATE)
            if data is None or not (self.folder / DATA).is_file():
                return None
            return ResumePoint.parse(data, _journal_end(self.folder / JOURNAL))
        except (OSError, ValueError):                        # ValueError covers bad JSON too
            return None

    def busy(self) -> bool:
        """Whether a receiver is working on it (holds its flock)."""
        try:
            fh = open(self.folder / RECEIVER, "ab")
        except FileNotFoundError:
            return False
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def remove(self) -> None:
        """Gone at once by a rename to a name the sweep of dead receivers' staging knows."""
        trash = self.pool_dir / f"{STAGING}-{os.getpid()}-{uuid.uuid4().hex}-{self.zvol}"
        try:
            os.rename(self.folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def _delivered(vol: Volume, point: ResumePoint) -> bool:
    """Whether the destination has the snapshot already (a receiver died after committing)."""
    return vol.exists() and any(s.name == point.name and s.guid == point.to_guid
                                for s in vol.snapshots())


def partial_state(root: Union[str, Path], host: str, pool: str,
                  zvol: str) -> Optional[ResumePoint]:
    """The partial state of a resumable receive into ``pool/zvol``; the caller holds the lock.

    A staging nobody works on that cannot be resumed (its receiver died while
    creating or committing it) or whose snapshot has arrived is removed here:
    it stands for no partial state, and must not block the next stream.
    """
    staging = Staging(root, host, pool, zvol)
    if not staging.exists():
        return None
    point = staging.point()
    if staging.busy():
        return point
    if point is None or _delivered(Volume.of(root, host, pool, zvol), point):
        staging.remove()
        return None
    return point


def resume_plan(volume: Volume, token: str) -> Plan:
    """``zfs send -t``: the original send's plan again, from the token's resume block on.

    The snapshots are found by name and must still be the very ones (guids)
    the receiver has the first part of; otherwise the rest would not fit.
    """
    point = ResumePoint.from_token(token)

    def gone(name: str) -> NotResumableError:
        return NotResumableError(f"cannot resume send: '{volume.label}@{name}' used in the "
                                 "initial send no longer exists")

    try:
        with volume.lock():
            snaps = {s.name: s for s in volume.snapshots()} if volume.exists() else {}
            for name, guid in ((point.name, point.to_guid), (point.base, point.from_guid)):
                if name is None:
                    continue
                if name not in snaps:
                    raise gone(name)
                if snaps[name].guid != guid:
                    raise NotResumableError(f"cannot resume send: '{volume.label}@{name}' is no "
                                            "longer the same snapshot used in the initial send")
            if volume.geometry() != (point.volsize, point.volblocksize):
                raise NotResumableError(f"cannot resume send: '{volume.label}' has changed size "
                                        "since the initial send")
            plan = make_plan(volume, point.name, point.base)
    except NoSuchVolume:
        raise gone(point.name) from None
    at = point.block
    frees = [(max(first, at), first + count - max(first, at))
             for first, count in plan.frees if first + count > at]
    return Plan(dataclasses.replace(plan.header, resume=at),
                [b for b in plan.data if b >= at], frees)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(pool_dir: Path) -> None:
    """Remove the staging of receivers that died: nobody will ever finish or abort it.

    Only pid-named folders qualify.  A resumable staging (``.resume-<vol>``)
    outlives its receiver on purpose and goes only by a commit, a refused
    stream, ``abort_resume`` or a destroy of its zvol.
    """
    try:
        entries = list(os.scandir(pool_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        parts = entry.name.split("-", 3)              # .receiving, pid, id, zvol
        if len(parts) == 4 and parts[0] == STAGING and parts[1].isdigit():
            if not _alive(int(parts[1])):
                shutil.rmtree(entry.path, ignore_errors=True)


class SendSource:
    """A ByteSource producing one stream lazily.

    ``read`` raises DriverError when the stream cannot be finished (the
    snapshot or the volume was destroyed meanwhile), and ``close`` raises it
    again, as waiting for a failed ``zfs send`` does.
    """

    def __init__(self, volume: Volume, plan: Plan):
        self.volume = volume
        self.plan = plan
        self._pieces = self._produce()
        self._pending = memoryview(b"")
        self._failure: Optional[DriverError] = None
        self._finished = False

    def _produce(self) -> Iterator[bytes]:
        plan, h = self.plan, self.plan.header
        enc = stream.Encoder(h)
        yield enc.start()
        data, frees = plan.data, plan.frees
        di = fi = 0
        while di < len(data) or fi < len(frees):
            if fi < len(frees) and (di >= len(data) or frees[fi][0] < data[di]):
                yield enc.free(*frees[fi])
                fi += 1
                continue
            limit = frees[fi][0] if fi < len(frees) else h.nblocks
            batch = [b for b in data[di:di + READ_BATCH] if b < limit]
            for b, payload in zip(batch, self.volume.read_blocks(h.name, h.to_guid, batch)):
                yield from enc.data(b, payload)
            di += len(batch)
        yield enc.end()

    def read(self, n: int = -1) -> bytes:
        if self._failure is not None:
            raise self._failure
        if 0 < n <= len(self._pending):                   # served from one piece: one copy
            piece, self._pending = self._pending[:n], self._pending[n:]
            return piece.tobytes()
        parts: List[memoryview] = []
        got = 0
        while n < 0 or got < n:
            if not self._pending:
                if self._finished:
                    break
                try:
                    self._pending = memoryview(next(self._pieces))
                except StopIteration:
                    self._finished = True
                    break
                except DriverError as exc:
                    self._failure = exc
                    raise
                except OSError as exc:
                    self._failure = DriverError(f"cannot send '{self.volume.label}@"
                                                f"{self.plan.header.name}': {exc}")
                    raise self._failure from None
            take = len(self._pending) if n < 0 else min(n - got, len(self._pending))
            parts.append(self._pending[:take])
            got += take
            self._pending = self._pending[take:]
        return b"".join(parts)                            # the one copy of these bytes

    def close(self) -> None:
        """Closing before the end simply stops the producer; only a failed one is an error."""
        self._pieces.close()
        if self._failure is not None:
            raise self._failure

    def abort(self) -> None:
        self._pieces.close()


class _StageWriter:
    """Blocks into a receive's staging, a run per system call, then the journal entries for them.

    The staging is this receive's alone (a pid-named folder, or the
    resumable one under this receiver's flock) and has no snapshot, so the
    zvol's write path (the host's lock, copy-on-write, a look for zeros
    after each write) has nothing to do there.  A block of zeros is not
    written: the staging is a hole there (fresh, or punched from the resume
    block on), as the volume keeps it.  Journal entries wait in memory
    until :meth:`flush` has written the data they vouch for.
    """

    def __init__(self, path: Path, block: int, journal: Optional[IO[bytes]]) -> None:
        self._fd: Optional[int] = os.open(path, os.O_WRONLY)
        self._block = block
        self._journal = journal
        self._first = 0                                   # the block the run starts at
        self._run: List[Union[bytes, memoryview]] = []
        self._entries = bytearray()

    def data(self, block: int, payload: Union[bytes, memoryview]) -> None:
        if self._run and (block != self._first + len(self._run) or len(self._run) >= APPLY_RUN):
            self._write_run()
        if not is_zero(payload):
            if not self._run:
                self._first = block
            self._run.append(payload)
        self._log(_J_DATA, block, 1)

    def free(self, first: int, count: int) -> None:
        self._log(_J_FREE, first, count)

    def _log(self, kind: int, first: int, count: int) -> None:
        if self._journal is not None:
            self._entries += _ENTRY.pack(kind, first, count)

    def _write_run(self) -> None:
        if self._run:
            assert self._fd is not None
            pwritev_all(self._fd, self._run, self._first * self._block)
            self._run = []

    def flush(self) -> None:
        """The data first, then its journal entries: a kill in between only means a resend."""
        self._write_run()
        if self._entries and self._journal is not None:
            entries = bytes(self._entries)
            self._entries.clear()
            if self._journal.write(entries) != len(entries):
                raise OSError(errno.EIO, "short write to the receive journal")

    def close(self) -> None:
        self._run = []
        self._entries.clear()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class ReceiveSink:
    """A ByteSink applying one stream to ``pool/zvol`` with ``zfs receive -F`` semantics.

    ``write`` raises DriverError as soon as the stream is known to be bad or
    unusable here (as writing into a ``zfs receive`` that exited does), and
    ``close`` raises it again; either way the destination is unchanged.

    ``resumable`` (``-s``): a stream cut short keeps what arrived as the
    destination's partial state (see the module's docstring).  A resume
    stream continues that state and is accepted with or without ``-s``;
    without it, a cut discards the partial state, as zfs does.
    """

    def __init__(self, root: Union[str, Path], host: str, pool: str, zvol: str,
                 resumable: bool = False):
        self.root = Path(root)
        self.host = host
        self.pool = state.zpool_name(pool)
        self.zvol = state.zvol_name(zvol)
        self.label = f"{self.pool}/{self.zvol}"
        self.resumable = resumable
        self._staging = Staging(self.root, host, self.pool, self.zvol)
        self._decoder = stream.Decoder()
        self._stage: Optional[Volume] = None
        self._journal: Optional[IO[bytes]] = None     # set while the stage is the resumable one
        self._receiver: Optional[IO[bytes]] = None    # its flock marks the staging as in use
        self._writer: Optional[_StageWriter] = None   # None: through the stage's write path
        self._written: List[int] = []
        self._frees: List[Tuple[int, int]] = []
        self._failure: Optional[DriverError] = None
        self._closed = False

    @property
    def header(self) -> Optional[stream.Header]:
        return self._decoder.header

    def _prefix(self) -> str:
        h = self.header
        if h is None:
            return "cannot receive"
        if h.resume is not None:
            return "cannot receive resume stream"
        return "cannot receive " + ("incremental stream" if h.incremental
                                    else "new filesystem stream")

    def _destination(self) -> Volume:
        return Volume.of(self.root, self.host, self.pool, self.zvol)

    # -------------------------------------------------------------- input
    def write(self, data: bytes) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise DriverError(f"cannot receive into '{self.label}': the stream was closed")
        try:
            for event in self._decoder.feed(data):
                self._handle(event)
            if self._writer is not None:
                self._writer.flush()
        except stream.StreamError as exc:
            self._fail(DriverError(f"{self._prefix()}: {exc}"))
        except DriverError as exc:
            self._fail(exc)
        except OSError as exc:
            # the machine failed, not the stream: what was journaled is still good
            self._fail(DriverError(f"{self._prefix()}: {exc}"), keep=self.resumable)

    def _fail(self, exc: DriverError, keep: bool = False) -> None:
        self._failure = exc
        if keep:
            self._release()
        else:
            self._discard()
        raise exc from None

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "header":
            h = event[1]
            with self._destination().lock():
                if h.resume is not None:
                    self._attach(h)
                else:
                    self._check(h)
                    self._stage = self._make_stage(h)
                if not self._stage.snapshots():          # one left by a receiver killed at commit
                    self._writer = _StageWriter(self._stage.data, h.volblocksize, self._journal)
        elif kind == "data":
            assert self._stage is not None and self.header is not None
            block = event[1]
            self._written.append(block)
            if self._writer is not None:
                self._writer.data(block, event[2])
                return
            self._stage.write(block * self.header.volblocksize, event[2])
            self._log(_J_DATA, block, 1)                 # after the data: a kill resends it
        elif kind == "free":
            self._frees.append((event[1], event[2]))
            if self._writer is not None:
                self._writer.free(event[1], event[2])
            else:
                self._log(_J_FREE, event[1], event[2])

    def _log(self, kind: int, first: int, count: int) -> None:
        if self._journal is not None:
            entry = _ENTRY.pack(kind, first, count)
            if self._journal.write(entry) != len(entry):
                raise OSError(errno.EIO, "short write to the receive journal")

    def _check(self, h: stream.Header) -> None:
        """Refuse what ``zfs receive -F`` refuses; run on the header and again at commit."""
        vol = self._destination()
        if (self._journal is None and h.resume is None
                and partial_state(self.root, self.host, self.pool, self.zvol) is not None):
            raise DriverError(f"{self._prefix()}: destination '{self.label}' contains "
                              'partially-complete state from "zfs receive -s".')
        exists = vol.exists()
        if not h.incremental:
            if exists:
                snaps = vol.snapshots()
                if snaps:
                    raise DriverError(f"cannot receive new filesystem stream: destination has "
                                      f"snapshots (eg. {self.label}@{snaps[0].name}) must destroy "
                                      "them to overwrite it")
            if h.volblocksize != (vol.geometry()[1] if exists else VOLBLOCKSIZE):
                raise DriverError(f"cannot receive new filesystem stream: volblocksize "
                                  f"{h.volblocksize} is not supported here")
            return
        if not exists:
            raise DriverError(f"cannot receive incremental stream: destination '{self.label}' "
                              "does not exist")
        snaps = vol.snapshots()
        if any(s.name == h.name for s in snaps):
            raise DriverError(f"cannot restore to {self.label}@{h.name}: "
                              "destination already exists")
        if not snaps or snaps[-1].guid != h.from_guid:
            raise DriverError(f"cannot receive incremental stream: most recent snapshot of "
                              f"{self.label} does not match incremental source")
        volsize, block = vol.geometry()
        if (volsize, block) != (h.volsize, h.volblocksize):
            raise DriverError(f"cannot receive incremental stream: {self.label} has {volsize} "
                              f"bytes in {block}-byte blocks, the stream {h.volsize} in "
                              f"{h.volblocksize}-byte blocks")

    def _make_stage(self, h: stream.Header) -> Volume:
        pool_dir = state.pool_dir(self.root, self.host, self.pool)
        sweep_stale_staging(pool_dir)
        folder = pool_dir / f"{STAGING}-{os.getpid()}-{uuid.uuid4().hex}-{self.zvol}"
        receiver = None
        try:
            (folder / SNAPSHOTS).mkdir(parents=True)
            with open(folder / DATA, "xb") as fh:
                fh.truncate(h.volsize)
            state.write_json(folder / META, {"volsize": h.volsize, "volblocksize": h.volblocksize,
                                             "sparse": True, "creation": int(time.time())})
            if not self.resumable:
                return Volume(self.root, self.host, folder, self.label)
            fields = ResumePoint.of(h).fields()
            del fields["block"]                          # the journal says where it stands
            state.write_json(folder / RESUME_STATE, fields)
            open(folder / JOURNAL, "xb").close()
            receiver = open(folder / RECEIVER, "xb")
            fcntl.flock(receiver, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.rename(folder, self._staging.folder)  # complete, locked: now it is the state
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise DriverError(f"{self._prefix()}: destination '{self.label}' contains "
                                  'partially-complete state from "zfs receive -s".') from None
            self._journal = open(self._staging.folder / JOURNAL, "ab", buffering=0)
            self._receiver = receiver
            return Volume(self.root, self.host, self._staging.folder, self.label)
        except BaseException:
            if receiver is not None and self._receiver is None:
                receiver.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _attach(self, h: stream.Header) -> None:
        """Take up the partial state a resume stream continues, if it is that stream's."""
        assert h.resume is not None
        point = partial_state(self.root, self.host, self.pool, self.zvol)
        refused = DriverError(f"cannot receive resume stream: destination '{self.label}' has no "
                              "matching partially received state")
        if point is None:
            raise refused
        folder = self._staging.folder
        receiver = open(folder / RECEIVER, "ab")
        try:
            try:
                fcntl.flock(receiver, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DriverError(f"cannot receive resume stream: destination '{self.label}' "
                                  "is busy: another receive is writing it") from None
            if point != ResumePoint.of(h, h.resume):
                raise refused
            self._check(h)
            try:
                written, frees, whole = _read_journal(folder / JOURNAL, point)
            except ValueError:
                raise refused from None
            os.truncate(folder / JOURNAL, whole)         # a torn last entry goes
            start = h.resume * h.volblocksize
            fd = os.open(folder / DATA, os.O_RDWR)
            try:                                         # blocks staged but never journaled
                punch_hole(fd, start, h.volsize - start)
            finally:
                os.close(fd)
            self._journal = open(folder / JOURNAL, "ab", buffering=0)
        except BaseException:
            receiver.close()
            raise
        self._receiver = receiver
        self._written, self._frees = written, frees
        self._stage = Volume(self.root, self.host, folder, self.label)

    # ------------------------------------------------------------- commit
    def close(self) -> None:
        if self._closed:
            if self._failure is not None:
                raise self._failure
            return
        self._closed = True
        keep = False
        try:
            self._close_writer()                           # every write flushed its own
            if self._failure is not None:
                raise self._failure
            try:
                self._decoder.finish()
            except stream.StreamError as exc:
                if self.resumable and self._journal is not None:
                    keep = True
                    raise DriverError(f"{self._prefix()}: {exc}. Partially received snapshot "
                                      "is saved.") from None
                raise DriverError(f"{self._prefix()}: {exc}") from None
            try:
                self._commit()
            except OSError as exc:
                raise DriverError(f"{self._prefix()}: {exc}") from None
        except DriverError as exc:
            self._failure = exc
            raise
        finally:
            if keep:
                self._release()
            else:
                self._discard()

    def abort(self) -> None:
        """Stop here: a resumable receive keeps what arrived, any other discards it."""
        self._closed = True
        try:
            if self.resumable:
                self._release()
            else:
                self._discard()
        except Exception:                                   # never raises, as promised
            pass

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _release(self) -> None:
        """Leave the staging as it is, for a resume stream to continue."""
        self._close_writer()
        self._stage = None
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._receiver is not None:
            self._receiver.close()                          # the flock goes with it
            self._receiver = None

    def _discard(self) -> None:
        stage, self._stage = self._stage, None
        if stage is not None:
            if self._journal is not None:
                self._staging.remove()
            else:
                shutil.rmtree(stage.folder, ignore_errors=True)
        self._release()

    def _commit(self) -> None:
        h, stage, vol = self.header, self._stage, self._destination()
        assert h is not None and stage is not None
        with vol.lock():
            self._check(h)                                 # the destination may have moved on
            if not h.incremental:
                if vol.exists():
                    meta = state.read_json(vol.folder / META, {})
                    meta.update(volsize=h.volsize, volblocksize=h.volblocksize)
                    os.replace(stage.data, vol.data)
                    state.write_json(vol.folder / META, meta)
                    vol.create_snapshot(h.name, h.to_guid)
                    return
                # the snapshot first, then one rename: the zvol appears complete or not at all
                if not any(s.name == h.name for s in stage.snapshots()):
                    stage.create_snapshot(h.name, h.to_guid)
                os.rename(stage.folder, vol.folder)
                self._stage = None
                for leftover in (RESUME_STATE, JOURNAL, RECEIVER):
                    try:
                        os.unlink(vol.folder / leftover)
                    except FileNotFoundError:
                        pass
                return
            vol.rollback()
            self._apply(stage, vol, h.volblocksize)
            vol.create_snapshot(h.name, h.to_guid)

    def _apply(self, stage: Volume, vol: Volume, block: int) -> None:
        src = os.open(stage.data, os.O_RDONLY)
        try:
            start = 0
            written = self._written
            for i in range(1, len(written) + 1):
                if (i < len(written) and written[i] == written[i - 1] + 1
                        and i - start < APPLY_RUN):
                    continue
                first, count = written[start], i - start
                vol.write(first * block, pread_all(src, count * block, first * block))
                start = i
        finally:
            os.close(src)
        for first, count in self._frees:
            vol.discard(first * block, count * block)
