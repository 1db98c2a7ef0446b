"""The iSCSI initiator of a simulated host: sessions that yield ``/dev/sdX``.

Portal convention: a portal is ``HOST[.network][:port]`` (``nas-0-0``,
``nas-0-0.ibnet:3260``).  The simulated host it reaches is the part before the
first ``.`` and ``:``, so every network name of a host leads to the same
folder ``sim_root/<host>/``; that is why sim host names contain no dot.

State: ``sim_root/<host>/iscsi/initiatorname`` (as ``/etc/iscsi/initiatorname.iscsi``)
and ``sim_root/<host>/iscsi/sessions.json``.

A real kernel attaches the disk of a new session a moment after the login
returns; ``IMGSTORAGE_SIM_DISK_DELAY`` (seconds, default 0) makes the
simulation do the same, so a test can act while a container waits for it.
A real login itself can take long (a slow or distant portal);
``IMGSTORAGE_SIM_LOGIN_DELAY`` (seconds, default 0) makes the simulated login
take that long.  A login given a ``timeout`` shorter than that gives up when
it passes and makes no session, as iscsiadm stopped by its timeout.
"""
from __future__ import annotations

import os
import string
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ...errors import DriverError, ValidationError
from ..base import ChapCredentials, DiscoveredTarget, SessionInfo
from . import state, target

NAME_PREFIX = "iqn.2005-03.org.open-iscsi:"
DEFAULT_PORT = 3260
_SESSIONS = "sessions.json"
_NAME_FILE = "initiatorname"
DISK_DELAY_ENV = "IMGSTORAGE_SIM_DISK_DELAY"
LOGIN_DELAY_ENV = "IMGSTORAGE_SIM_LOGIN_DELAY"


def _seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or 0))
    except ValueError:
        return 0.0


def _disk_delay() -> float:
    return _seconds(DISK_DELAY_ENV)


def parse_portal(portal: str) -> Tuple[str, str, int]:
    """``(sim_host, host_part, port)`` of ``HOST[.network][:port]``."""
    if not isinstance(portal, str) or not portal:
        raise ValidationError("invalid portal: expected HOST[.network][:port]")
    host_part, sep, port_text = portal.partition(":")
    port = DEFAULT_PORT
    if sep:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValidationError(f"invalid portal {portal!r}: bad port")
        port = int(port_text)
    try:
        state.host_name(host_part)
    except ValidationError:
        raise ValidationError(f"invalid portal {portal!r}: expected HOST[.network][:port]") from None
    return host_part.split(".", 1)[0], host_part, port


def _sessions_path(root: Union[str, Path], host: str) -> Path:
    return state.subsystem_dir(root, host, "iscsi") / _SESSIONS


def read_sessions(root: Union[str, Path], host: str) -> List[Dict[str, Any]]:
    if not state.host_exists(root, host):
        return []
    return state.read_json(_sessions_path(root, host), {}).get("sessions", [])


def session_for_disk(root: Union[str, Path], host: str, disk: str) -> Optional[Dict[str, Any]]:
    """The session whose SCSI disk is ``disk`` ("sdb"), if it is logged in."""
    for session in read_sessions(root, host):
        if session.get("device") == disk:
            return session
    return None


