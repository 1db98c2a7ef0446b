"""Sparse files as the simulation's disks: holes, extents and bitmaps.

Zvols and snapshot stores are sparse files whose holes stand for blocks
never written (or freed), as unallocated blocks of a ZFS volume.  What lives
here asks the file system itself (``SEEK_DATA``/``SEEK_HOLE``, hole punching)
so that a 64 GiB volume holding a few MiB is as cheap to snapshot, size and
send as the few MiB are.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NONZERO_RUN = re.compile(rb"[^\x00]+")
# Bitmap bytes further apart than this are written separately, so marking two
# distant blocks does not allocate the whole stretch of bitmap between them.
_BITMAP_GAP = 512
_PWRITEV = hasattr(os, "pwritev")


@functools.lru_cache(maxsize=4)
def zeros(size: int) -> bytes:
    return bytes(size)


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes; past the end of the file reads as zeros, as a hole does."""
    first = os.pread(fd, length, offset) if length > 0 else b""
    if len(first) == length:
        return first                                      # the usual case: no copy
    chunks, want = [first], length - len(first)
    while want > 0 and chunks[-1]:
        got = os.pread(fd, want, offset + length - want)
        chunks.append(got)
        want -= len(got)
    return b"".join(chunks) + bytes(want)


def pwrite_all(fd: int, data: Union[bytes, bytearray, memoryview], offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def pwritev_all(fd: int, pieces: Sequence[Union[bytes, memoryview]], offset: int) -> None:
    """Write ``pieces`` back to back from ``offset`` in one system call where the OS allows."""
    total = sum(len(piece) for piece in pieces)
    done = os.pwritev(fd, pieces, offset) if _PWRITEV else 0
    if done < total:                                      # rare: a short write, or no pwritev
        pwrite_all(fd, memoryview(b"".join(pieces))[done:], offset + done)


def is_zero(data: Union[bytes, memoryview]) -> bool:
    """Whether a block holds only zeros (kept as a hole): both ends first, as data rarely has."""
    return (not data or not data[0] and not data[-1]) and bytes(data) == zeros(len(data))


@functools.lru_cache(maxsize=1)
def _fallocate() -> Optional[Any]:
    """libc's fallocate, which Python does not wrap with flags (64-bit offsets preferred)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give ``length`` bytes back to the file system; they read as zeros afterwards.

    Where punching is not supported the range is written with zeros instead:
    the bytes are right, only the holes are lost.
    """
    if length <= 0:
        return
    func = _fallocate()
    if func is not None:
        if func(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    end = offset + length
    while offset < end:
        step = min(end - offset, 1 << 20)
        pwrite_all(fd, zeros(step) if step == 1 << 20 else bytes(step), offset)
        offset += step


def data_extents(fd: int, start: int = 0, end: Optional[int] = None) -> List[Tuple[int, int]]:
    """``(start, end)`` byte ranges of ``fd`` that hold data, from the file system's map.

    A file system that cannot tell holes reports the whole range as data,
    which costs reads but is never wrong.
    """
    if end is None:
        end = os.fstat(fd).st_size
    out, pos = [], start
    while pos < end:
        try:
            begin = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return out + [(pos, end)]
            raise
        if begin >= end:
            break
        stop = min(os.lseek(fd, begin, os.SEEK_HOLE), end)
        out.append((begin, stop))
        pos = stop
    return out


class BlockMap:
    """The blocks of a sparse file that hold data, from its extents, answerable by block number."""

    def __init__(self, path: Path, block: int):
        fd = os.open(path, os.O_RDONLY)
        try:
            extents = data_extents(fd)
        finally:
            os.close(fd)
        self.starts: List[int] = []
        self.ends: List[int] = []
        for begin, stop in extents:
            first, end = begin // block, (stop - 1) // block + 1
            if self.ends and first <= self.ends[-1]:        # two extents meet inside a block
                self.ends[-1] = max(self.ends[-1], end)
            else:
                self.starts.append(first)
                self.ends.append(end)

    def __contains__(self, block: int) -> bool:
        i = bisect.bisect_right(self.starts, block) - 1
        return i >= 0 and block < self.ends[i]

    def __iter__(self) -> Iterator[int]:
        for first, end in zip(self.starts, self.ends):
            yield from range(first, end)


def _set_bits(raw: bytes, first_byte: int) -> Iterator[int]:
    for run in _NONZERO_RUN.finditer(raw):
        for i in range(run.start(), run.end()):
            value, base = raw[i], (first_byte + i) << 3
            if value == 0xFF:
                yield from range(base, base + 8)
            else:
                yield from (base + bit for bit in range(8) if value >> bit & 1)


class Bitmap:
    """A set of block numbers kept as bits of a sparse file.

    A file rather than JSON so that marking a block is one small write however
    many are marked already, and an empty set costs no disk even for a huge volume.
    """

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def create(path: Path, nblocks: int) -> None:
        with open(path, "xb") as fh:
            fh.truncate((nblocks + 7) // 8)

    def members(self, first: int, last: int) -> Set[int]:
        """The marked blocks among ``first..last``."""
        lo = first >> 3
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = pread_all(fd, (last >> 3) + 1 - lo, lo)
        finally:
            os.close(fd)
        return {b for b in _set_bits(raw, lo) if first <= b <= last}

    def add(self, blocks: Iterable[int]) -> None:
        by_byte: Dict[int, int] = {}
        for b in blocks:
            by_byte[b >> 3] = by_byte.get(b >> 3, 0) | 1 << (b & 7)
        if not by_byte:
            return
        indexes = sorted(by_byte)
        fd = os.open(self.path, os.O_RDWR)
        try:
            start = 0
            for i in range(1, len(indexes) + 1):
                if i < len(indexes) and indexes[i] - indexes[i - 1] <= _BITMAP_GAP:
                    continue
                lo, hi = indexes[start], indexes[i - 1] + 1
                raw = bytearray(pread_all(fd, hi - lo, lo))
                for index in indexes[start:i]:
                    raw[index - lo] |= by_byte[index]
                pwrite_all(fd, raw, lo)
                start = i
        finally:
            os.close(fd)

    def all(self) -> Set[int]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            out: Set[int] = set()
            for begin, stop in data_extents(fd):
                out.update(_set_bits(pread_all(fd, stop - begin, begin), begin))
            return out
        finally:
            os.close(fd)

    def clear(self) -> None:
        empty(self.path, self.path.stat().st_size)


def empty(path: Path, size: int) -> None:
    """Drop every block of a file, keeping its size."""
    os.truncate(path, 0)
    os.truncate(path, size)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """A read by path, for callers that hop between files block by block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return pread_all(fd, length, offset)
    finally:
        os.close(fd)
