"""What a VM container does for its NAS: attach a zvol's iSCSI disk, let it go, list devices.

The container's own life cycle of a zvol is short in direct-iSCSI mode:
``attaching`` (recorded before discovery and login) -> ``attached`` (the block
device is known) -> ``detaching`` -> row removed.  A failed attach logs out
again, so the NAS's rollback never leaves a session behind.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .. import naming
from ..config import Config
from ..drivers import NodeDrivers
from ..drivers.base import ChapCredentials, SessionInfo
from ..errors import DriverError, ImgStorageError, StateError, ValidationError
from .models import VmZvol

log = logging.getLogger(__name__)

DEVICE_WAIT = 20.0        # seconds for the kernel to attach a logged-in disk
POLL = 0.1


def wait_for(condition: Callable[[], object], timeout: float, interval: float = POLL):
    """Poll ``condition`` until it returns something true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class VmService:
    def __init__(self, config: Config, engine: Engine, drivers: NodeDrivers):
        self.config = config
        self.engine = engine
        self.drivers = drivers

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def initiator_name(self) -> str:
        return self.drivers.initiator.initiator_name()

    def _session_for(self, target: str) -> Optional[SessionInfo]:
        for s in self.drivers.initiator.sessions():
            if s.iqn == target:
                return s
        return None

    def _set_state(self, zvol: str, state: str, **fields) -> None:
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            old = row.state
            row.state = state
            for k, v in fields.items():
                setattr(row, k, v)
            log.info("zvol %s: %s -> %s (%.1fs)", zvol, old, state, time.time() - row.state_since)
            row.state_since = time.time()

    # -- map ----------------------------------------------------------------
    def map_zvol(self, zvol: str, target: str, nas: str, sync: bool,
                 remotepool: Optional[str], chap: Optional[ChapCredentials],
                 timeout: float) -> str:
        if sync:
            raise ValidationError("sync mode (img_sync=true) is not available in this version")
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                if row.iscsi_target == target and row.state == "attached" and row.bdev:
                    return row.bdev
                raise StateError(f"zvol {zvol} is already {row.state} on {self.config.name}")
            s.add(VmZvol(zvol=zvol, nas=nas, iscsi_target=target, remotepool=remotepool,
                         sync=sync, state="attaching", state_since=time.time()))
        started = time.monotonic()
        try:
            found = [t.iqn for t in self.drivers.initiator.discover(nas)]
            if target not in found:
                raise DriverError(f"Could not find iSCSI target {target} on NAS {nas}")
            self.drivers.initiator.login(target, nas, chap)
            session = wait_for(lambda: (lambda s: s if s and s.device else None)(
                self._session_for(target)), min(DEVICE_WAIT, max(1.0, timeout - 1)))
            if not session:
                raise DriverError(f"Not found {target} in targets: the disk did not appear")
            bdev = f"/dev/{session.device}"
        except Exception:
            self._undo_attach(zvol, target, nas)
            raise
        self._set_state(zvol, "attached", bdev=bdev)
        log.info("attached %s from %s as %s in %.2fs", zvol, nas, bdev, time.monotonic() - started)
        return bdev

    def _undo_attach(self, zvol: str, target: str, nas: str) -> None:
        try:
            if self._session_for(target):
                self.drivers.initiator.logout(target, nas)
        except ImgStorageError as exc:
            log.error("could not log out of %s after a failed attach: %s", target, exc)
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                s.delete(row)

    # -- unmap --------------------------------------------------------------
    def unmap_zvol(self, zvol: str, target: Optional[str], timeout: float) -> None:
        with self._session() as s:
            row = s.get(VmZvol, zvol)
        target = target or (row.iscsi_target if row else None)
        if row is not None:
            if row.bdev:
                free = wait_for(lambda: not self.drivers.blockdev.in_use(row.bdev),
                                max(0.0, timeout - 1.0), interval=0.25)
                if not free:
                    raise StateError(f"device {row.bdev} of zvol {zvol} is still in use "
                                     f"on {self.config.name}; stop the VM first")
            self._set_state(zvol, "detaching")
        if target and self._session_for(target):
            self.drivers.initiator.logout(target, row.nas if row else None)
        with self._session() as s, s.begin():
            row = s.get(VmZvol, zvol)
            if row is not None:
                s.delete(row)
        log.info("detached %s", zvol)

    # -- listing ------------------------------------------------------------
    def list_dev(self) -> Dict[str, Dict]:
        with self._session() as s:
            rows = {r.zvol: r for r in s.scalars(select(VmZvol))}
        sessions = {x.iqn: x for x in self.drivers.initiator.sessions()}
        dm = {d.name: d for d in self.drivers.dm.status()}
        body: Dict[str, Dict] = {}
        for zvol, row in sorted(rows.items()):
            sess = sessions.get(row.iscsi_target or "")
            size = None
            if row.bdev:
                try:
                    size = self.drivers.blockdev.size_bytes(row.bdev) // naming.GIB
                except ImgStorageError:
                    size = None
            entry = {"zvol": zvol, "device": None, "status": "iscsi", "size": size,
                     "bdev": sess.device if sess else None, "target": row.iscsi_target,
                     "nas": row.nas, "started": None, "synced": None, "time": None,
                     "sync": "sync" if row.sync else "iscsi", "state": row.state}
            snap = dm.get(f"{zvol}-snap")
            if snap is not None:
                entry.update(device=snap.name, status=snap.target_type,
                             size=snap.length * naming.SECTOR // naming.GIB,
                             synced=snap.args if snap.snapshot_figures() else None)
            body[zvol] = entry
        known = {r.iscsi_target for r in rows.values()}
        for n, iqn in enumerate(sorted(set(sessions) - known)):
            body[f"volume{n}"] = {"zvol": None, "device": None, "status": "iscsi", "size": None,
                                  "bdev": sessions[iqn].device, "target": iqn, "started": None,
                                  "synced": None, "time": None, "sync": "iscsi",
                                  "state": "unknown"}
        return body

    def attached(self) -> List[VmZvol]:
        with self._session() as s:
            return list(s.scalars(select(VmZvol)))