def _disk_name(index: int) -> str:
    """The kernel's SCSI disk names: sda..sdz, sdaa..sdzz, ... for index 0, 1, ..."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rem] + letters
    return "sd" + letters


def _auth_failure(iqn: str, portal: str) -> DriverError:
    return DriverError(f"Could not login to [iface: default, target: {iqn}, portal: {portal}]: "
                       "iSCSI login failed due to authorization failure")


class SimInitiator:
    """The InitiatorDriver of one simulated host."""

    def __init__(self, root: Union[str, Path], host: str):
        self.root = Path(root)
        self.host = state.sim_host(host)

    def initiator_name(self) -> str:
        path = state.subsystem_dir(self.root, self.host, "iscsi") / _NAME_FILE
        with state.subsystem_lock(self.root, self.host, "iscsi"):
            try:
                for line in path.read_text(encoding="utf-8").splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() == "InitiatorName" and value.strip():
                        return value.strip()
            except FileNotFoundError:
                pass
            name = NAME_PREFIX + self.host
            state.write_text(path, f"InitiatorName={name}\n")
            return name

    def _reachable(self, portal: str) -> Tuple[str, str, int]:
        nas, host_part, port = parse_portal(portal)
        if not state.host_exists(self.root, nas):
            raise DriverError(f"cannot make connection to {portal}: No route to host")
        return nas, host_part, port

    def discover(self, portal: str, timeout: Optional[float] = None) -> List[DiscoveredTarget]:
        """SendTargets: every target of the NAS, as LIO answers by default."""
        nas, host_part, port = self._reachable(portal)
        return [DiscoveredTarget(portal=f"{host_part}:{port}", tpgt=1, iqn=iqn)
                for iqn in sorted(target.read_targets(self.root, nas))]

    def login(self, iqn: str, portal: str, chap: Optional[ChapCredentials] = None,
              timeout: Optional[float] = None) -> None:
        iqn = state.iqn(iqn)
        nas, host_part, port = self._reachable(portal)
        me = self.initiator_name()
        delay = _seconds(LOGIN_DELAY_ENV)
        if timeout is not None and delay > timeout:
            time.sleep(max(0.0, timeout))
            raise DriverError(f"iSCSI login to {iqn} at {portal} did not finish within "
                              f"{timeout:.1f} s")
        time.sleep(delay)          # the target is looked at when the login lands
        with state.subsystem_lock(self.root, self.host, "iscsi"):
            data = state.read_json(_sessions_path(self.root, self.host), {})
            sessions = data.setdefault("sessions", [])
            for session in sessions:
                if session["iqn"] == iqn:
                    if session["nas"] == nas:
                        return
                    raise DriverError(f"a session to {iqn} already exists "
                                      f"through {session['portal']}")
            info = target.read_targets(self.root, nas).get(iqn)
            if info is None:
                raise DriverError(f"Could not login to [iface: default, target: {iqn}, "
                                  f"portal: {portal}]: target not found")
            if me not in info.get("acls", []):
                raise _auth_failure(iqn, portal)
            want = info.get("chap")
            if want and (chap is None or (chap.userid, chap.password)
                         != (want["userid"], want["password"])):
                raise _auth_failure(iqn, portal)
            used = {s["device"] for s in sessions}
            index = 1                                  # sda is the host's own disk
            while _disk_name(index) in used:
                index += 1
            sid = data.get("next_sid", 1)
            data["next_sid"] = sid + 1
            sessions.append({"sid": sid, "iqn": iqn, "portal": f"{host_part}:{port}",
                             "nas": nas, "device": _disk_name(index), "initiator": me,
                             "disk_at": time.time() + _disk_delay()})
            state.write_json(_sessions_path(self.root, self.host), data)

    def logout(self, iqn: str, portal: Optional[str] = None) -> None:
        iqn = state.iqn(iqn)
        nas = parse_portal(portal)[0] if portal is not None else None
        if not state.host_exists(self.root, self.host):
            return
        with state.subsystem_lock(self.root, self.host, "iscsi"):
            data = state.read_json(_sessions_path(self.root, self.host), {})
            sessions = data.get("sessions", [])
            keep = [s for s in sessions if not (s["iqn"] == iqn and nas in (None, s["nas"]))]
            if len(keep) != len(sessions):
                data["sessions"] = keep
                state.write_json(_sessions_path(self.root, self.host), data)

    def sessions(self) -> List[SessionInfo]:
        now = time.time()
        return [SessionInfo(iqn=s["iqn"], portal=s["portal"], sid=s["sid"],
                            device=s["device"] if s.get("disk_at", 0) <= now else None)
                for s in sorted(read_sessions(self.root, self.host), key=lambda s: s["sid"])]
