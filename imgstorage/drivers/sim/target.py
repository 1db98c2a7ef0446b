"""The iSCSI target of a simulated NAS: a registry of exports and their ACLs.

``sim_root/<nas>/target/targets.json`` maps each target name to its backing
device, the initiators admitted and optional CHAP credentials.  Initiators of
other hosts read it at login and on every request to their ``/dev/sdX``, so
deleting a target here cuts the link there at once, as on a real NAS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ...errors import DriverError, ValidationError
from ..base import ChapCredentials, TargetInfo
from . import blockdev, state

_FILE = "targets.json"


def _path(root: Union[str, Path], host: str) -> Path:
    return state.subsystem_dir(root, host, "target") / _FILE


def read_targets(root: Union[str, Path], host: str) -> Dict[str, Dict[str, Any]]:
    """The targets of ``host`` (empty for a host without any)."""
    if not state.host_exists(root, host):
        return {}
    return state.read_json(_path(root, host), {}).get("targets", {})


def initiator_iqn(value: str) -> str:
    try:
        return state.iqn(value)
    except ValidationError:
        raise ValidationError(f"invalid initiator name {value!r}") from None


def _chap(chap: Optional[ChapCredentials]) -> Optional[Dict[str, str]]:
    if chap is None:
        return None
    for label, value in (("user", chap.userid), ("password", chap.password)):
        if not isinstance(value, str) or not value or any(c.isspace() for c in value):
            raise ValidationError(f"invalid CHAP {label}: a non-empty word is required")
    return {"userid": chap.userid, "password": chap.password}


def kernel_target_name(value: str) -> str:
    """A target name checked as strictly as LIO checks it.

    rtslib-fb lowercases a target name and refuses ``_``: a name with either
    would be created under another name (and never found again) or not at
    all.  The simulated target refuses both, so a caller that would lose an
    export on a real NAS fails here too.
    """
    name = state.iqn(value)
    if name != name.lower() or "_" in name:
        raise DriverError(f"invalid iSCSI target name {name!r}: LIO keeps target names "
                          "lowercase and refuses '_'")
    return name


class SimTarget:
    """The TargetDriver of one simulated NAS (behaves like LIO: one ACL per initiator)."""

    def __init__(self, root: Union[str, Path], host: str):
        self.root = Path(root)
        self.host = state.sim_host(host)

    def create_target(self, iqn: str, device: str, initiator: str,
                      chap: Optional[ChapCredentials] = None) -> None:
        iqn = kernel_target_name(iqn)
        entry = {"device": device, "acls": [initiator_iqn(initiator)], "chap": _chap(chap)}
        if not blockdev.device_exists(self.root, self.host, device):
            raise DriverError(f"cannot create target {iqn}: device {device} "
                              f"does not exist on {self.host}")
        with state.subsystem_lock(self.root, self.host, "target"):
            data = state.read_json(_path(self.root, self.host), {})
            targets = data.setdefault("targets", {})
            existing = targets.get(iqn)
            if existing is not None:
                if existing == entry:
                    return
                raise DriverError(f"cannot create target {iqn}: it already exists with other "
                                  f"settings (device {existing.get('device')}, "
                                  f"ACL {', '.join(existing.get('acls', [])) or 'none'})")
            for other, info in sorted(targets.items()):
                if info.get("device") == device:
                    raise DriverError(f"cannot create target {iqn}: {device} is already "
                                      f"exported by {other} (Device or resource busy)")
            targets[iqn] = entry
            state.write_json(_path(self.root, self.host), data)

    def delete_target(self, iqn: str) -> None:
        iqn = state.iqn(iqn)
        if not state.host_exists(self.root, self.host):
            return
        with state.subsystem_lock(self.root, self.host, "target"):
            data = state.read_json(_path(self.root, self.host), {})
            if data.get("targets", {}).pop(iqn, None) is not None:
                state.write_json(_path(self.root, self.host), data)

    def list_targets(self) -> List[TargetInfo]:
        return [TargetInfo(iqn=iqn, device=info.get("device"), acls=list(info.get("acls", [])))
                for iqn, info in sorted(read_targets(self.root, self.host).items())]
