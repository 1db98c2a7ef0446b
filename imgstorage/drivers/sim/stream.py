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
import struct
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple, Union

from ...errors import DriverError, ValidationError
from .snapshots import snapshot_name

MAGIC = b"IMGSZS\r\n"
VERSION = 1
FLAG_INCREMENTAL = 0x1
FLAG_RESUME = 0x2
MAX_VOLSIZE = 1 << 50                 # 1 PiB, the largest size imgstorage accepts
MAX_NAME = 255

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

    Bytes are kept only until a whole record is there (one block at most), so
    a stream of any size passes through in constant memory.
    """

    def __init__(self) -> None:
        self.header: Optional[Header] = None
        self.done = False
        self.records = 0
        self._digest = hashlib.sha256()
        self._buf = bytearray()
        self._next = 0                                   # lowest block a record may name

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> Iterator[Event]:
        if not data:
            return
        if self.done:
            raise StreamError("invalid stream (data after the end record)")
        self._buf += data
        pos = 0
        try:
            while not self.done:
                event, used = self._one(pos)
                if event is None:
                    break
                pos += used
                yield event
            if self.done and pos < len(self._buf):
                raise StreamError("invalid stream (data after the end record)")
        finally:
            del self._buf[:pos]

    def finish(self) -> None:
        """Called at the end of input: anything short of a valid END is an incomplete stream."""
        if not self.done:
            raise StreamError("checksum mismatch or incomplete stream")

    def _take(self, pos: int, length: int) -> Optional[bytes]:
        """``length`` bytes at ``pos`` if they are all there, copied once."""
        if len(self._buf) - pos < length:
            return None
        with memoryview(self._buf) as view, view[pos:pos + length] as part:
            return part.tobytes()

    def _one(self, pos: int) -> Tuple[Optional[Event], int]:
        if self.header is None:
            return self._header(pos)
        head = self._take(pos, 1)
        if head is None:
            return None, 0
        kind, h = head[0], self.header
        if kind == DATA:
            if len(self._buf) - pos < _DATA.size + h.volblocksize:
                return None, 0
            head = self._take(pos, _DATA.size)
            _, block = _DATA.unpack(head)
            self._place(block, 1)
            payload = self._take(pos + _DATA.size, h.volblocksize)
            self._count(head)
            self._digest.update(payload)
            return ("data", block, payload), _DATA.size + h.volblocksize
        if kind == FREE:
            raw = self._take(pos, _FREE.size)
            if raw is None:
                return None, 0
            _, first, count = _FREE.unpack(raw)
            if not h.incremental:
                raise StreamError("invalid stream (FREE record in a full stream)")
            if count == 0:
                raise StreamError("invalid stream (empty FREE record)")
            self._place(first, count)
            self._count(raw)
            return ("free", first, count), len(raw)
        if kind == END:
            raw = self._take(pos, _END.size + _DIGEST)
            if raw is None:
                return None, 0
            _, records = _END.unpack_from(raw)
            self._digest.update(raw[:_END.size])
            if records != self.records or raw[_END.size:] != self._digest.digest():
                raise StreamError("checksum mismatch or incomplete stream")
            self.done = True
            return ("end",), len(raw)
        raise StreamError(f"invalid stream (unknown record type 0x{kind:02x})")

    def _count(self, raw: bytes) -> None:
        self._digest.update(raw)
        self.records += 1

    def _place(self, first: int, count: int) -> None:
        assert self.header is not None
        if first < self._next:
            raise StreamError(f"invalid stream (block {first} out of order)")
        if first + count > self.header.nblocks:
            raise StreamError(f"invalid stream (block {first + count - 1} beyond the end "
                              "of the volume)")
        self._next = first + count

    def _header(self, pos: int) -> Tuple[Optional[Event], int]:
        available = len(self._buf) - pos
        if available < _FIXED.size:
            # a wrong magic is worth reporting before the whole header is in
            seen = bytes(self._buf[pos:pos + min(available, len(MAGIC))])
            if seen != MAGIC[:len(seen)]:
                raise StreamError("invalid stream (bad magic number)")
            return None, 0
        fixed = bytes(self._buf[pos:pos + _FIXED.size])
        partial, name_len, base_len = _check_header(fixed)
        extra = _RESUME.size if partial.resume is not None else 0
        raw = self._take(pos + _FIXED.size, name_len + base_len + extra)
        if raw is None:
            return None, 0
        name = _name(raw[:name_len])
        base = _name(raw[name_len:name_len + base_len]) if partial.incremental else None
        resume = None
        if extra:
            (resume,) = _RESUME.unpack_from(raw, name_len + base_len)
            if resume > partial.nblocks:
                raise StreamError(f"invalid stream (resume block {resume} beyond the end "
                                  "of the volume)")
            self._next = resume                   # records before it were in earlier streams
        self._digest.update(fixed)
        self._digest.update(raw)
        self.header = Header(partial.volsize, partial.volblocksize, name, partial.to_guid,
                             base, partial.from_guid, partial.stream_id, resume)
        return ("header", self.header), _FIXED.size + len(raw)
