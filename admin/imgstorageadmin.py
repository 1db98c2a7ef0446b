"""``imgstorageadmin``: put a NAS or a VM container back in order by hand.

When a node died in the middle of an operation, or a daemon lost track of
what the kernel holds, the operator needs to undo things one by one: log out
of a target, remove a device-mapper device, destroy a zvol, forget a mapping,
release a lock.  Run without arguments, the tool asks the questions of the
original roll's tool, in the same order, ``y`` being the default; with flags
it does the same actions without questions, for scripts.

The role of the node decides the questions:

* a VM container (``img-storage-vm``): unmap an iSCSI target, destroy a
  device-mapper device, remove a zvol;
* a NAS (``img-storage-nas``): unmap an iSCSI target, remove the zvol's
  mapping from the database, unbusy the zvol.

The role is ``--role`` when given; otherwise the daemon's database (``db`` in
the node's configuration) tells: ``nas_zvols`` makes a NAS, ``vm_zvols`` a VM
container.  The kernel is reached through the same drivers the daemons use,
so the tool works the same on real nodes and on the simulated kernel.

Nothing is copied back to the NAS: on a container in sync mode the local copy
may hold the only up-to-date data of a VM's disk, and the tool says so before
destroying anything.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import logging.handlers
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Set, TextIO, Tuple

from sqlalchemy import ColumnElement, Engine, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from imgstorage import config as config_mod
from imgstorage.config import Config
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import NodeDrivers, node_drivers
from imgstorage.drivers.base import DmStatus, SessionInfo, TargetInfo
from imgstorage.errors import ImgStorageError
from imgstorage.logformat import formatter
from imgstorage.nas import models as nas_models
from imgstorage.nas.states import SYNC_ACTIVE, State
from imgstorage.nas.store import NasStore
from imgstorage.vm import models as vm_models
from imgstorage.vm import states as vm_states
from imgstorage.vm.states import Event as VmEvent
from imgstorage.vm.store import VmStore
from imgstorage.vm.sync import dm_name, temp_name

PROG = "imgstorageadmin"
SEPARATOR = "=" * 36
TARGET_PREFIX = "iqn.2001-04.com."

# Exit statuses: what a script needs to tell apart.
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

GENERAL_WARNING = (
    "WARNING: nothing is copied back to the NAS: what you remove here is destroyed.\n"
    "A container in sync mode may hold the only up-to-date copy of a VM's disk; "
    "sync it back to the NAS first if you need it.")

# Container row states in which the local zvols hold writes the NAS may not have.
VM_COPY_STATES = {s.value for s in vm_states.HOLDS_COPY}
# Container row states in which the temp-write zvol holds writes not merged anywhere yet.
VM_TEMP_STATES = {s.value for s in vm_states.HOLDS_TEMP}


class AdminError(ImgStorageError):
    """A request the tool cannot carry out; the text is the one line the operator sees."""


class Stop(Exception):
    """The operator ended the session (end of input or Ctrl-C)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ console
