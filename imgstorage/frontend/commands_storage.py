"""Storage commands: talk to the img-storage daemons about zvols directly.

These are the operator's manual controls (map or unmap a zvol by hand, see
what a NAS or a container holds, tune sync speeds).  They change nothing in
the registry; it is only read (through Invocation.lookup, which needs no
SQLAlchemy) to check the hosts and the defaults (``img_sync``,
``vm_container_zpool``) that a VM start would use too.

Hosts must be registered: a typing mistake then fails with ``unknown host``
before any message is sent, instead of reaching whatever daemon happens to
listen under that name.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from .. import naming, protocol
from ..errors import ImgStorageError, ValidationError
from ..nas.client import NasClient
from ..nas.states import SYNC_ACTIVE
from ..rpcapi import Asking
from ..vm.client import VmClient
from .commands_base import Arg, Invocation, Param, bool_param, command, none_or
from . import storagemap
from .tables import Table, elapsed, synced

_NAS = Arg("NAS", "a registered NAS (appliance nas, or attribute img_storage_nas=true)")


def _malformed(node: str, what: str) -> ImgStorageError:
    return ImgStorageError(f"{node} sent a malformed {what}")


def nas_client(inv: Invocation, nas: str) -> NasClient:
    """The NAS's API over this command's connection and timeout."""
    return NasClient(Asking(inv.request), nas)


def vm_client(inv: Invocation, host: str) -> VmClient:
    """The container's API over this command's connection and timeout."""
    return VmClient(Asking(inv.request), host)


# -------------------------------------------------------------- mappings
@command(
    "add host storagemap", "Map a NAS zvol to a host by hand.",
    args=(_NAS, Arg("ZPOOL", "the NAS zpool"), Arg("VOLUME", "the zvol name"),
          Arg("REMOTEHOST", "the registered host that gets the disk"),
          Arg("SIZE", "size in GB, used when the zvol is created")),
    params=(Param("img_sync", "BOOL", "copy the zvol to REMOTEHOST (default: REMOTEHOST's "
                  "img_sync attribute, else false)"),
            Param("remotepool", "POOL", "the zpool on REMOTEHOST for the copy (default: its "
                  "vm_container_zpool attribute); required when img_sync is true"),
            Param("img_keep_local", "BOOL", "REMOTEHOST keeps its copy after the unmap, as the "
                  "base of the next sync map there (default: REMOTEHOST's img_keep_local "
                  "attribute, else false); only with img_sync")),
    description="The zvol is created when missing. Prints the block device that "
                "REMOTEHOST now has.",
    example="rocks add host storagemap nas-0-0 tank vol1 compute-0-3 10\n"
            "mapping  nas-0-0 : tank / vol1  on  compute-0-3\n"
            "/dev/mapper/vol1-snap")
def add_host_storagemap(inv: Invocation) -> None:
    zpool = naming.zpool_name(inv.args["zpool"])
    zvol = naming.zvol_name(inv.args["volume"])
    size = naming.size_gb(inv.args["size"])
    nas = inv.known_nas(inv.args["nas"])
    remote = inv.lookup.get_host(inv.args["remotehost"])
    sync = bool_param(inv, "img_sync")
    if sync is None:
        sync = inv.lookup.attr_bool(remote, "img_sync")
    keep_local = bool_param(inv, "img_keep_local")
    if keep_local and not sync:
        raise ValidationError("img_keep_local keeps a synced copy: it needs img_sync=true")
    if keep_local is None:
        keep_local = sync and inv.lookup.attr_bool(remote, "img_keep_local")
    remotepool = inv.param("remotepool")
    if remotepool is not None:
        remotepool = naming.zpool_name(remotepool)
    elif sync:
        remotepool = inv.lookup.attr(remote, "vm_container_zpool") or None
        if remotepool is None:
            raise ValidationError("img_sync is true but no remotepool was given")
        naming.zpool_name(remotepool)
    inv.echo(f"mapping  {nas} : {zpool} / {zvol}  on  {remote.name}")
    bdev = nas_client(inv, nas).map_zvol(zvol, zpool=zpool, remotehost=remote.name,
                                         remotepool=remotepool, size=size, sync=sync,
                                         keep_local=keep_local)
    if bdev is None:
        raise _malformed(nas, "reply (no block device)")
    inv.echo(bdev)


@command(
    "remove host storagemap", "Unmap a zvol from the host it is mapped to.",
    args=(_NAS, Arg("VOLUME", "the zvol name")),
    description="A synced zvol is copied back to the NAS in the background "
                "(STATE NAS<-VM in 'rocks list host storagemap'); with img_keep_local the "
                "container keeps its copy afterwards.",
    example="rocks remove host storagemap nas-0-0 vol1\n"
            "unmapping   nas-0-0 : vol1\n"
            "Success")
def remove_host_storagemap(inv: Invocation) -> None:
    zvol = naming.zvol_name(inv.args["volume"])
    nas = inv.known_nas(inv.args["nas"])
    inv.echo(f"unmapping   {nas} : {zvol}")
    nas_client(inv, nas).unmap_zvol(zvol)
    inv.echo("Success")


@command(
    "remove host storageimg", "Destroy an unmapped zvol on a NAS.",
    args=(_NAS, Arg("ZPOOL", "the NAS zpool"), Arg("VOLUME", "the zvol name")),
    description="The zvol and its snapshots are destroyed: the data is lost. A mapped zvol "
                "is refused by the NAS. Copies of it that containers kept (img_keep_local) "
                "are destroyed too.",
    example="rocks remove host storageimg nas-0-0 tank vol1\n"
            "removing   nas-0-0 : tank / vol1\n"
            "Success")
def remove_host_storageimg(inv: Invocation) -> None:
    zpool = naming.zpool_name(inv.args["zpool"])
    zvol = naming.zvol_name(inv.args["volume"])
    nas = inv.known_nas(inv.args["nas"])
    inv.echo(f"removing   {nas} : {zpool} / {zvol}")
    nas_client(inv, nas).del_zvol(zvol, zpool=zpool)
    inv.echo("Success")


@command(
    "list host storagemap", "List the zvols of NAS servers and their state.",
    args=(Arg("NAS", "registered NAS servers", many=True),),
    params=(Param("watch", "SECONDS", "show the listing again every SECONDS (at least 1) "
                  "until Ctrl-C: redrawn in place with a progress bar per running transfer "
                  "on a terminal, one table after a time line per interval otherwise"),
            Param("count", "N", "with watch: end by itself after N tables")),
    description="STATE is unmapped, mapped, NAS->VM (copy to the host under way), NAS<-VM (final "
                "copy back after unmap) or NAS<-VM sched (periodic copy back); TIME is how "
                "long the running copy has taken, PROGRESS its share of the estimated "
                "stream size and RATE its current speed. SAFE, for a zvol that runs from a "
                "container's copy, is how long ago the NAS last had every write of it (the "
                "map, then each pull's snapshot): the writes of that span are what a "
                "container dying now would lose; the JSON output carries recovery_point "
                "(epoch). NEXTSYNC is the next "
                "periodic pull. ERROR is the last error of a zvol (with how many times in a "
                "row it failed) and NEXT-RETRY the time left until the NAS tries again; the "
                "JSON output carries the whole error, failures and retry_at (epoch).",
    example="rocks list host storagemap nas-0-0\n"
            "rocks list host storagemap nas-0-0 watch=5")
def list_host_storagemap(inv: Invocation) -> Optional[int]:
    seconds, count = _watch_params(inv)        # a bad value fails before anything is asked
    nases = _nases(inv, inv.args["nas"])
    if seconds is None:
        answers = [(nas, zvol_list(inv, nas)) for nas in nases]
        inv.table(storagemap.build(answers, time.time()).table)
        return None
    from . import watch
    if "timeout" not in inv.params:
        inv.default_timeout = watch.refresh_timeout(seconds, inv.config.timeout)

    def fetch() -> "watch.Frame":
        answers, errors = [], []
        for nas in nases:
            try:
                answers.append((nas, zvol_list(inv, nas)))
            except ImgStorageError as exc:
                errors.append(str(exc))
        if errors and not answers:
            return watch.Frame(None, errors)     # no table, rather than an empty one
        return watch.Frame(storagemap.build(answers, time.time()), errors)

    title = "rocks list host storagemap " + " ".join(nases)
    return watch.watch(fetch, seconds, count, inv.output, title)


def _watch_params(inv: Invocation) -> Tuple[Optional[float], Optional[int]]:
    """``watch=`` and ``count=``, checked; (None, None) for a listing shown once."""
    seconds = count = None
    if inv.param("watch") is None and inv.param("count") is None:
        return seconds, count
    from . import watch
    if inv.param("watch") is not None:
        seconds = watch.parse_seconds(inv.param("watch"))
        if inv.output.format == "json":
            raise ValidationError("watch= shows tables: it cannot be used with "
                                  "output-format=json")
    if inv.param("count") is not None:
        if seconds is None:
            raise ValidationError("count= ends a watch: it needs watch=SECONDS")
        count = watch.parse_count(inv.param("count"))
    return seconds, count


def zvol_list(inv: Invocation, nas: str) -> List[Dict[str, Any]]:
    """Every zvol of ``nas``, page after page when the NAS sends its listing in pages."""
    return nas_client(inv, nas).list_zvols()


@command(
    "list host storagedev", "List the img-storage devices of VM containers.",
    args=(Arg("HOST", "registered hosts running img-storage-vm", many=True),),
    description="STATUS is snapshot (booted on the remote disk while the copy runs), "
                "snapshot-merge (merging into the local copy), linear (local), iscsi "
                "(direct) or kept (a copy kept after its VM stopped, img_keep_local: the "
                "base of the next start here; TIME is its age); SYNCED shows the blocks "
                "left to merge, the merge is done when the first number equals the last; the "
                "percentage is how much of the merge is done.",
    example="rocks list host storagedev compute-0-3")
def list_host_storagedev(inv: Invocation) -> None:
    table = Table(["HOST", "ZVOL", "LVM", "STATUS", "SIZE (GB)", "BLOCK DEV", "IS STARTED",
                   "SYNCED", "TIME"])
    for host in [inv.known_host(name) for name in inv.args["host"]]:
        body = vm_client(inv, host).list_dev()
        now = time.time()
        for key, dev in body.items():
            table.add(host, dev.get("zvol") or key, dev.get("device"), dev.get("status"),
                      dev.get("size"), dev.get("bdev"), 1 if dev.get("started") else None,
                      synced(dev.get("synced"), dev.get("synced_percent")),
                      elapsed(dev.get("time"), now))
    inv.table(table)


def _nases(inv: Invocation, names: List[str]) -> List[str]:
    """Check every NAS before the first message, so nothing is half done."""
    return [inv.known_nas(n) for n in names]


# ------------------------------------------------------- zvol attributes
@command(
    "set host zvolattr", "Set a sync attribute of one zvol on a NAS.",
    args=(_NAS, Arg("ZVOL", "the zvol name"),
          Arg("ATTR", "frequency (seconds between copies back), nextsync (epoch of the next "
              "one), uploadspeed or downloadspeed (bytes/s limits)", keyword="attr"),
          Arg("VALUE", "a whole number, or none to unset", keyword="value")),
    example="rocks set host zvolattr nas-0-0 compute-0-14-0-vol frequency 600\n"
            "rocks set host zvolattr nas-0-0 compute-0-14-0-vol uploadspeed none")
def set_host_zvolattr(inv: Invocation) -> None:
    zvol = naming.zvol_name(inv.args["zvol"])
    attr = inv.args["attr"].strip().lower()
    if attr not in protocol.ZVOL_ATTRS:
        raise ValidationError(f"unknown zvol attribute {inv.args['attr']!r}: use one of "
                              + ", ".join(protocol.ZVOL_ATTRS))
    text = none_or(inv.args["value"])
    value: Optional[int] = None
    if text is not None:
        value = naming.non_negative_int(attr, text, allow_none=False,
                                        minimum=1 if attr == "frequency" else 0)
    nas = inv.known_nas(inv.args["nas"])
    nas_client(inv, nas).set_zvol_attrs(zvol, {attr: value})


@command(
    "list host zvolattr", "List the sync attributes of a zvol on a NAS.",
    args=(_NAS, Arg("ZVOL", "the zvol name")),
    description="NEXTSYNC is an epoch; empty values fall back to the NAS's own attributes.",
    example="rocks list host zvolattr nas-0-0 compute-0-14-0-vol")
def list_host_zvolattr(inv: Invocation) -> None:
    zvol = naming.zvol_name(inv.args["zvol"])
    nas = inv.known_nas(inv.args["nas"])
    body = nas_client(inv, nas).get_zvol_attrs(zvol)
    table = Table(["NAS", "ZVOL", "FREQUENCY", "NEXTSYNC", "UPLOADSPEED", "DOWNLOADSPEED"])
    table.add(nas, body.get("zvol") or zvol, body.get("frequency"), body.get("nextsync"),
              body.get("uploadspeed"), body.get("downloadspeed"))
    inv.table(table)


# -------------------------------------------------------- NAS attributes
@command(
    "set host storageattr", "Set an attribute of a NAS daemon.",
    args=(_NAS, Arg("ATTR", "the attribute name", keyword="attr"),
          Arg("VALUE", "its value, or none to store an empty value", keyword="value")),
    example="rocks set host storageattr nas-0-0 frequency 600")
def set_host_storageattr(inv: Invocation) -> None:
    attr = naming.attr_name(inv.args["attr"])
    value = naming.attr_value(none_or(inv.args["value"]))
    nas = inv.known_nas(inv.args["nas"])
    nas_client(inv, nas).set_attrs({attr: value})


@command(
    "remove host storageattr", "Remove an attribute of a NAS daemon.",
    args=(_NAS, Arg("ATTR", "the attribute name", keyword="attr")),
    example="rocks remove host storageattr nas-0-0 uploadspeed")
def remove_host_storageattr(inv: Invocation) -> None:
    attr = naming.attr_name(inv.args["attr"])
    nas = inv.known_nas(inv.args["nas"])
    nas_client(inv, nas).del_attrs([attr])


@command(
    "list host storageattr", "List the attributes of NAS daemons.",
    args=(Arg("NAS", "registered NAS servers", many=True),),
    example="rocks list host storageattr nas-0-0")
def list_host_storageattr(inv: Invocation) -> None:
    table = Table(["NAS", "ATTR", "VALUE"])
    for nas in _nases(inv, inv.args["nas"]):
        attrs = nas_client(inv, nas).get_attrs()
        for name in sorted(attrs):
            table.add(nas, name, attrs[name])
    inv.table(table)



# ----------------------------------------------------------------- repair
SYNC_STATES = {"NAS->VM", "NAS<-VM", "NAS<-VM sched"}


@command(
    "clean host storagemap", "Forget a broken mapping on both sides.",
    args=(_NAS, Arg("VOLUME", "the zvol whose mapping is broken")),
    params=(Param("nodetype", "nas|vmc", "clean only the NAS side or only the container side"),
            Param("force", "BOOL", "also when the container may hold writes the NAS does "
                  "not have yet (they are lost)"),
            Param("host", "HOST", "the container to clean (default: the one the NAS has the "
                  "zvol mapped to); for a container the NAS no longer knows about")),
    description="For a mapping that a normal unmap cannot undo (a container that died, "
                "a lock left behind). The container tears down its iSCSI session, "
                "device-mapper device and local copies of the zvol; the NAS removes the "
                "target, releases the zvol's lock and marks it unmapped. WARNING: in sync "
                "mode the container's copy may hold the only up-to-date data; without "
                "force=true the command refuses while a copy is not synced home.",
    example="rocks clean host storagemap nas-0-0 vol1")
def clean_host_storagemap(inv: Invocation) -> None:
    nas = inv.known_nas(inv.args["nas"])
    zvol = naming.zvol_name(inv.args["volume"])
    nodetype = inv.param("nodetype")
    if nodetype not in (None, "nas", "vmc"):
        raise ValidationError(f"nodetype can be only nas or vmc ({nodetype})")
    force = bool(bool_param(inv, "force"))
    rows = [r for r in zvol_list(inv, nas) if r.get("zvol") == zvol]
    if not rows:
        raise ImgStorageError(f"Unable to find volume {zvol} on nas {nas}")
    row = rows[0]
    if row.get("state") in SYNC_STATES | {"mapped"} and row.get("lifecycle") in {
            s.value for s in SYNC_ACTIVE} and not force:
        raise ImgStorageError(f"Volume {zvol} is {row.get('state')} ({row.get('lifecycle')}): "
                              f"{row.get('remotehost')} may hold writes the NAS does not have; "
                              "unmap it normally, or use force=true to give them up")
    host = row.get("remotehost")
    if inv.param("host") is not None:
        host = inv.known_host(inv.param("host"))
    if nodetype in (None, "vmc"):
        if host:
            inv.echo(f"cleaning {host}")
            out = vm_client(inv, host).clean_zvol(zvol, target=row.get("iscsi_target"))
            for line in out.get("done") or []:
                inv.echo(f"  {line}")
        elif nodetype == "vmc":
            raise ImgStorageError(f"Volume {zvol} is not mapped to any host: name the "
                                  "container with host=HOST")
    if nodetype in (None, "nas"):
        inv.echo(f"cleaning {nas}")
        nas_client(inv, nas).clean_zvol(zvol, force=force)
    inv.echo("Success")

