"""Simulated ZFS: a pool is a folder, a zvol a sparse file of its exact size.

Layout under ``sim_root/<host>/zfs/``::

    <pool>/.pool.json            the pool (size, creation); made by imgstorage-sim only
    <pool>/<vol>/data            the zvol's bytes: a sparse file of volsize bytes
    <pool>/<vol>/meta.json       volsize, volblocksize, sparse, creation
    <pool>/<vol>/snapshots/      one folder per snapshot, with its holds (see snapshots.py)
    <pool>/.receiving-<pid>-<id>-<vol>  a receive in progress (see sendrecv.py)
    <pool>/.resume-<vol>/        a resumable receive into <vol>, cut short or in progress

Sparse files keep a 64 GiB volume free until written, as a thin zvol is.
Snapshots are copy-on-write per 128 KiB block and streams are the
simulation's own format (stream.py), with the semantics of ``zfs send``,
``zfs receive -F`` and their resumable forms (``receive -s``, ``send -t``).

Errors carry the text the ``zfs`` command prints, because operators and the
daemons' logs should read the same in the simulation as on a real NAS.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Union

from ...errors import DriverError
from ..base import HOLD_TAG, ByteSink, ByteSource, ZvolInfo
from . import blockdev, sendrecv, state
from .snapshots import META, SNAPSHOTS, VOLBLOCKSIZE, Volume, snapshot_name

DEFAULT_POOL_SIZE = 1 << 40
POOL_MARKER = ".pool.json"


def create_pool(root: Union[str, Path], host: str, pool: str,
                size: int = DEFAULT_POOL_SIZE) -> None:
    """Make a pool; a pool belongs to the administrator, so no driver call does this."""
    state.zpool_name(pool)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise DriverError(f"cannot create '{pool}': invalid pool size {size!r}")
    with state.subsystem_lock(root, host, "zfs"):
        marker = state.pool_dir(root, host, pool) / POOL_MARKER
        if marker.exists():
            raise DriverError(f"cannot create '{pool}': pool already exists")
        state.write_json(marker, {"size": size, "created": int(time.time())})


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class SimZfs:
    """The ZfsDriver of one simulated host."""

    def __init__(self, root: Union[str, Path], host: str):
        self.root = Path(root)
        self.host = state.sim_host(host)

    # ------------------------------------------------------------- pools
    def _pool_meta(self, pool: str) -> Optional[Dict]:
        return state.read_json(state.pool_dir(self.root, self.host, pool) / POOL_MARKER)

    def pool_exists(self, pool: str) -> bool:
        return self._pool_meta(pool) is not None

    def list_pools(self) -> List[str]:
        top = state.subsystem_dir(self.root, self.host, "zfs")
        if not top.is_dir():
            return []
        return sorted(p.name for p in top.iterdir() if (p / POOL_MARKER).is_file())

    def pool_usage(self, pool: str) -> Dict[str, int]:
        """``size``, ``used`` (allocated) and ``avail`` of a pool.

        A thick zvol reserves its whole size, a sparse one only what it has
        written, which is what decides whether another thick zvol still fits.
        """
        meta = self._pool_meta(pool)
        if meta is None:
            raise DriverError(f"cannot open '{pool}': no such pool")
        used = reserved = 0
        for info in self.list_zvols(pool):
            used += info.used
            zmeta = state.read_json(state.zvol_dir(self.root, self.host, pool, info.zvol) / META, {})
            reserved += info.used if zmeta.get("sparse", True) else max(info.volsize, info.used)
        return {"size": meta["size"], "used": used, "avail": max(0, meta["size"] - reserved)}

    # ------------------------------------------------------------- zvols
    def _info(self, pool: str, zvol: str) -> Optional[ZvolInfo]:
        folder = state.zvol_dir(self.root, self.host, pool, zvol)
        meta = state.read_json(folder / META)
        if meta is None:
            return None
        try:
            alloc = _allocated(folder / "data")
        except FileNotFoundError:                       # destroyed meanwhile
            return None
        kept = Volume(self.root, self.host, folder, f"{pool}/{zvol}").snapshot_bytes()
        return ZvolInfo(name=f"{pool}/{zvol}", volsize=meta["volsize"], used=alloc + kept,
                        refer=alloc)

    def list_zvols(self, pool: Optional[str] = None) -> List[ZvolInfo]:
        if pool is not None and not self.pool_exists(pool):
            raise DriverError(f"cannot open '{pool}': dataset does not exist")
        out = []
        for name in ([pool] if pool is not None else self.list_pools()):
            folder = state.pool_dir(self.root, self.host, name)
            for child in sorted(folder.iterdir()):
                if child.name.startswith(".") or not child.is_dir():
                    continue
                info = self._info(name, child.name)
                if info is not None:
                    out.append(info)
        return out

    def get_zvol(self, pool: str, zvol: str) -> Optional[ZvolInfo]:
        return self._info(state.zpool_name(pool), state.zvol_name(zvol))

    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None:
        name = f"{state.zpool_name(pool)}/{state.zvol_name(zvol)}"
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise DriverError(f"cannot create '{name}': bad volume size {size_bytes!r}")
        if size_bytes == 0:
            raise DriverError(f"cannot create '{name}': volume size cannot be zero")
        if size_bytes % VOLBLOCKSIZE:
            raise DriverError(f"cannot create '{name}': volume size must be a multiple "
                              "of volume block size")
        if not state.host_exists(self.root, self.host):
            raise DriverError(f"cannot create '{name}': no such pool '{pool}'")
        with state.subsystem_lock(self.root, self.host, "zfs"):
            if not self.pool_exists(pool):
                raise DriverError(f"cannot create '{name}': no such pool '{pool}'")
            final = state.zvol_dir(self.root, self.host, pool, zvol)
            if final.exists():
                raise DriverError(f"cannot create '{name}': dataset already exists")
            if not sparse and size_bytes > self.pool_usage(pool)["avail"]:
                raise DriverError(f"cannot create '{name}': out of space")
            tmp = final.with_name(f".creating-{zvol}-{os.getpid()}-{threading.get_ident()}")
            try:
                (tmp / SNAPSHOTS).mkdir(parents=True)
                with open(tmp / "data", "xb") as fh:
                    fh.truncate(size_bytes)             # a hole, never written zeros
                state.write_json(tmp / META, {"volsize": size_bytes, "volblocksize": VOLBLOCKSIZE,
                                              "sparse": bool(sparse), "creation": int(time.time())})
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None:
        """``zfs destroy [-r]``; a partial receive into the zvol goes with it.

        Held snapshots and devices in use refuse it, and then nothing is
        destroyed.  A zvol that only exists as a partial receive of a full
        stream is invisible, but destroying it by name removes that state, as
        destroying the half-received dataset does in ZFS.
        """
        name = f"{state.zpool_name(pool)}/{state.zvol_name(zvol)}"
        folder = state.zvol_dir(self.root, self.host, pool, zvol)
        staging = sendrecv.Staging(self.root, self.host, pool, zvol)
        missing = DriverError(f"cannot open '{name}': dataset does not exist")
        if not (folder / META).is_file() and not staging.exists():
            raise missing
        with state.subsystem_lock(self.root, self.host, "zfs"):
            partial = sendrecv.partial_state(self.root, self.host, pool, zvol)
            if partial is not None and staging.busy():
                raise DriverError(f"cannot destroy '{name}': dataset is busy")
            if not (folder / META).is_file():
                if partial is None:
                    raise missing
                staging.remove()
                return
            vol = Volume(self.root, self.host, folder, name)
            snaps = vol.snapshots()
            if not recursive and (snaps or partial is not None):
                raise DriverError(f"cannot destroy '{name}': volume has children")
            for snap in snaps:
                if snap.holds:
                    raise vol.held(snap)
            paths = [self.device_path(pool, zvol)] + [self._snap_path(pool, zvol, s.name)
                                                      for s in snaps]
            if any(blockdev.device_users(self.root, self.host, p) for p in paths):
                raise DriverError(f"cannot destroy '{name}': dataset is busy")
            trash = folder.with_name(f".destroying-{zvol}-{uuid.uuid4().hex}")
            os.rename(folder, trash)                     # gone for everyone at once
            staging.remove()
            shutil.rmtree(trash, ignore_errors=True)

    def device_path(self, pool: str, zvol: str) -> str:
        return f"/dev/zvol/{state.zpool_name(pool)}/{state.zvol_name(zvol)}"

    def _snap_path(self, pool: str, zvol: str, snap: str) -> str:
        return f"{self.device_path(pool, zvol)}@{snap}"

    # --------------------------------------------------------- snapshots
    def _volume(self, pool: str, zvol: str) -> Volume:
        return Volume.of(self.root, self.host, pool, zvol)

    def snapshot(self, pool: str, zvol: str, snap: str) -> None:
        self._volume(pool, zvol).create_snapshot(snapshot_name(snap))

    def list_snapshots(self, pool: str, zvol: str) -> List[str]:
        vol = self._volume(pool, zvol)
        if not vol.exists():
            raise DriverError(f"cannot open '{vol.label}': dataset does not exist")
        return [s.name for s in vol.snapshots()]

    def destroy_snapshot(self, pool: str, zvol: str, snap: str) -> None:
        vol = self._volume(pool, zvol)
        snapshot_name(snap)
        if not vol.exists():
            raise DriverError("could not find any snapshots to destroy; check snapshot names.")
        with vol.lock():
            if blockdev.device_users(self.root, self.host, self._snap_path(pool, zvol, snap)):
                raise DriverError(f"cannot destroy snapshot {vol.label}@{snap}: dataset is busy")
            vol.destroy_snapshot(snap)

    # -------------------------------------------------------------- holds
    def hold(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None:
        """``zfs hold``: until released, the snapshot (and so its zvol) cannot be destroyed."""
        self._volume(pool, zvol).hold(snapshot_name(snap), tag)

    def release(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None:
        self._volume(pool, zvol).release(snapshot_name(snap), tag)

    def holds(self, pool: str, zvol: str, snap: str) -> List[str]:
        return self._volume(pool, zvol).holds(snapshot_name(snap))

    def rollback(self, pool: str, zvol: str, snap: str, recursive: bool = False) -> None:
        """``zfs rollback [-r]``: the zvol becomes ``snap`` again.

        Without ``recursive`` only the most recent snapshot will do; with it
        the later ones are destroyed first, and a hold on any of them refuses
        the whole rollback before anything changed.
        """
        name = snapshot_name(snap)
        vol = self._volume(pool, zvol)
        if recursive and vol.exists():
            snaps = vol.snapshots()
            names = [s.name for s in snaps]
            if name in names:
                later = snaps[names.index(name) + 1:]
                for s in later:
                    if s.holds:
                        raise vol.held(s)
                for s in reversed(later):
                    self.destroy_snapshot(pool, zvol, s.name)
        vol.rollback(name)

    def snapshot_guid(self, pool: str, zvol: str, snap: str) -> int:
        """A snapshot's guid; a received snapshot has its sender's."""
        vol = self._volume(pool, zvol)
        name = snapshot_name(snap)
        for s in vol.snapshots() if vol.exists() else []:
            if s.name == name:
                return s.guid
        raise DriverError(f"cannot open '{vol.label}@{name}': dataset does not exist")

    def pool_available(self, pool: str) -> int:
        """What a new thick zvol may still reserve in ``pool``."""
        return self.pool_usage(pool)["avail"]

    # ----------------------------------------------------------- streams
    def send_size(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> int:
        """The exact length ``send`` will produce, from metadata only (``zfs send -nP``)."""
        return sendrecv.make_plan(self._volume(pool, zvol), snap, base).size

    def send(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> ByteSource:
        """A full stream of ``snap``, or with ``base`` the change since that earlier snapshot."""
        vol = self._volume(pool, zvol)
        return sendrecv.SendSource(vol, sendrecv.make_plan(vol, snap, base))

    def receive(self, pool: str, zvol: str, resumable: bool = False) -> ByteSink:
        """``zfs receive -F pool/zvol``: nothing changes unless the whole stream checks out.

        ``resumable`` (``-s``): a stream cut short keeps what arrived, and
        ``resume_token`` then says where a ``send_resume`` has to continue.
        """
        state.zvol_name(zvol)
        if not self.pool_exists(pool):
            raise DriverError(f"cannot open '{pool}': dataset does not exist")
        return sendrecv.ReceiveSink(self.root, self.host, pool, zvol, resumable)

    # ------------------------------------------------- resumable streams
    def resume_token(self, pool: str, zvol: str) -> Optional[str]:
        """The ``receive_resume_token`` of ``pool/zvol``: None if no receive into it is partial."""
        state.zvol_name(zvol)
        if not self.pool_exists(pool):
            return None
        with state.subsystem_lock(self.root, self.host, "zfs"):
            point = sendrecv.partial_state(self.root, self.host, pool, zvol)
        return point.token() if point is not None else None

    def abort_resume(self, pool: str, zvol: str) -> None:
        """``zfs receive -A``: throw away the partial state; none is fine.

        A receive still writing it makes this fail, as the dataset is busy in ZFS.
        """
        state.zvol_name(zvol)
        if not self.pool_exists(pool):
            return
        staging = sendrecv.Staging(self.root, self.host, pool, zvol)
        with state.subsystem_lock(self.root, self.host, "zfs"):
            if not staging.exists():
                return
            if staging.busy():
                target = (f"{pool}/{zvol}/%recv" if self.get_zvol(pool, zvol) is not None
                          else f"{pool}/{zvol}")
                raise DriverError(f"cannot destroy '{target}': dataset is busy")
            staging.remove()

    def send_resume(self, pool: str, zvol: str, token: str) -> ByteSource:
        """``zfs send -t``: what a cut receive still lacks, from this host's ``pool/zvol``.

        The real command finds the dataset from the token; here the sender's
        pool and zvol are given, as the two hosts may name them differently.
        """
        vol = self._volume(pool, zvol)
        return sendrecv.SendSource(vol, sendrecv.resume_plan(vol, token))

    def send_resume_size(self, pool: str, zvol: str, token: str) -> int:
        """The exact length ``send_resume`` will produce (``zfs send -nP -t``)."""
        return sendrecv.resume_plan(self._volume(pool, zvol), token).size
