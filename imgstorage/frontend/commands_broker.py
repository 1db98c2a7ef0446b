"""Broker identity commands: one broker user per node, and the node's configuration.

The broker is the trust boundary between nodes: it vouches for the user of
every message, and its permissions decide which queue a user may read.  So
every NAS and VM container gets its own user (named after the node) with the
narrowest permissions its role needs, made here with the administrator's
rights, and its configuration file carries that user and no other.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
from typing import Any, Dict, List, Optional

import click

from .. import messaging, naming
from ..config import split_broker_urls
from ..brokeradmin import BrokerAdmin, node_permissions, vhost_of, with_credentials
from ..errors import ImgStorageError, StateError, ValidationError
from .commands_base import Arg, Invocation, Param, command
from .registry import Host

_NODE_PARAM = Param("node", "NAME", "the RabbitMQ node rabbitmqctl talks to, e.g. "
                    "rabbit@frontend (default: the frontend configuration's broker_node, "
                    "else rabbitmqctl's own default, the local node)")


def broker_admin(inv: Invocation) -> BrokerAdmin:
    """rabbitmqctl for the vhost of the frontend's (the administrator's) broker_url."""
    node = inv.param("node") if "node" in inv.spec.keys else None
    node = node or inv.config.broker_node
    if node is not None and (not isinstance(node, str) or not node.strip()
                             or node.startswith("-") or any(c.isspace() for c in node)):
        raise ValidationError(f"invalid broker node {node!r}: expected a name such as "
                              "rabbit@frontend")
    return BrokerAdmin(vhost_of(inv.config.broker_urls[0]), node=node)


def _node_hosts(inv: Invocation, names: List[str]) -> List[Host]:
    """The named hosts (each must run a daemon), or every NAS and VM container."""
    reg = inv.registry
    if names:
        hosts = [reg.get_host(n) for n in names]
        for host in hosts:
            if reg.node_role(host) is None:
                raise ValidationError(f"host {host.name} is neither a NAS nor a VM container "
                                      "(appliance nas or vm-container, or attribute "
                                      "img_storage_nas / img_storage_vm true)")
        return hosts
    return [h for h in reg.hosts() if reg.node_role(h) is not None]


# ------------------------------------------------------------------- sync
@command(
    "sync host imgstorage", "Create or update the broker user and queue of nodes.",
    args=(Arg("HOST", "NAS servers or VM containers (default: every registered one)",
              required=False, many=True),),
    params=(_NODE_PARAM,),
    description="Run on the frontend, whose configuration holds the administrator's broker "
                "user. Each node gets a broker user named after it with a generated password "
                "(kept in the frontend registry), the narrowest permissions its role needs "
                "(configure nothing, write the exchange and replies, read its own queue "
                "only), and its queue (a quorum queue where the broker has them) bound to "
                "the exchange by its name. Prints what was done for each node: created, "
                "updated (and what) or unchanged; running it again changes nothing. Then "
                "give each node its file with 'rocks report host imgstorage HOST "
                "file=/etc/imgstorage.conf'.",
    example="rocks sync host imgstorage\n"
            "nas-0-0: created (user, quorum queue)\n"
            "vm-container-0-14: unchanged\n"
            "1 created, 0 updated, 1 unchanged\n"
            "rocks sync host imgstorage nas-0-0 node=rabbit@frontend")
def sync_host_imgstorage(inv: Invocation) -> None:
    hosts = _node_hosts(inv, inv.args["host"])
    admin = broker_admin(inv)
    exchange = inv.config.exchange
    admin_user = inv.config.broker_user
    for host in hosts:
        if host.name == admin_user:
            raise ValidationError(f"host {host.name} has the name of the administrator's broker "
                                  "user: rename one of them")
    users, permissions = admin.list_users(), admin.list_permissions()
    queues, bindings = admin.list_queues(), admin.bindings()
    counts = {"created": 0, "updated": 0, "unchanged": 0}
    for host in hosts:
        identity = inv.registry.broker_identity(host)
        if identity is None:
            identity = (host.name, secrets.token_urlsafe(24))
            inv.registry.set_broker_identity(host, *identity)
            inv.registry.commit()       # the password is never lost once the user exists
        user, password = identity
        changed = admin.ensure_user(user, password, node_permissions(host.name, exchange),
                                    users=users, permissions=permissions)
        kind = queues.get(host.name)
        if kind is None:
            kind = messaging.declare_node_queues(inv.config, [host.name])[host.name]
            changed.append(f"{kind} queue")
        elif (exchange, host.name, host.name) not in bindings:
            messaging.declare_node_queues(inv.config, [host.name])
            changed.append("binding")
        status = ("created" if "user" in changed else "updated") if changed else "unchanged"
        counts[status] += 1
        inv.echo(f"{host.name}: {status}" + (f" ({', '.join(changed)})" if changed else ""))
    inv.echo(", ".join(f"{n} {what}" for what, n in counts.items()))


# ----------------------------------------------------------------- report
@command(
    "report host imgstorage", "Print the configuration file of a node.",
    args=(Arg("HOST", "a registered NAS or VM container"),),
    params=(Param("network", "NAME", "storage network suffix (default: attribute "
                  "imgstorage-network, else IB_net)"),
            Param("pool", "POOL", "default zpool (default: attribute imgstorage-pool, else "
                  "vm_container_zpool)"),
            Param("workers", "N", "parallel operations (default: attribute "
                  "imgstorage-workers, else 8)"),
            Param("file", "PATH", "write the configuration to PATH (created mode 0600, "
                  "replaced whole) instead of printing it")),
    description="The configuration of HOST from the frontend's registry, so every node's "
                "file comes from one place. broker_url carries the node's own broker user "
                "and password (made by 'rocks sync host imgstorage', which must run first) "
                "in every URL of the frontend's broker_url (or of the attribute "
                "imgstorage-broker-url, when the nodes reach the brokers by other "
                "addresses). admin_users is the attribute imgstorage-admin-users (comma "
                "separated), else the frontend's broker user; a VM container's nas_users "
                "are every registered NAS. The output holds a password: prefer file=.",
    example="rocks report host imgstorage nas-0-0 file=/etc/imgstorage.conf")
def report_host_imgstorage(inv: Invocation) -> None:
    host = inv.host(inv.args["host"])
    reg = inv.registry
    role = reg.node_role(host)
    if role is None:
        raise ValidationError(f"host {host.name} is neither a NAS nor a VM container")

    def pick(param: str, *attrs: str) -> Optional[str]:
        value = inv.param(param)
        for attr in attrs:
            if value not in (None, ""):
                break
            value = reg.attr(host, attr)
        return value or None

    network = pick("network", "imgstorage-network", "IB_net")
    if network is not None:
        naming.host_name(network)
    pool = pick("pool", "imgstorage-pool", "vm_container_zpool")
    if pool is not None:
        naming.zpool_name(pool)
    workers = naming.non_negative_int("workers", pick("workers", "imgstorage-workers") or 8,
                                      minimum=1)
    path = inv.param("file")
    if path is not None and not path.strip():
        raise ValidationError("file= needs a path")
    identity = reg.broker_identity(host)
    if identity is None:
        raise StateError(f"host {host.name} has no broker user yet: run 'rocks sync host "
                         f"imgstorage {host.name}' first")
    base = reg.attr(host, "imgstorage-broker-url") or inv.config.broker_url
    conf: Dict[str, Any] = {
        "name": host.name,
        "broker_url": with_credentials(split_broker_urls(base), *identity),
        "exchange": inv.config.exchange, "backend": "real",
        "db": f"/var/lib/imgstorage/{role}.db",
        "log_file": f"/var/log/imgstorage/img-storage-{role}.log",
        "img_sync_workers": workers}
    if network:
        conf["network"] = network
    if pool:
        conf["default_pool"] = pool
    admins = reg.attr(host, "imgstorage-admin-users")
    conf["admin_users"] = ([u.strip() for u in admins.split(",") if u.strip()] if admins
                           else [inv.config.broker_user])
    if role == "vm":
        conf["nas_users"] = [h.name for h in reg.hosts() if reg.node_role(h) == "nas"]
    text = json.dumps(conf, indent=2) + "\n"
    if path is None:
        inv.echo(text.rstrip("\n"))
    else:
        write_private(path, text)


def write_private(path: str, text: str) -> None:
    """Write ``path`` whole, readable by its owner only from the first byte.

    A temporary file beside it is created 0600 (never widened, never
    chmod-ed later) and renamed over the target, so a reader sees the old
    file or the new one, and an old file with a wider mode is replaced.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ImgStorageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ImgStorageError(f"cannot write {path}: {exc.strerror}") from None


# ------------------------------------------------------------------ removal
def forget_broker_user(inv: Invocation, host: Host, identity: Optional[tuple]) -> None:
    """Delete a removed node's broker user and queue; a broker out of reach only warns.

    The host is removed from the registry either way: the operator asked
    for that, and what is left on the broker is said, with how to remove it.
    """
    user = identity[0] if identity else host.name
    try:
        broker_admin(inv).delete_user(user)
        messaging.delete_node_queue(inv.config, host.name)
    except ImgStorageError as exc:
        click.echo(f"warning - broker user {user} and queue {host.name} are left behind "
                   f"({' '.join(str(exc).split())}): remove them with 'rabbitmqctl "
                   f"delete_user {user}' and 'rabbitmqctl delete_queue -p "
                   f"{vhost_of(inv.config.broker_urls[0])} {host.name}'", err=True)
        sys.stderr.flush()