class Console:
    """The one place that talks to the operator, so every answer is checked the same way.

    Input is read line by line from ``stdin`` (no line-editing library: it
    would write terminal escapes that scripts and tests do not expect).
    """

    def __init__(self, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
                 stderr: TextIO = sys.stderr) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        """One line on standard error, never a traceback."""
        self.stdout.flush()
        self.stderr.write(f"error: {' '.join(str(text).split())}\n")
        self.stderr.flush()

    def ask(self, prompt: str) -> str:
        self.stdout.write(prompt)
        self.stdout.flush()
        try:
            line = self.stdin.readline()
        except KeyboardInterrupt:
            raise Stop(INTERRUPTED, "interrupted") from None
        if line == "":
            raise Stop(OK, "end of input: stopped")
        return line.strip()

    def yes_no(self, question: str) -> bool:
        """``<question> [y]|n: ``: Enter is yes; anything but y/n asks again."""
        while True:
            answer = self.ask(f"{question} [y]|n: ").lower()
            if answer in ("", "y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.say("please enter y or n.")

    def choose(self, prompt: str, numbers: Sequence[int]) -> List[int]:
        """Numbers from ``numbers`` (several allowed); Enter chooses none, a bad one asks again."""
        valid = set(numbers)
        while True:
            words = self.ask(prompt).replace(",", " ").split()
            if not words:
                return []
            if all(w.isascii() and w.isdigit() and int(w) in valid for w in words):
                return list(dict.fromkeys(int(w) for w in words))
            self.say("please enter a number from the list")


# --------------------------------------------------------------- helpers
@dataclass
class Outcome:
    """What one run did: the failures decide the exit status."""
    failures: int = 0


def _operator() -> str:
    """Who ran the tool, for the log: the login behind sudo when there is one."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{user} via sudo from {sudo}" if sudo and sudo != user else user


def _portal_host(portal: Optional[str]) -> str:
    """``10.1.1.1:3260`` -> ``10.1.1.1``; ``[fe80::1]:3260`` -> ``fe80::1``."""
    if not portal:
        return ""
    host = portal.rsplit(",", 1)[0]
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _short(host: str) -> str:
    return host.split(".", 1)[0]


def _addresses(host: str) -> Set[str]:
    """The addresses ``host`` resolves to (empty when it does not)."""
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return set()


def _split_dataset(dataset: str) -> Tuple[str, str]:
    pool, sep, zvol = dataset.partition("/")
    if not sep or not pool or not zvol or "/" in zvol or "@" in dataset:
        raise AdminError(f"{dataset!r} is not a zvol: expected POOL/ZVOL")
    return pool, zvol


def audit_log(config: Config) -> logging.Logger:
    """The daemon's own log file, so a hand-made change shows where the daemon's history is.

    Lines are appended like the daemon's; when the file cannot be opened the
    changes are still made, only not recorded.
    """
    logger = logging.getLogger("imgstorage.admin")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if config.log_file:
        try:
            handler = logging.handlers.WatchedFileHandler(config.log_file)
        except OSError:
            return logger
        handler.setFormatter(formatter(config.log_format, config.name))
        logger.addHandler(handler)
    return logger


def daemon_running(role: str) -> Optional[int]:
    """The pid of this node's daemon when its pid file names a live process."""
    piddir = os.environ.get("IMGSTORAGE_PIDDIR", "/var/run")
    path = Path(piddir) / f"img-storage-{role}.pid"
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


# ------------------------------------------------------------ the roles
class RoleAdmin:
    """What both roles share: configuration, drivers, database, console."""

    role = ""

    def __init__(self, config: Config, drivers: NodeDrivers, engine: Engine,
                 console: Console) -> None:
        self.config = config
        self.drivers = drivers
        self.engine = engine
        self.console = console
        self.outcome = Outcome()
        self.log = audit_log(config)
        self.operator = _operator()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def attempt(self, what: str, action: Callable[[], Optional[str]]) -> bool:
        """Run one action; a failure is one line and the session goes on."""
        try:
            message = action()
        except (ImgStorageError, OSError, SQLAlchemyError) as exc:
            detail = exc.orig if isinstance(exc, SQLAlchemyError) and getattr(exc, "orig", None) \
                else exc
            self.console.error(f"{what}: {detail}")
            self.log.warning("imgstorageadmin (%s): %s failed: %s", self.operator, what, detail)
            self.outcome.failures += 1
            return False
        if message:
            self.console.say(message)
            self.log.info("imgstorageadmin (%s): %s", self.operator, message)
        return True

    def warn(self, text: str) -> None:
        self.console.say(text)

    def listed(self, what: str, query: Callable[..., Sequence[Any]], *args: Any) -> Optional[list]:
        """A listing for a question; None (after one error line) when it failed."""
        try:
            return list(query(*args))
        except (ImgStorageError, OSError, SQLAlchemyError) as exc:
            self.console.error(f"cannot list {what}: {exc}")
            self.outcome.failures += 1
            return None

    def act_on(self, items: Sequence[Any], warning: Callable[[Any], Optional[str]],
               what: Callable[[Any], str],
               action: Callable[[Any], Optional[str]]) -> List[bool]:
        """Warn about every chosen item first (an action may erase what a warning reads)."""
        warnings = [warning(item) for item in items]
        for text in warnings:
            if text:
                self.warn(text)
        return [self.attempt(what(item), lambda item=item: action(item)) for item in items]

    def interactive(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class VmAdmin(RoleAdmin):
    """A VM container: iSCSI sessions, device-mapper devices, local zvols."""

    role = "vm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned = False     # the general warning is shown once per session

    # -- what is there ------------------------------------------------------
    def rows(self) -> List[vm_models.VmZvol]:
        with self.session() as s:
            return list(s.scalars(select(vm_models.VmZvol).order_by(vm_models.VmZvol.zvol)))

    def sessions(self, nas: Optional[str] = None) -> List[SessionInfo]:
        """This host's iSCSI sessions, only those to ``nas`` when it is given."""
        found = self.drivers.initiator.sessions()
        if not nas:
            return found
        rows = self.rows()
        return [s for s in found if self._to_nas(s, nas, rows)]

    @staticmethod
    def _to_nas(session: SessionInfo, nas: str, rows: List[vm_models.VmZvol]) -> bool:
        """Whether ``session`` leads to ``nas``: by portal name, record, IQN or address."""
        host = _portal_host(session.portal)
        if host and (host == nas or _short(host) == _short(nas)):
            return True
        for row in rows:
            if row.iscsi_target == session.iqn and (
                    nas in (row.nas, row.nas_node) or _short(row.nas or "") == _short(nas)):
                return True
        if session.iqn.startswith(f"{TARGET_PREFIX}{_short(nas)}-"):
            return True
        if host and (host[0].isdigit() or ":" in host):   # a portal address: resolve the name
            return host in _addresses(nas)
        return False

    def dm_devices(self) -> List[DmStatus]:
        return self.drivers.dm.status()

    def datasets(self) -> List[str]:
        """Pools and their zvols, ordered as ``zfs list -r -o name`` prints them."""
        names: List[str] = []
        for pool in sorted(self.drivers.zfs.list_pools()):
            names.append(pool)
            names.extend(sorted(z.name for z in self.drivers.zfs.list_zvols(pool)))
        return names

    # -- warnings -----------------------------------------------------------
    def general_warning(self) -> None:
        if not self._warned:
            self.warn(GENERAL_WARNING)
            self._warned = True

    def session_warning(self, session: SessionInfo) -> Optional[str]:
        for row in self.rows():
            if row.iscsi_target == session.iqn:
                what = "the NAS disk under the snapshot device" if row.sync else "the disk"
                return (f"WARNING: {session.iqn} is {what} of {row.zvol} ({row.state} on "
                        f"{self.config.name}): a VM using it loses its disk.")
        if session.device and self._in_use(f"/dev/{session.device}"):
            return f"WARNING: /dev/{session.device} ({session.iqn}) is in use on this host."
        return None

    def dm_warning(self, name: str) -> Optional[str]:
        suffix = dm_name("")
        zvol = name[:-len(suffix)] if name.endswith(suffix) and name != suffix else None
        row = self._row(zvol) if zvol else None
        if row is not None:
            return (f"WARNING: {name} is the disk of {zvol}'s VM ({row.state} on "
                    f"{self.config.name}): the VM loses its disk.")
        if self._in_use(f"/dev/mapper/{name}"):
            return f"WARNING: {name} is in use on this host."
        return None

    def zvol_warning(self, dataset: str) -> Optional[str]:
        pool, zvol = _split_dataset(dataset)
        base = zvol[:-len(temp_name(""))] if zvol.endswith(temp_name("")) else None
        if base:
            row = self._row(base)
            if row is not None and row.remotepool == pool and row.state not in VM_TEMP_STATES:
                return None
            # Without a record (an earlier answer removed it) the name still tells:
            # a temp-write zvol only exists until its writes are merged.
            state = f" ({row.state})" if row is not None else ""
            return (f"WARNING: {dataset} holds writes of {base}'s VM that were never "
                    f"merged{state}: the NAS does not have them.")
        row = self._row(zvol)
        if row is not None and row.sync and row.remotepool == pool \
                and row.state in VM_COPY_STATES:
            return (f"WARNING: {dataset} is the local copy of {zvol} ({row.state}): the NAS has "
                    "only what its last pull brought home.")
        return None

    def _row(self, zvol: Optional[str]) -> Optional[vm_models.VmZvol]:
        if not zvol:
            return None
        with self.session() as s:
            return s.get(vm_models.VmZvol, zvol)

    def _in_use(self, device: str) -> bool:
        try:
            return self.drivers.blockdev.in_use(device)
        except ImgStorageError:
            return False

    # -- actions ------------------------------------------------------------
    def unmap_target(self, session: SessionInfo) -> str:
        """Log out, then forget the records of that target (they describe a gone disk)."""
        self.drivers.initiator.logout(session.iqn, session.portal)
        forgotten = self._forget(vm_models.VmZvol.iscsi_target == session.iqn)
        tail = f"; removed {', '.join(forgotten)} from the database" if forgotten else ""
        return f"logged out of {session.iqn}{tail}"

    def forget_target(self, iqn: str) -> str:
        forgotten = self._forget(vm_models.VmZvol.iscsi_target == iqn)
        if not forgotten:
            raise AdminError(f"no iSCSI session to {iqn} and no record of it on {self.config.name}")
        return f"no session to {iqn}; removed {', '.join(forgotten)} from the database"

    def destroy_dm(self, name: str) -> str:
        self.drivers.dm.remove(name)
        return f"removed device-mapper device {name}"

    def remove_zvol(self, dataset: str) -> str:
        """``zfs destroy -r``, then the record of that copy, by its bare zvol name.

        Records hold bare names; the original matched ``pool/zvol`` and so never
        removed anything (B24).
        """
        pool, zvol = _split_dataset(dataset)
        if self.drivers.zfs.get_zvol(pool, zvol) is None:
            raise AdminError(f"no zvol {dataset} on {self.config.name}")
        self.drivers.zfs.destroy(pool, zvol, recursive=True)
        forgotten = self._forget((vm_models.VmZvol.zvol == zvol)
                                 & (vm_models.VmZvol.remotepool == pool))
        tail = f"; removed {', '.join(forgotten)} from the database" if forgotten else ""
        return f"destroyed {dataset}{tail}"

    def _forget(self, condition: ColumnElement[bool]) -> List[str]:
        """Forget the container records matching ``condition``; their names."""
        with self.session() as s:
            names = list(s.scalars(select(vm_models.VmZvol.zvol).where(condition)))
        store = VmStore(self.engine)
        for name in names:
            store.transition(name, VmEvent.CLEANED)
        return names

    # -- the questions ------------------------------------------------------
    def interactive(self) -> None:
        c = self.console
        if c.yes_no("Unmap iSCSI target?"):
            nas = c.ask("From which NAS? (Don't forget .ibnet if used) ")
            found = self.listed("iSCSI sessions", self.sessions, nas or None)
            if found:
                for n, s in enumerate(found):
                    c.say(f"{n} {s.portal or '-'} {s.iqn}" + (f" {s.device}" if s.device else ""))
                chosen = c.choose("Which target would you like to delete? (number)",
                                  range(len(found)))
                self.act_on([found[n] for n in chosen], self.session_warning,
                            lambda s: f"logging out of {s.iqn}", self.unmap_target)
            elif found is not None:
                c.say("no iSCSI sessions" + (f" to {nas}" if nas else ""))
            c.say(SEPARATOR)
        if c.yes_no("Destroy lvm?"):
            found = self.listed("device-mapper devices", self.dm_devices)
            if found:
                self.general_warning()
                for n, st in enumerate(found):
                    c.say(f"{n} {st.name}: {st.start} {st.length} {st.target_type} {st.args}"
                          .rstrip())
                chosen = c.choose("Which lvm would you like to destroy? (number)",
                                  range(len(found)))
                self.act_on([found[n].name for n in chosen], self.dm_warning,
                            lambda name: f"removing {name}", self.destroy_dm)
            elif found is not None:
                c.say("no device-mapper devices")
            c.say(SEPARATOR)
        if c.yes_no("Remove zvol?"):
            found = self.listed("zvols", self.datasets)
            if found:
                self.general_warning()
                for n, name in enumerate(found):
                    c.say(f"{n} {name}")
                pools = {n for n, name in enumerate(found) if "/" not in name}
                while True:
                    chosen = c.choose("Which zvol would you like to delete? (number)",
                                      range(len(found)))
                    if not pools.intersection(chosen):
                        break
                    c.say("that is a pool: choose zvols only")
                self.act_on([found[n] for n in chosen], self.zvol_warning,
                            lambda name: f"destroying {name}", self.remove_zvol)
            elif found is not None:
                c.say("no zvols")
            c.say(SEPARATOR)

    # -- flags --------------------------------------------------------------
    def plan(self, args: argparse.Namespace) -> List["Step"]:
        steps: List[Step] = []
        for iqn in args.unmap_target:
            steps.append(self._unmap_step(iqn))
        for name in args.destroy_dm:
            steps.append(Step(f"removing {name}", lambda n=name: self._destroy_checked(n),
                              warning=self.dm_warning(name) or GENERAL_WARNING.splitlines()[0],
                              always_confirm=True))
        for dataset in args.remove_zvol:
            _split_dataset(dataset)
            steps.append(Step(f"destroying {dataset}", lambda d=dataset: self.remove_zvol(d),
                              warning=self.zvol_warning(dataset) or GENERAL_WARNING,
                              always_confirm=True))
        return steps

    def _unmap_step(self, iqn: str) -> "Step":
        matching = [s for s in self.drivers.initiator.sessions() if s.iqn == iqn]
        if not matching:
            return Step(f"unmapping {iqn}", lambda: self.forget_target(iqn))
        session = matching[0]
        return Step(f"logging out of {iqn}", lambda: self.unmap_target(session),
                    warning=self.session_warning(session))

    def _destroy_checked(self, name: str) -> str:
        if not self.drivers.dm.exists(name):
            raise AdminError(f"no device-mapper device {name} on {self.config.name}")
        return self.destroy_dm(name)


class NasAdmin(RoleAdmin):
    """A NAS: iSCSI targets, the mapping records, the busy locks."""

    role = "nas"

    def rows(self) -> List[nas_models.Zvol]:
        with self.session() as s:
            return list(s.scalars(select(nas_models.Zvol).order_by(nas_models.Zvol.zvol)))

    def locks(self) -> List[nas_models.Lock]:
        with self.session() as s:
            return list(s.scalars(select(nas_models.Lock).order_by(nas_models.Lock.since)))

    def targets(self) -> List[Tuple[int, TargetInfo]]:
        """Each target with the number shown for it: tgt's TID, else its place from 1."""
        found = self.drivers.target.list_targets()
        return [(t.tid if t.tid is not None else n, t) for n, t in enumerate(found, 1)]

    # -- warnings -----------------------------------------------------------
    def target_warning(self, iqn: str) -> Optional[str]:
        for row in self.rows():
            if row.iscsi_target == iqn and row.state != State.UNMAPPED.value:
                return (f"WARNING: {iqn} exports {row.zvol} to {row.remotehost or 'a container'} "
                        f"({row.state}): a VM using it loses its disk.")
        return None

    def lock_warning(self, lock: nas_models.Lock) -> Optional[str]:
        """A lock whose daemon process is alive may belong to work still running."""
        if lock.pid and lock.pid != os.getpid():
            try:
                os.kill(lock.pid, 0)
            except ProcessLookupError:
                return None
            except OSError:
                pass
            return (f"WARNING: the {lock.action} of {lock.zvol} may still be running "
                    f"(process {lock.pid} is alive): it can change the zvol after this.")
        return None

    def mapping_warning(self, row: nas_models.Zvol) -> Optional[str]:
        if row.state in {s.value for s in SYNC_ACTIVE}:
            return (f"WARNING: {row.zvol} is {row.state} with {row.remotehost}: the container "
                    "may hold the only up-to-date data of this disk, and after this the NAS "
                    "no longer knows about that copy. Sync it back first if you need it.")
        return None

    # -- actions ------------------------------------------------------------
    def unmap_target(self, iqn: str) -> str:
        self.drivers.target.delete_target(iqn)
        return f"deleted target {iqn}"

    def clear_mapping(self, zvol: str) -> str:
        """The zvol back to a clean ``unmapped``; its pool stays (the original lost it: B23)."""
        store = NasStore(self.engine)
        row = store.get(zvol)
        if row is None:
            raise AdminError(f"no zvol {zvol} in the database of {self.config.name}")
        before = row.state
        if row.state == State.DELETING.value:
            raise AdminError(f"{zvol} is being deleted; it has no mapping to remove")
        # a pull cut short would otherwise resume into a cycle that is over
        self.drivers.zfs.abort_resume(row.zpool, zvol)
        store.clean(zvol)
        return f"{zvol}: mapping removed ({before} -> unmapped)"

    def unbusy(self, zvol: str) -> str:
        with self.session() as s, s.begin():
            lock = s.get(nas_models.Lock, zvol)
            if lock is None:
                raise AdminError(f"{zvol} is not busy on {self.config.name}")
            action = lock.action
            s.delete(lock)
        return f"{zvol}: released the {action} lock"

    # -- the questions ------------------------------------------------------
    def interactive(self) -> None:
        c = self.console
        if c.yes_no("Unmap iSCSI target?"):
            found = self.listed("iSCSI targets", self.targets)
            if found:
                for number, t in found:
                    c.say(f"Target {number}: {t.iqn}")
                by_number = dict(found)
                chosen = c.choose("Which target number would you like to delete? (number) ",
                                  list(by_number))
                self.act_on([by_number[n].iqn for n in chosen], self.target_warning,
                            lambda iqn: f"deleting {iqn}", self.unmap_target)
            elif found is not None:
                c.say("no iSCSI targets")
        if c.yes_no("Remove zvol mapping to VM in DB?"):
            found = self.listed("zvols", self.rows)
            if found:
                for n, row in enumerate(found):
                    fields = [row.zvol, row.zpool, row.iscsi_target, row.remotehost]
                    c.say(f"{n} " + " ".join(f or "" for f in fields) + f" {row.state}")
                chosen = c.choose("Which zvol? (number) ", range(len(found)))
                done = self.act_on([found[n] for n in chosen], self.mapping_warning,
                                   lambda row: f"clearing {row.zvol}",
                                   lambda row: self.clear_mapping(row.zvol))
                if done and all(done):
                    c.say("Done")
            elif found is not None:
                c.say("no zvols in the database")
        if c.yes_no("Unbusy the zvol?"):
            found = self.listed("locks", self.locks)
            if found:
                for n, lock in enumerate(found):
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lock.since))
                    c.say(f"{n} {lock.zvol} {lock.owner or '-'} {lock.action} "
                          f"{lock.since:.2f} ({when})")
                chosen = c.choose("Which zvol? (number) ", range(len(found)))
                self.act_on([found[n] for n in chosen], self.lock_warning,
                            lambda lock: f"unbusying {lock.zvol}",
                            lambda lock: self.unbusy(lock.zvol))
            elif found is not None:
                c.say("no busy zvols")

    # -- flags --------------------------------------------------------------
    def plan(self, args: argparse.Namespace) -> List["Step"]:
        steps: List[Step] = []
        known = {t.iqn for _, t in self.targets()} if args.unmap_target else set()
        for iqn in args.unmap_target:
            if iqn not in known:
                steps.append(Step(f"deleting {iqn}", _fail(
                    f"no iSCSI target {iqn} on {self.config.name}")))
                continue
            steps.append(Step(f"deleting {iqn}", lambda i=iqn: self.unmap_target(i),
                              warning=self.target_warning(iqn)))
        for zvol in args.clear_mapping:
            with self.session() as s:
                row = s.get(nas_models.Zvol, zvol)
            steps.append(Step(f"clearing {zvol}", lambda z=zvol: self.clear_mapping(z),
                              warning=self.mapping_warning(row) if row is not None else None))
        for zvol in args.unbusy:
            with self.session() as s:
                lock = s.get(nas_models.Lock, zvol)
            steps.append(Step(f"unbusying {zvol}", lambda z=zvol: self.unbusy(z),
                              warning=self.lock_warning(lock) if lock is not None else None))
        return steps


