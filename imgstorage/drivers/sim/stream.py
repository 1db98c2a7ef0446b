"""The byte format of the simulation's ``zfs send`` streams.

The stream is the simulation's own (a real ZFS stream needs a real pool), but
it carries what one carries, so a receiver can refuse what ZFS refuses: the
volume's geometry, which snapshot it brings, and which one it builds on.
All integers are little-endian::

    header  magic       8 bytes  b"IMGSZS\\r\\n"  (the line ending catches text-mode mangling)
            version     u16      1
            flags       u16      bit 0: incremental; bit 1: resume
            volblocksize u32
            volsize     u64
            to_guid     u64      guid of the snapshot sent
            from_guid   u64      guid of the base snapshot; 0 in a full stream
            stream_id   16 bytes random, one per send (names it in logs)
            name_len    u16      then the snapshot's name, UTF-8
            base_len    u16      then the base snapshot's name, UTF-8; 0 in a full stream
            resume      u64      only with the resume flag, after the names: the first
                                 block this stream may name (see below)

    records, in strictly increasing block order, each led by a one-byte type:
      0x01 DATA  block u64, then exactly volblocksize bytes: the block in the snapshot
      0x02 FREE  first u64, count u64: blocks that held data in the base and are holes
                 in the snapshot (incremental streams only)
      0x03 END   records u64 (DATA + FREE records before it), then the SHA-256 of
                 every byte of the stream before the digest itself

A full stream has a DATA record for every block holding data (holes and
all-zero blocks are left out, so holes stay holes on the receiver).  An
incremental stream has a DATA record for every block written between the two
snapshots that holds data in the later one, and FREE records for the ones that
became holes.  Like ``zfs send -I`` it brings the receiver to the later
snapshot, but unlike it does not recreate the snapshots in between: only the
net change travels and only the named snapshot appears on the receiver.

Because blocks come in order and every field is range-checked as it arrives,
a corrupt stream is usually refused early; the digest catches the rest, so a
receiver must not make anything visible before it has seen a valid END.

A resume stream (``zfs send -t``) is the tail of a stream whose receive was
cut short.  Its header is the original's with the resume flag and the resume
block added, and it carries only the records of the original at or after that
block (a FREE run that began earlier starts at the resume block instead);
records before it are refused.  Its END counts and digests its own bytes
only, so each stream is checked on its own; the receiver already holds
everything before the resume block from the earlier streams.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

from ...errors import DriverError, ValidationError
from .snapshots import snapshot_name

MAGIC = b"IMGSZS\r\n"
VERSION = 1
FLAG_INCREMENTAL = 0x1
FLAG_RESUME = 0x2
MAX_VOLSIZE = 1 << 50                 # 1 PiB, the largest size imgstorage accepts
MAX_NAME = 255
ASYNC_DIGEST = 256 * 1024             # bytes gathered before they go to a digest worker
DIGEST_WORKERS = 4                    # such workers per process, shared by all receives

_FIXED = struct.Struct("<8sHHIQQQ16sHH")
_DATA = struct.Struct("<BQ")
_FREE = struct.Struct("<BQQ")
_END = struct.Struct("<BQ")
_RESUME = struct.Struct("<Q")
_DIGEST = hashlib.sha256().digest_size
DATA, FREE, END = 0x01, 0x02, 0x03

Event = Tuple  # ("header", Header) | ("data", block, bytes) | ("free", first, count) | ("end",)


class StreamError(DriverError):
    """Not a valid stream; the text is what ``zfs receive`` prints after its prefix."""


@dataclass(frozen=True)
class Header:
    """What a receiver must know before the first block to accept or refuse the stream."""
    volsize: int
    volblocksize: int
    name: str
    to_guid: int
    base: Optional[str] = None
    from_guid: int = 0
    stream_id: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    resume: Optional[int] = None          # a resume stream: the first block it may name

    @property
    def incremental(self) -> bool:
        return self.base is not None

    @property
    def flags(self) -> int:
        return ((FLAG_INCREMENTAL if self.incremental else 0)
                | (FLAG_RESUME if self.resume is not None else 0))

    @property
    def nblocks(self) -> int:
        return self.volsize // self.volblocksize

    def pack(self) -> bytes:
        name, base = self.name.encode(), (self.base or "").encode()
        tail = _RESUME.pack(self.resume) if self.resume is not None else b""
        return _FIXED.pack(MAGIC, VERSION, self.flags,
                           self.volblocksize, self.volsize, self.to_guid, self.from_guid,
                           self.stream_id, len(name), len(base)) + name + base + tail

    @property
    def size(self) -> int:
        return (_FIXED.size + len(self.name.encode()) + len((self.base or "").encode())
                + (_RESUME.size if self.resume is not None else 0))


def stream_size(header: Header, data_records: int, free_records: int) -> int:
    """The exact length of a stream, which is all ``send -nP`` needs to know."""
    return (header.size + data_records * (_DATA.size + header.volblocksize)
            + free_records * _FREE.size + _END.size + _DIGEST)


class _Digest:
    """A receiver's running SHA-256, computed on a worker thread a slice behind it.

    hashlib lets go of the interpreter lock while it hashes a large buffer,
    so a receiver stores a slice's blocks (the kernel copying them, without
    the lock either) while the bytes before them are digested: on fresh data
    the two take about as long as each other.  At most one update is in
    flight, so the order of the bytes holds and the bytes waiting are
    bounded.  What it is given must not change afterwards (bytes, or views
    of bytes).  A sender hashes inline instead: what it does between two
    hashes is mostly short Python, which would keep a worker waiting for
    the lock at every hand-over.
    """

    _pool: Optional[ThreadPoolExecutor] = None
    _pool_lock = threading.Lock()

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queued: List[Union[bytes, memoryview]] = []
        self._queued_size = 0
        self._busy: Optional[Future[None]] = None

    @classmethod
    def _workers(cls) -> ThreadPoolExecutor:
        with cls._pool_lock:
            if cls._pool is None:
                cls._pool = ThreadPoolExecutor(max_workers=DIGEST_WORKERS,
                                               thread_name_prefix="sim-stream-digest")
            return cls._pool

    @classmethod
    def _forget_workers(cls) -> None:
        # A forked child has the pool object but none of its threads.
        cls._pool = None
        cls._pool_lock = threading.Lock()

    def update(self, data: Union[bytes, memoryview]) -> None:
        self._queued.append(data)
        self._queued_size += len(data)
        if self._queued_size >= ASYNC_DIGEST:
            self._wait()
            pieces, self._queued, self._queued_size = self._queued, [], 0
            self._busy = self._workers().submit(self._update_all, pieces)

    def _update_all(self, pieces: List[Union[bytes, memoryview]]) -> None:
        for piece in pieces:
            self._hash.update(piece)

    def _wait(self) -> None:
        busy, self._busy = self._busy, None
        if busy is not None:
            busy.result()

    def digest(self) -> bytes:
        self._wait()
        self._update_all(self._queued)
        self._queued, self._queued_size = [], 0
        return self._hash.digest()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Digest._forget_workers)


class Encoder:
    """Frames records and keeps the running digest; the caller decides what to send."""

    def __init__(self, header: Header):
        self.header = header
        self.records = 0
        self._digest = hashlib.sha256()
        self._last = (header.resume or 0) - 1        # a resume stream starts at its block

    def _emit(self, data: bytes) -> bytes:
        self._digest.update(data)
        return data

    def start(self) -> bytes:
        return self._emit(self.header.pack())

    def _order(self, block: int) -> None:
        if block <= self._last:
            raise ValueError(f"block {block} sent out of order")

    def data(self, block: int, payload: bytes) -> Tuple[bytes, bytes]:
        """The record's head and its payload, left apart so a block is never copied to frame it."""
        if len(payload) != self.header.volblocksize:
            raise ValueError("a DATA record carries exactly one block")
        self._order(block)
        self._last = block
        self.records += 1
        return self._emit(_DATA.pack(DATA, block)), self._emit(payload)

    def free(self, first: int, count: int) -> bytes:
        self._order(first)
        self._last = first + count - 1
        self.records += 1
        return self._emit(_FREE.pack(FREE, first, count))

    def end(self) -> bytes:
        tail = self._emit(_END.pack(END, self.records))
        return tail + self._digest.digest()


