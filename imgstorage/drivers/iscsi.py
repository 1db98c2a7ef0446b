"""The iSCSI initiator of a VM container, through open-iscsi's ``iscsiadm``.

iscsiadm reports "nothing there" with exit status 21 and several other
outcomes with their own codes; the driver turns the ones that are not
failures for us (no session to log out, a session already logged in) into
success, and the one an operator must act on (refused credentials) into a
sentence.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..errors import CommandError, DriverError
from ..runner import Result, Runner
from .base import ChapCredentials, DiscoveredTarget, SessionInfo

DEFAULT_INITIATOR_FILE = "/etc/iscsi/initiatorname.iscsi"

# open-iscsi's exit statuses (include/iscsi_err.h)
ERR_SESSION_EXISTS = 15
ERR_NO_OBJECTS_FOUND = 21
ERR_LOGIN_AUTH_FAILED = 24


def parse_discovery(stdout: str) -> List[DiscoveredTarget]:
    """Lines ``ADDRESS:PORT,TPGT IQN`` (an IPv6 address comes in brackets)."""
    found = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        portal, sep, tpgt = parts[0].rpartition(",")
        if not sep or not portal or not tpgt.isdigit():
            continue
        found.append(DiscoveredTarget(portal=portal, tpgt=int(tpgt), iqn=parts[1]))
    return found


def parse_sessions(stdout: str) -> List[SessionInfo]:
    """``iscsiadm -m session -P 3``: Target, then per session a SID and its disks.

    One ``Target:`` line can cover several sessions (one per portal), so a
    session starts at its ``SID:`` line; the first attached disk is the LUN
    the VM uses (tgt's LUN 0 is a controller without a disk).
    """
    sessions: List[dict] = []
    target: Optional[str] = None
    portal: Optional[str] = None
    current: Optional[dict] = None
    for raw in stdout.splitlines():
        line = raw.strip()
        if line.startswith("Target:"):
            words = line[len("Target:"):].split()
            target = words[0] if words else None
            portal, current = None, None
        elif target is None:
            continue
        elif line.startswith("Current Portal:"):
            value = line[len("Current Portal:"):].strip()
            portal = value.rpartition(",")[0] or value
        elif line.startswith("SID:"):
            sid = line[len("SID:"):].strip()
            current = {"iqn": target, "portal": portal,
                       "sid": int(sid) if sid.isdigit() else None, "device": None}
            sessions.append(current)
        elif line.startswith("Attached scsi disk"):
            words = line[len("Attached scsi disk"):].split()
            if not words:
                continue
            if current is None:
                current = {"iqn": target, "portal": portal, "sid": None, "device": None}
                sessions.append(current)
            if current["device"] is None:
                current["device"] = words[0]
    return [SessionInfo(**s) for s in sessions]


class Iscsiadm:
    """InitiatorDriver on open-iscsi's ``iscsiadm``."""

    def __init__(self, runner: Runner, initiator_file: str = DEFAULT_INITIATOR_FILE) -> None:
        self.runner = runner
        self.initiator_file = initiator_file

    def initiator_name(self) -> str:
        try:
            text = Path(self.initiator_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise DriverError(f"cannot read the iSCSI initiator name from "
                              f"{self.initiator_file}: {exc.strerror or exc}") from None
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "InitiatorName" and value.strip():
                return value.strip()
        raise DriverError(f"{self.initiator_file} has no InitiatorName= line")

    def discover(self, portal: str, timeout: Optional[float] = None) -> List[DiscoveredTarget]:
        argv = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal]
        result = self._run(argv, timeout, f"discovery of {portal}")
        if result.returncode == ERR_NO_OBJECTS_FOUND:
            return []
        if result.returncode != 0:
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_discovery(result.stdout)

    def login(self, iqn: str, portal: str, chap: Optional[ChapCredentials] = None,
              timeout: Optional[float] = None) -> None:
        node = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
        # The node record outlives this call: always say which method to use,
        # so credentials left from an earlier mapping never leak into this one.
        if chap is not None:
            self._update(node, "node.session.auth.authmethod", "CHAP")
            self._update(node, "node.session.auth.username", chap.userid)
            self._update(node, "node.session.auth.password", chap.password, secret=True)
        else:
            self._update(node, "node.session.auth.authmethod", "None")
        argv = node + ["--login"]
        result = self._run(argv, timeout, f"login to {iqn} at {portal}")
        if result.returncode in (0, ERR_SESSION_EXISTS):
            return
        if result.returncode == ERR_LOGIN_AUTH_FAILED:
            raise DriverError(f"iSCSI login to {iqn} at {portal} was refused: authorization "
                              "failure (wrong CHAP credentials, or this initiator is not in "
                              "the target's ACL)")
        if result.returncode == ERR_NO_OBJECTS_FOUND:
            raise DriverError(f"no iSCSI node record for {iqn} at {portal}: "
                              "discover the portal first")
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def _run(self, argv: List[str], timeout: Optional[float], what: str) -> Result:
        """A step that may wait on the network: bounded by what the caller has left."""
        if timeout is None:
            return self.runner.run(argv, check=False)
        try:
            return self.runner.run(argv, check=False, timeout=timeout)
        except CommandError as exc:
            if exc.timed_out:
                raise DriverError(f"iSCSI {what} did not finish within {timeout:.1f} s") from None
            raise

    def _update(self, node: List[str], key: str, value: str, secret: bool = False) -> None:
        argv = node + ["--op", "update", "-n", key, "-v", value]
        try:
            self.runner.run(argv, redact=[value] if secret else ())
        except CommandError as exc:
            if exc.returncode == ERR_NO_OBJECTS_FOUND:
                raise DriverError(f"no iSCSI node record for {node[4]} at {node[6]}: "
                                  "discover the portal first") from None
            if secret:
                # The error text would carry the password: keep it out of logs.
                raise DriverError(f"could not set {key} for {node[4]} "
                                  f"(iscsiadm exit {exc.returncode})") from None
            raise

    def logout(self, iqn: str, portal: Optional[str] = None) -> None:
        argv = ["iscsiadm", "-m", "node", "-T", iqn]
        if portal is not None:
            argv += ["-p", portal]
        argv.append("--logout")
        result = self.runner.run(argv, check=False)
        if result.returncode in (0, ERR_NO_OBJECTS_FOUND):
            return
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def sessions(self) -> List[SessionInfo]:
        argv = ["iscsiadm", "-m", "session", "-P", "3"]
        result = self.runner.run(argv, check=False)
        if result.returncode == ERR_NO_OBJECTS_FOUND:
            return []
        if result.returncode != 0:
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_sessions(result.stdout)