def _fail(message: str) -> Callable[[], str]:
    def action() -> str:
        raise AdminError(message)
    return action


@dataclass
class Step:
    """One action asked for by a flag: what it is, and why it may need ``--yes``."""
    what: str
    action: Callable[[], Optional[str]]
    warning: Optional[str] = None
    always_confirm: bool = False

    @property
    def needs_yes(self) -> bool:
        return self.always_confirm or self.warning is not None


# ------------------------------------------------------------ the program
VM_FLAGS = ("destroy_dm", "remove_zvol")
NAS_FLAGS = ("clear_mapping", "unbusy")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Put a NAS or a VM container back in order by hand after a failure.\n\n"
            "Without action flags, asks in turn (Enter answers y):\n"
            "  on a VM container: Unmap iSCSI target? / Destroy lvm? / Remove zvol?\n"
            "  on a NAS:          Unmap iSCSI target? / Remove zvol mapping to VM in DB? /\n"
            "                     Unbusy the zvol?\n"
            "Each lists what is there, numbered; answer with one or more numbers\n"
            "(Enter: none).  End of input stops the session; Ctrl-C interrupts it.\n\n"
            "WARNING: nothing is copied back to the NAS.  On a container in sync mode the\n"
            "local copy may hold the only up-to-date data of a VM's disk: sync it back to\n"
            "the NAS first if you need it.  Stop the node's daemon before using this tool."),
        epilog=(
            "The role is --role, else the daemon's database decides (nas_zvols: NAS,\n"
            "vm_zvols: VM container).  Action flags may be repeated; they run in the\n"
            "order of the questions.  Actions that destroy data (--destroy-dm,\n"
            "--remove-zvol) and actions that would print a WARNING (a disk in use, a\n"
            "container copy the NAS may not have) are refused without --yes.\n"
            "Exit status: 0 done, 1 an action failed or was refused, 2 usage or\n"
            "configuration error, 130 interrupted."))
    p.add_argument("--config", metavar="PATH",
                   help="node configuration (default: $IMGSTORAGE_CONF or /etc/imgstorage.conf)")
    p.add_argument("--role", choices=("nas", "vm"),
                   help="this node's role (default: found from the daemon's database)")
    p.add_argument("--unmap-target", action="append", default=[], metavar="IQN",
                   help="VM: log out of the target and forget its records; "
                        "NAS: delete the target")
    p.add_argument("--destroy-dm", action="append", default=[], metavar="NAME",
                   help="VM: remove the device-mapper device NAME")
    p.add_argument("--remove-zvol", action="append", default=[], metavar="POOL/ZVOL",
                   help="VM: destroy the zvol (zfs destroy -r) and its record")
    p.add_argument("--clear-mapping", action="append", default=[], metavar="ZVOL",
                   help="NAS: set ZVOL unmapped, without target, host or remote pool")
    p.add_argument("--unbusy", action="append", default=[], metavar="ZVOL",
                   help="NAS: release the busy lock of ZVOL")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do actions that destroy data or print a WARNING")
    p.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    return p