def _check_header(raw: bytes) -> Tuple[Header, int, int]:
    """The header's fixed part parsed and checked, and the lengths of the two names after it.

    A resume stream's header comes back with ``resume`` 0: its block follows the names.
    """
    (magic, version, flags, block, volsize, to_guid, from_guid, stream_id,
     name_len, base_len) = _FIXED.unpack(raw)
    if magic != MAGIC:
        raise StreamError("invalid stream (bad magic number)")
    if version != VERSION:
        raise StreamError(f"invalid stream (unsupported version {version})")
    if flags & ~(FLAG_INCREMENTAL | FLAG_RESUME):
        raise StreamError(f"invalid stream (unknown flags 0x{flags:x})")
    if block < 512 or block > 1 << 20 or block & (block - 1):
        raise StreamError(f"invalid stream (bad volblocksize {block})")
    if volsize <= 0 or volsize % block or volsize > MAX_VOLSIZE:
        raise StreamError(f"invalid stream (bad volsize {volsize})")
    incremental = bool(flags & FLAG_INCREMENTAL)
    if (not 0 < name_len <= MAX_NAME or base_len > MAX_NAME or to_guid == 0
            or incremental != (from_guid != 0) or incremental != (base_len > 0)):
        raise StreamError("invalid stream (bad header)")
    header = Header(volsize, block, "", to_guid, "" if incremental else None, from_guid,
                    stream_id, 0 if flags & FLAG_RESUME else None)
    return header, name_len, base_len


