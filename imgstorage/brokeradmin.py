"""The administrator's operations on broker users, through ``rabbitmqctl``.

Each node gets its own broker user so that the broker itself, not only the
daemons, keeps a node to what its role needs.  ``rabbitmqctl`` is used
rather than the management API because it is present wherever RabbitMQ is,
needs no plugin, and reads passwords from standard input (they never appear
in a process listing).  Every operation is idempotent: ``ensure_user`` looks
first and changes only what differs, so running it twice changes nothing.

The permissions a node user gets, found on RabbitMQ 3.10 (see README.rst,
"Broker identities and permissions"):

* configure ``^$``: it declares, binds and deletes nothing; queues and
  bindings are declared by the administrator (passive declares need no
  permission at all);
* write: the exchange (requests and notifications) and ``amq.default``
  (a reply to a direct reply-to name is published to the default exchange);
* read: its own queue only; consuming ``amq.rabbitmq.reply-to`` needs no
  permission.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import quote, unquote, urlparse, urlunparse

from .errors import CommandError, ImgStorageError
from .runner import Runner, default_runner

RABBITMQCTL = "rabbitmqctl"
DEFAULT_EXCHANGE = "amq.default"

# rabbitmqctl's exit statuses (sysexits) for "no such user" and "already exists".
_EX_DATAERR = 65          # authenticate_user: invalid credentials
_EX_NOUSER = 67           # delete_user: no such user
_EX_UNAVAILABLE = 69      # list_user_permissions: no such user (also: node down)
_EX_SOFTWARE = 70         # add_user: already exists


class BrokerAdminError(ImgStorageError):
    """rabbitmqctl refused an operation or the broker node cannot be reached."""

    code = "messaging"


@dataclass(frozen=True)
class Permissions:
    """A user's three permission regexes in one vhost."""

    configure: str
    write: str
    read: str


ADMIN_PERMISSIONS = Permissions(".*", ".*", ".*")


def escape(name: str) -> str:
    """A name as an exact-match piece of an Erlang (PCRE) regex.

    Every character that is not a letter, digit or underscore is escaped;
    PCRE accepts a backslash before any such character, so ``-`` and ``.``
    in node and exchange names never widen the match.
    """
    return re.sub(r"([^A-Za-z0-9_])", r"\\\1", name)


def node_permissions(node: str, exchange: str) -> Permissions:
    """The narrowest permissions a NAS or VM container needs (the same for both roles)."""
    return Permissions(configure="^$",
                       write=f"^({escape(exchange)}|{escape(DEFAULT_EXCHANGE)})$",
                       read=f"^{escape(node)}$")