def detect_role(db_path: str) -> str:
    """``nas`` or ``vm``, from the tables of the daemon's database."""
    if db_path != ":memory:" and not Path(db_path).is_file():
        raise AdminError(f"no database at {db_path}: cannot tell whether this node is a NAS or "
                         "a VM container; pass --role nas or --role vm")
    engine = make_engine(db_path)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    nas, vm = "nas_zvols" in tables, "vm_zvols" in tables
    if nas and not vm:
        return "nas"
    if vm and not nas:
        return "vm"
    which = "both NAS and VM tables" if nas else "neither NAS nor VM tables"
    raise AdminError(f"{db_path} has {which}: pass --role nas or --role vm")


def build(cfg: Config, role: str, console: Console) -> RoleAdmin:
    engine = make_engine(cfg.db)
    if role == "nas":
        create_schema(engine, nas_models.Base)   # what the daemon would create; changes nothing
        return NasAdmin(cfg, node_drivers(cfg, target_kind=cfg.target), engine, console)
    create_schema(engine, vm_models.Base)
    return VmAdmin(cfg, node_drivers(cfg), engine, console)


def run_flags(admin: RoleAdmin, args: argparse.Namespace) -> int:
    steps = admin.plan(args)
    for step in steps:
        if step.needs_yes and not args.yes:
            if step.warning:
                admin.console.stderr.write(step.warning + "\n")
            admin.console.error(f"{step.what}: not done; add --yes to do it anyway")
            admin.outcome.failures += 1
            continue
        if step.warning:
            admin.console.say(step.warning)
        admin.attempt(step.what, step.action)
    return FAILED if admin.outcome.failures else OK