def _name(raw: bytes) -> str:
    try:
        return snapshot_name(raw.decode())
    except (UnicodeDecodeError, ValidationError):
        raise StreamError("invalid stream (bad snapshot name)") from None


class Decoder:
    """Turns a stream arriving in arbitrary slices into checked events.

    A slice is parsed where it lies: the payload of a DATA event is a
    memoryview of the slice, never copied.  Only the start of a record
    whose end has not arrived yet is kept (one block at most), so a stream
    of any size passes through in constant memory.  Events come in stream
    order; after a bad record, those before it come first and then the error.
    """

    def __init__(self) -> None:
        self.header: Optional[Header] = None
        self.done = False
        self.records = 0
        self._digest = _Digest()
        self._rest = bytearray()                         # a record still incomplete
        self._need = 0                                   # its whole length, when known
        self._next = 0                                   # lowest block a record may name

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> Iterator[Event]:
        if not data:
            return
        if self.done:
            raise StreamError("invalid stream (data after the end record)")
        buf = bytes(data)                                # no copy of a bytes object
        start = 0
        if self._rest and not self._need:                # the header, still short: small
            buf, self._rest = bytes(self._rest) + buf, bytearray()
        elif self._rest:                                 # complete the record, copying only it
            start = self._need - len(self._rest)
            self._rest += buf[:start]
            if len(self._rest) < self._need:
                return
            record, self._rest = bytes(self._rest), bytearray()
            yield from self._parse(record, 0)
            if start >= len(buf):
                return
            if self.done:
                raise StreamError("invalid stream (data after the end record)")
        yield from self._parse(buf, start)

    def finish(self) -> None:
        """Called at the end of input: anything short of a valid END is an incomplete stream."""
        if not self.done:
            raise StreamError("checksum mismatch or incomplete stream")

    def _parse(self, buf: bytes, start: int) -> Iterator[Event]:
        """The whole records of ``buf`` from ``start``, where a record (or the header) starts."""
        view = memoryview(buf)
        events: List[Event] = []
        pos, need = start, 0
        end: Optional[int] = None                        # where a whole END record starts
        error: Optional[StreamError] = None
        try:
            while True:
                if self.header is None:
                    event, used = self._header(buf, pos)
                elif pos < len(buf) and buf[pos] == END:
                    used = _END.size + _DIGEST
                    if len(buf) - pos >= used:
                        end = pos
                    event = None
                else:
                    event, used = self._record(buf, view, pos)
                if event is None:
                    need = used
                    break
                events.append(event)
                pos += used
        except StreamError as exc:
            error = exc
        self._digest.update(view[start:pos if end is None else end + _END.size])
        yield from events
        if error is not None:
            raise error
        if end is not None:
            _, records = _END.unpack_from(buf, end)
            if records != self.records or buf[end + _END.size:end + _END.size + _DIGEST] \
                    != self._digest.digest():
                raise StreamError("checksum mismatch or incomplete stream")
            self.done = True
            yield ("end",)
            if end + _END.size + _DIGEST < len(buf):
                raise StreamError("invalid stream (data after the end record)")
            return
        self._rest = bytearray(view[pos:])
        self._need = need                                # 0 while in the header

    def _record(self, buf: bytes, view: memoryview,
                pos: int) -> Tuple[Optional[Event], int]:
        """The DATA or FREE record at ``pos``; ``(None, its length)`` if it is not all there."""
        if pos >= len(buf):
            return None, 1
        kind, h = buf[pos], self.header
        assert h is not None
        if kind == DATA:
            size = _DATA.size + h.volblocksize
            if len(buf) - pos < size:
                return None, size
            _, block = _DATA.unpack_from(buf, pos)
            self._place(block, 1)
            self.records += 1
            return ("data", block, view[pos + _DATA.size:pos + size]), size
        if kind == FREE:
            if len(buf) - pos < _FREE.size:
                return None, _FREE.size
            _, first, count = _FREE.unpack_from(buf, pos)
            if not h.incremental:
                raise StreamError("invalid stream (FREE record in a full stream)")
            if count == 0:
                raise StreamError("invalid stream (empty FREE record)")
            self._place(first, count)
            self.records += 1
            return ("free", first, count), _FREE.size
        raise StreamError(f"invalid stream (unknown record type 0x{kind:02x})")

    def _place(self, first: int, count: int) -> None:
        assert self.header is not None
        if first < self._next:
            raise StreamError(f"invalid stream (block {first} out of order)")
        if first + count > self.header.nblocks:
            raise StreamError(f"invalid stream (block {first + count - 1} beyond the end "
                              "of the volume)")
        self._next = first + count

    def _header(self, buf: bytes, pos: int) -> Tuple[Optional[Event], int]:
        available = len(buf) - pos
        if available < _FIXED.size:
            # a wrong magic is worth reporting before the whole header is in
            seen = buf[pos:pos + min(available, len(MAGIC))]
            if seen != MAGIC[:len(seen)]:
                raise StreamError("invalid stream (bad magic number)")
            return None, 0
        fixed = buf[pos:pos + _FIXED.size]
        partial, name_len, base_len = _check_header(fixed)
        extra = _RESUME.size if partial.resume is not None else 0
        size = _FIXED.size + name_len + base_len + extra
        if available < size:
            return None, 0
        raw = buf[pos + _FIXED.size:pos + size]
        name = _name(raw[:name_len])
        base = _name(raw[name_len:name_len + base_len]) if partial.incremental else None
        resume = None
        if extra:
            (resume,) = _RESUME.unpack_from(raw, name_len + base_len)
            if resume > partial.nblocks:
                raise StreamError(f"invalid stream (resume block {resume} beyond the end "
                                  "of the volume)")
            self._next = resume                   # records before it were in earlier streams
        self.header = Header(partial.volsize, partial.volblocksize, name, partial.to_guid,
                             base, partial.from_guid, partial.stream_id, resume)
        return ("header", self.header), size