def vhost_of(broker_url: str) -> str:
    """The vhost an ``amqp://`` URL names, as pika reads it ("/" when none)."""
    path = urlparse(broker_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def with_credentials(broker_urls: Sequence[str], user: str, password: str) -> str:
    """The comma-separated broker list with ``user:password`` put in every URL.

    Host, port, vhost and query stay as they were; both parts are URL-quoted,
    so any generated password survives pika's parsing.
    """
    out = []
    for url in broker_urls:
        parts = urlparse(url)
        host = parts.hostname or ""
        if ":" in host:                   # an IPv6 literal keeps its brackets
            host = f"[{host}]"
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        out.append(urlunparse(parts._replace(netloc=netloc)))
    return ",".join(out)


class BrokerAdmin:
    """rabbitmqctl for one vhost, on the local broker node or the one ``node`` names."""

    def __init__(self, vhost: str, node: Optional[str] = None,
                 runner: Optional[Runner] = None, timeout: float = 60.0):
        self.vhost = vhost
        self.node = node
        self.runner = runner or default_runner
        self.timeout = timeout

    # -- the one place rabbitmqctl runs ------------------------------------
    def _argv(self, *args: str) -> List[str]:
        argv = [RABBITMQCTL]
        if self.node:
            argv += ["-n", self.node]
        return argv + ["-q", *args]

    def _run(self, *args: str, password: Optional[str] = None, ok: Sequence[int] = (0,)):
        try:
            result = self.runner.run(self._argv(*args), input=password, timeout=self.timeout,
                                     check=False, redact=[password] if password else ())
        except CommandError as exc:       # not installed, or timed out
            raise BrokerAdminError(_one_line(exc)) from None
        if result.returncode not in ok:
            raise BrokerAdminError(_one_line(CommandError(
                self._argv(*args), result.returncode, result.stderr, result.stdout)))
        return result

    def _json(self, *args: str, ok: Sequence[int] = (0,)):
        result = self._run(*args, "--formatter", "json", ok=ok)
        if result.returncode != 0:
            return None
        try:
            return json.loads(result.stdout or "[]")
        except json.JSONDecodeError:
            raise BrokerAdminError(f"rabbitmqctl {args[0]} printed something that is not "
                                   f"JSON") from None

    # -- reading -------------------------------------------------------------
    def list_users(self) -> Dict[str, List[str]]:
        """Every broker user with its tags."""
        return {row["user"]: list(row.get("tags") or []) for row in self._json("list_users")}

    def list_permissions(self) -> Dict[str, Permissions]:
        """Every user's permissions in this vhost."""
        return {row["user"]: _permissions(row)
                for row in self._json("list_permissions", "-p", self.vhost)}

    def user_permissions(self, user: str) -> Optional[Permissions]:
        """``user``'s permissions in this vhost; None when it has none or does not exist."""
        rows = self._json("list_user_permissions", user, ok=(0, _EX_UNAVAILABLE))
        if rows is None:
            # 69 is also "node down": tell the two apart by asking for the users.
            if user in self.list_users():
                raise BrokerAdminError(f"rabbitmqctl cannot list the permissions of {user}")
            return None
        for row in rows:
            if row.get("vhost") == self.vhost:
                return _permissions(row)
        return None

    def authenticate(self, user: str, password: str) -> bool:
        """Whether the broker accepts ``password`` for ``user`` (False for a missing user)."""
        result = self._run("authenticate_user", user, password=password, ok=(0, _EX_DATAERR))
        return result.returncode == 0

    def list_queues(self) -> Dict[str, str]:
        """Every queue of this vhost with its type (quorum, classic, stream)."""
        return {row["name"]: row.get("type") or "classic"
                for row in self._json("list_queues", "-p", self.vhost, "name", "type")}

    def bindings(self) -> Set[Tuple[str, str, str]]:
        """Every ``(exchange, queue, routing key)`` binding of a queue in this vhost."""
        rows = self._json("list_bindings", "-p", self.vhost, "source_name", "destination_name",
                          "destination_kind", "routing_key")
        return {(r.get("source_name"), r.get("destination_name"), r.get("routing_key"))
                for r in rows if r.get("destination_kind") == "queue"}

    # -- changing ------------------------------------------------------------
    def add_user(self, user: str, password: str) -> None:
        self._run("add_user", user, password=password)

    def change_password(self, user: str, password: str) -> None:
        self._run("change_password", user, password=password)

    def set_permissions(self, user: str, perms: Permissions) -> None:
        self._run("set_permissions", "-p", self.vhost, user, perms.configure, perms.write,
                  perms.read)

    def clear_tags(self, user: str) -> None:
        self._run("set_user_tags", user)

    def delete_user(self, user: str) -> bool:
        """Delete ``user``; False when there was none."""
        return self._run("delete_user", user, ok=(0, _EX_NOUSER)).returncode == 0

    def ensure_user(self, user: str, password: str, perms: Permissions,
                    users: Optional[Dict[str, List[str]]] = None,
                    permissions: Optional[Dict[str, Permissions]] = None) -> List[str]:
        """Make ``user`` exist with ``password``, ``perms`` and no tags.

        ``users`` and ``permissions`` are :meth:`list_users` and
        :meth:`list_permissions` when the caller already read them for many
        users (each rabbitmqctl call starts a virtual machine: seconds on a
        busy frontend).  Returns what had to change (``["user"]`` for a new
        one, else any of "password", "permissions", "tags"); an empty list
        means nothing did.
        """
        if users is None:
            users = self.list_users()
        if user not in users:
            self.add_user(user, password)
            self.set_permissions(user, perms)
            return ["user"]
        changed = []
        if not self.authenticate(user, password):
            self.change_password(user, password)
            changed.append("password")
        current = (permissions.get(user) if permissions is not None
                   else self.user_permissions(user))
        if current != perms:
            self.set_permissions(user, perms)
            changed.append("permissions")
        if users[user]:
            self.clear_tags(user)
            changed.append("tags")
        return changed


def _permissions(row: dict) -> Permissions:
    return Permissions(row.get("configure", ""), row.get("write", ""), row.get("read", ""))


def _one_line(exc: CommandError) -> str:
    """rabbitmqctl's own reason, without its multi-line diagnostics."""
    cmd = " ".join(exc.argv)
    if exc.timed_out:
        return f"`{cmd}` timed out"
    lines = [ln.strip() for ln in (exc.stderr or exc.stdout or "").splitlines()
             if ln.strip() and ln.strip() != "Error:"]
    reason = lines[0] if lines else f"exit {exc.returncode}"
    return f"`{cmd}` failed: {reason}"
