"""iSCSI targets on the kernel's LIO target, through rtslib-fb's object model.

Each export is one block storage object, one target with TPG 1, a portal, LUN
0 and an ACL for exactly one initiator.  Node ACLs are never generated, so no
other initiator can log in even if it learns the target name; with CHAP the
ACL also carries the credentials.  rtslib-fb is imported only when a method
runs, so this module loads on machines that never export anything.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional

from ..errors import DriverError
from .base import ChapCredentials, TargetInfo

log = logging.getLogger(__name__)

TPG_TAG = 1
LUN_INDEX = 0
DEFAULT_PORTAL_IP = "0.0.0.0"
DEFAULT_PORTAL_PORT = 3260


_DATE_PREFIX = re.compile(r"^iqn\.\d{4}-\d{2}\.")


def kernel_name(iqn: str) -> str:
    """A target name as LIO keeps it: rtslib-fb lowercases every IQN."""
    return iqn.lower()


def storage_name(iqn: str) -> str:
    """The backstore name for a target: one per target name, a valid configfs name.

    The IQN without its ``iqn.YYYY-MM.`` prefix, as it always was for a name
    without ``:`` (so existing backstores keep their names); a ``:`` becomes
    ``_``, which no target name LIO accepts contains, so ``...nas-x:b`` and
    ``...nas-y:b`` no longer share the backstore ``b``.
    """
    tail = _DATE_PREFIX.sub("", kernel_name(iqn)).replace(":", "_")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tail) or "imgstorage"


def legacy_storage_name(iqn: str) -> str:
    """The backstore name earlier releases gave a target (the part after the last ``:``)."""
    if ":" in iqn:
        tail = iqn.rsplit(":", 1)[1]
    else:
        tail = _DATE_PREFIX.sub("", iqn)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tail) or "imgstorage"


def _check_name(iqn: str) -> None:
    """Refuse up front what rtslib-fb would refuse half-way through an export."""
    if "_" in iqn or any(c.isspace() for c in iqn):
        raise DriverError(f"cannot export {iqn}: LIO target names may not contain '_' "
                          "or spaces")


def _same_device(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    return a == b or os.path.realpath(a) == os.path.realpath(b)


class LioTarget:
    """TargetDriver on LIO via rtslib-fb (or a module with the same objects)."""

    def __init__(self, rtslib: Any = None, *, portal_ip: str = DEFAULT_PORTAL_IP,
                 portal_port: int = DEFAULT_PORTAL_PORT) -> None:
        self._rtslib = rtslib
        self.portal_ip = portal_ip
        self.portal_port = portal_port

    @property
    def rts(self) -> Any:
        if self._rtslib is None:
            try:
                import rtslib_fb
            except ImportError:
                raise DriverError("the LIO target driver needs rtslib-fb "
                                  "(python3-rtslib-fb) on this node") from None
            self._rtslib = rtslib_fb
        return self._rtslib

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """rtslib raises its own errors and plain OSError from configfs writes."""
        rts = self.rts
        try:
            yield
        except (rts.RTSLibError, OSError) as exc:
            raise DriverError(f"could not {doing}: {exc}") from exc

    # ------------------------------------------------------------ queries
    def _targets(self) -> List[Any]:
        return [t for t in self.rts.RTSRoot().targets if t.fabric_module.name == "iscsi"]

    def _find(self, iqn: str) -> Optional[Any]:
        wanted = kernel_name(iqn)
        return next((t for t in self._targets() if t.wwn == wanted), None)

    @staticmethod
    def _info(target: Any) -> TargetInfo:
        device = None
        acls: List[str] = []
        for tpg in target.tpgs:
            luns = sorted(tpg.luns, key=lambda lun: lun.lun)
            if device is None and luns:
                device = luns[0].storage_object.udev_path
            acls += [acl.node_wwn for acl in tpg.node_acls]
        return TargetInfo(iqn=target.wwn, device=device, acls=acls)

    def list_targets(self) -> List[TargetInfo]:
        with self._errors("list the LIO targets"):
            return [self._info(t) for t in self._targets()]

    # ------------------------------------------------------------ changes
    def create_target(self, iqn: str, device: str, initiator: str,
                      chap: Optional[ChapCredentials] = None) -> None:
        rts = self.rts
        _check_name(iqn)
        with self._errors(f"export {device} as {iqn}"):
            existing = self._find(iqn)
            if existing is not None:
                self._adopt(existing, device, initiator, chap)
                return
            created: List[Any] = []
            try:
                so = self._storage_object(storage_name(iqn), device, created)
                target = rts.Target(rts.FabricModule("iscsi"), iqn, mode="create")
                created.append(target)
                tpg = rts.TPG(target, TPG_TAG, mode="create")
                tpg.set_attribute("generate_node_acls", "0")
                tpg.set_attribute("authentication", "1" if chap else "0")
                rts.NetworkPortal(tpg, self.portal_ip, self.portal_port, mode="create")
                lun = rts.LUN(tpg, LUN_INDEX, so)
                acl = rts.NodeACL(tpg, initiator, mode="create")
                rts.MappedLUN(acl, LUN_INDEX, lun)
                if chap is not None:
                    acl.chap_userid = chap.userid
                    acl.chap_password = chap.password
                tpg.enable = True
            except Exception:
                self._rollback(created)
                raise

    def _storage_object(self, name: str, device: str, created: List[Any]) -> Any:
        leftover = self._named_storage(name)
        if leftover is not None:
            if _same_device(leftover.udev_path, device) and not list(leftover.attached_luns):
                return leftover  # left by an interrupted export of this same device
            raise DriverError(f"LIO storage object {name} already exists "
                              f"for {leftover.udev_path or 'another device'}")
        so = self.rts.BlockStorageObject(name, dev=device)
        created.append(so)
        return so

    def _named_storage(self, name: str) -> Optional[Any]:
        return next((so for so in self.rts.RTSRoot().storage_objects
                     if so.plugin == "block" and so.name == name), None)

    def _adopt(self, target: Any, device: str, initiator: str,
               chap: Optional[ChapCredentials]) -> None:
        """Asking twice for the same export is fine; a different one is not."""
        info = self._info(target)
        if not _same_device(info.device, device) or info.acls != [initiator]:
            raise DriverError(f"iSCSI target {info.iqn} already exists for "
                              f"{info.device or 'no device'} and initiators "
                              f"{', '.join(info.acls) or 'none'}")
        if chap is None:
            return
        tpg = next(iter(target.tpgs))
        acl = next(iter(tpg.node_acls))
        if acl.chap_userid != chap.userid or acl.chap_password != chap.password:
            acl.chap_userid = chap.userid
            acl.chap_password = chap.password
        if tpg.get_attribute("authentication") != "1":
            tpg.set_attribute("authentication", "1")

    @staticmethod
    def _rollback(created: List[Any]) -> None:
        for obj in reversed(created):
            try:
                obj.delete()
            except Exception as exc:  # keep undoing; the first error is the one to report
                log.error("could not undo %r: %s", obj, exc)

    def delete_target(self, iqn: str) -> None:
        """Removes the target and its storage object; gone already is fine."""
        with self._errors(f"remove the LIO target {iqn}"):
            target = self._find(iqn)
            if target is not None:
                storage = [lun.storage_object for tpg in target.tpgs for lun in tpg.luns]
                target.delete()
            else:
                storage = [so for so in (self._named_storage(name) for name in
                                         dict.fromkeys([storage_name(iqn),
                                                        legacy_storage_name(iqn)]))
                           if so is not None]
            for so in storage:
                if not list(so.attached_luns):
                    so.delete()