def main(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> None:
    """Console-script entry point: exits with the status described in ``--help``."""
    sys.exit(run(argv, console))


def run(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> int:
    args = parser().parse_args(argv)
    console = console or Console()
    try:
        cfg = config_mod.load(args.config)
        cfg.require("name", "db")
        role = args.role or detect_role(cfg.db)
    except ImgStorageError as exc:
        console.stderr.write(f"{PROG}: {exc}\n")
        return USAGE
    wrong = NAS_FLAGS if role == "vm" else VM_FLAGS
    misplaced = [f"--{name.replace('_', '-')}" for name in wrong if getattr(args, name)]
    if misplaced:
        where = "a VM container" if role == "vm" else "a NAS"
        console.stderr.write(f"{PROG}: {', '.join(misplaced)} cannot be used on {where}\n")
        return USAGE
    flags = any(getattr(args, n) for n in ("unmap_target",) + VM_FLAGS + NAS_FLAGS)
    admin: Optional[RoleAdmin] = None
    try:
        admin = build(cfg, role, console)
        pid = daemon_running(role)
        if pid:
            console.stderr.write(f"note: img-storage-{role} is running (pid {pid}); stop it "
                                 f"first so it does not act on what you change\n")
        if flags:
            return run_flags(admin, args)
        admin.interactive()
    except Stop as stop:
        console.say()
        console.say(str(stop))
        return stop.status if stop.status != OK or not (admin and admin.outcome.failures) \
            else FAILED
    except KeyboardInterrupt:
        console.say()
        console.say("interrupted")
        return INTERRUPTED
    except (ImgStorageError, OSError, SQLAlchemyError) as exc:
        console.stderr.write(f"{PROG}: {exc}\n")
        return FAILED
    except Exception as exc:  # never a traceback for the operator unless asked for
        if args.debug:
            raise
        console.stderr.write(f"{PROG}: internal error: {type(exc).__name__}: {exc}\n")
        return FAILED
    return FAILED if admin is not None and admin.outcome.failures else OK


if __name__ == "__main__":
    main()
