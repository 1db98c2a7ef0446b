"""``zfs send`` and ``zfs receive -F`` of the simulation (stream format: stream.py).

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

A refused, truncated, corrupt or aborted receive removes its staging folder
and leaves the destination as it was.  Staging costs what the stream carries,
never a read of the destination.  A receiver killed midway cannot clean up,
so each new receive on the host removes the staging of receivers whose
process is gone (the pid in the folder's name says whose it is).
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from ...errors import DriverError
from . import state, stream
from .snapshots import DATA, META, SNAPSHOTS, VOLBLOCKSIZE, Volume, snapshot_name
from .sparse import pread_all

READ_BATCH = 32                       # blocks read per hold of the lock: 4 MiB
APPLY_RUN = 64                        # blocks applied per write: 8 MiB
STAGING = ".receiving"


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(pool_dir: Path) -> None:
    """Remove the staging of receivers that died: nobody will ever finish or abort it."""
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
        out = bytearray()
        while n < 0 or len(out) < n:
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
            take = len(self._pending) if n < 0 else min(n - len(out), len(self._pending))
            out += self._pending[:take]
            self._pending = self._pending[take:]
        return bytes(out)

    def close(self) -> None:
        """Closing before the end simply stops the producer; only a failed one is an error."""
        self._pieces.close()
        if self._failure is not None:
            raise self._failure

    def abort(self) -> None:
        self._pieces.close()


class ReceiveSink:
    """A ByteSink applying one stream to ``pool/zvol`` with ``zfs receive -F`` semantics.

    ``write`` raises DriverError as soon as the stream is known to be bad or
    unusable here (as writing into a ``zfs receive`` that exited does), and
    ``close`` raises it again; either way the destination is unchanged.
    """

    def __init__(self, root: Union[str, Path], host: str, pool: str, zvol: str):
        self.root = Path(root)
        self.host = host
        self.pool = state.zpool_name(pool)
        self.zvol = state.zvol_name(zvol)
        self.label = f"{self.pool}/{self.zvol}"
        self._decoder = stream.Decoder()
        self._stage: Optional[Volume] = None
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
        except stream.StreamError as exc:
            self._fail(DriverError(f"{self._prefix()}: {exc}"))
        except DriverError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(DriverError(f"{self._prefix()}: {exc}"))

    def _fail(self, exc: DriverError) -> None:
        self._failure = exc
        self._discard()
        raise exc from None

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "header":
            self._check(event[1])
            self._stage = self._make_stage(event[1])
        elif kind == "data":
            assert self._stage is not None and self.header is not None
            block = event[1]
            self._stage.write(block * self.header.volblocksize, event[2])
            self._written.append(block)
        elif kind == "free":
            self._frees.append((event[1], event[2]))

    def _check(self, h: stream.Header) -> None:
        """Refuse what ``zfs receive -F`` refuses; run on the header and again at commit."""
        vol = self._destination()
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
        try:
            (folder / SNAPSHOTS).mkdir(parents=True)
            with open(folder / DATA, "xb") as fh:
                fh.truncate(h.volsize)
            state.write_json(folder / META, {"volsize": h.volsize, "volblocksize": h.volblocksize,
                                             "sparse": True, "creation": int(time.time())})
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Volume(self.root, self.host, folder, self.label)

    # ------------------------------------------------------------- commit
    def close(self) -> None:
        if self._closed:
            if self._failure is not None:
                raise self._failure
            return
        self._closed = True
        try:
            if self._failure is not None:
                raise self._failure
            try:
                self._decoder.finish()
            except stream.StreamError as exc:
                raise DriverError(f"{self._prefix()}: {exc}") from None
            try:
                self._commit()
            except OSError as exc:
                raise DriverError(f"{self._prefix()}: {exc}") from None
        except DriverError as exc:
            self._failure = exc
            raise
        finally:
            self._discard()

    def abort(self) -> None:
        self._closed = True
        try:
            self._discard()
        except Exception:                                   # never raises, as promised
            pass

    def _discard(self) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage.folder, ignore_errors=True)
            self._stage = None

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
                else:
                    os.rename(stage.folder, vol.folder)
                    self._stage = None
                vol.create_snapshot(h.name, h.to_guid)
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
