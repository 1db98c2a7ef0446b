"""iSCSI targets on the tgt daemon, through ``tgtadm``.

tgt numbers targets itself only on request: every new target needs a free
TID, which is read from ``--op show`` and taken under a lock so that two
exports made at once by this process never pick the same number.  The show
output is parsed defensively: the original tools crashed on a nameless
``Target N:`` line.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import CommandError, DriverError
from ..runner import Runner
from .base import ChapCredentials, TargetInfo

log = logging.getLogger(__name__)

_TARGET_LINE = re.compile(r"^Target (\d+):(.*)$")
_SECTIONS = {
    "System information:": "system",
    "I_T nexus information:": "nexus",
    "LUN information:": "lun",
    "Account information:": "account",
    "ACL information:": "acl",
}
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")
# The LUN tgt-setup-lun gave the disk; LUN 0 is tgt's own controller.
DISK_LUN = 1


@dataclass
class TgtState:
    """One target as ``tgtadm --op show`` describes it."""
    tid: int
    iqn: Optional[str]
    luns: Dict[int, Optional[str]] = field(default_factory=dict)   # LUN -> backing store
    acls: List[str] = field(default_factory=list)                  # addresses and names
    accounts: List[str] = field(default_factory=list)              # incoming CHAP users
    outgoing_account: Optional[str] = None
    connected: List[str] = field(default_factory=list)             # initiators with a nexus

    @property
    def device(self) -> Optional[str]:
        if self.luns.get(DISK_LUN):
            return self.luns[DISK_LUN]
        return next((path for _, path in sorted(self.luns.items()) if path), None)

    @property
    def initiator_acls(self) -> List[str]:
        """ACL entries naming an initiator (the others are addresses)."""
        return [a for a in self.acls if a.lower().startswith(_NAME_PREFIXES)]


def parse_show(stdout: str) -> List[TgtState]:
    targets: List[TgtState] = []
    current: Optional[TgtState] = None
    section: Optional[str] = None
    lun: Optional[int] = None
    for raw in stdout.splitlines():
        m = _TARGET_LINE.match(raw)
        if m:
            words = m.group(2).split()
            current = TgtState(tid=int(m.group(1)), iqn=words[0] if words else None)
            targets.append(current)
            section, lun = None, None
            continue
        line = raw.strip()
        if current is None or not line or not raw[:1].isspace():
            continue  # before the first target, or a stray unindented line
        if line in _SECTIONS:
            section = _SECTIONS[line]
            continue
        key, _, value = line.partition(":")
        value = value.strip()
        if section == "lun":
            if key == "LUN":
                lun = int(value) if value.isdigit() else None
            elif key == "Backing store path" and lun is not None:
                current.luns[lun] = None if value in ("", "None") else value
        elif section == "nexus":
            if key == "Initiator" and value:
                current.connected.append(value.split()[0])
        elif section == "account":
            if line.endswith("(outgoing)"):
                current.outgoing_account = line[:-len("(outgoing)")].strip()
            else:
                current.accounts.append(line)
        elif section == "acl":
            current.acls.append(line)
    return targets


class TgtTarget:
    """TargetDriver on tgt's ``tgtadm``."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._lock = threading.Lock()

    def _tgtadm(self, *args: object, redact: Sequence[str] = ()) -> str:
        return self.runner.run(["tgtadm", "--lld", "iscsi", *[str(a) for a in args]],
                               redact=redact).stdout

    def show(self) -> List[TgtState]:
        return parse_show(self._tgtadm("--mode", "target", "--op", "show"))

    def list_targets(self) -> List[TargetInfo]:
        """Named targets; ``acls`` holds the initiator-name ACLs only."""
        return [TargetInfo(iqn=t.iqn, device=t.device, acls=t.initiator_acls, tid=t.tid)
                for t in self.show() if t.iqn]

    def create_target(self, iqn: str, device: str, initiator: str,
                      chap: Optional[ChapCredentials] = None) -> None:
        with self._lock:
            targets = self.show()
            existing = next((t for t in targets if t.iqn == iqn), None)
            if existing is not None:
                self._adopt(existing, device, initiator, chap)
                return
            tid = max((t.tid for t in targets), default=0) + 1
            self._tgtadm("--mode", "target", "--op", "new", "--tid", tid, "-T", iqn)
            try:
                self._tgtadm("--mode", "logicalunit", "--op", "new", "--tid", tid,
                             "--lun", DISK_LUN, "-b", device)
                self._tgtadm("--mode", "target", "--op", "bind", "--tid", tid, "-Q", initiator)
                if chap is not None:
                    self._add_account(tid, chap)
            except DriverError:
                self._rollback(tid)
                raise

    def _adopt(self, existing: TgtState, device: str, initiator: str,
               chap: Optional[ChapCredentials]) -> None:
        """The same export asked for twice is fine; a different one is not.

        Address ACLs count too: a target that also admits an address (or
        ALL) is not limited to this one initiator.
        """
        if existing.device != device or existing.acls != [initiator]:
            raise DriverError(
                f"iSCSI target {existing.iqn} already exists (tid {existing.tid}) for "
                f"{existing.device or 'no device'} and initiators "
                f"{', '.join(existing.acls) or 'none'}")
        if chap is not None and chap.userid not in existing.accounts:
            self._add_account(existing.tid, chap)

    def _add_account(self, tid: int, chap: ChapCredentials) -> None:
        new = ("--mode", "account", "--op", "new", "--user", chap.userid,
               "--password", chap.password)
        try:
            self._tgtadm(*new, redact=[chap.password])
        except CommandError as exc:
            if "already exists" not in exc.stderr:
                raise _without_secret(exc, chap) from None
            # tgt cannot change a password in place: replace the account.
            self._tgtadm("--op", "delete", "--mode", "account", "--user", chap.userid)
            try:
                self._tgtadm(*new, redact=[chap.password])
            except CommandError as again:
                raise _without_secret(again, chap) from None
        self._tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", chap.userid)

    def _rollback(self, tid: int) -> None:
        try:
            self._delete_tid(tid)
        except DriverError as exc:
            log.error("could not remove half-made tgt target %d: %s", tid, exc)

    def _delete_tid(self, tid: int) -> None:
        try:
            self._tgtadm("--op", "delete", "--force", "--mode", "target", "--tid", tid)
        except CommandError as exc:
            if "can't find the target" not in exc.stderr:
                raise

    def delete_target(self, iqn: str) -> None:
        """Also drops the CHAP accounts no other target uses; gone already is fine."""
        with self._lock:
            targets = self.show()
            mine = [t for t in targets if t.iqn == iqn]
            for target in mine:
                self._delete_tid(target.tid)
            still_used = {a for t in targets if t.iqn != iqn for a in t.accounts}
            for account in sorted({a for t in mine for a in t.accounts} - still_used):
                try:
                    self._tgtadm("--op", "delete", "--mode", "account", "--user", account)
                except CommandError as exc:
                    if "can't find the account" not in exc.stderr:
                        raise


def _without_secret(exc: CommandError, chap: ChapCredentials) -> DriverError:
    """The command line holds the password; the operator needs only tgtadm's reason."""
    reason = (exc.stderr or exc.stdout).strip().replace(chap.password, "********")
    return DriverError(f"tgtadm could not create the CHAP account {chap.userid}: "
                       f"{reason or f'exit {exc.returncode}'}")
