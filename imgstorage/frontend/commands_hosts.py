"""Registry commands: hosts and the attributes that steer img-storage.

These replace what the Rocks database and its ``rocks add/set/list host``
commands provided to the original roll: the frontend has to know the nodes,
their appliances and attributes before it can place or start any VM disk.
"""
from __future__ import annotations

from .commands_base import Arg, Invocation, Param, bool_param, command, int_param
from .commands_broker import forget_broker_user
from .commands_vm import refuse_if_running
from .registry import APPLIANCES
from .tables import Table

_APPLIANCES = "|".join(APPLIANCES)


# ------------------------------------------------------------------- hosts
@command(
    "add host", "Register a physical host.",
    args=(Arg("NAME", "the host name, e.g. nas-0-0"),),
    params=(Param("appliance", _APPLIANCES, "what the host is", required=True),
            Param("ip", "ADDR", "its IP address (informational)"),
            Param("rack", "N", "its rack; default: from a name ending in -RACK-RANK"),
            Param("rank", "N", "its rank; default: from a name ending in -RACK-RANK")),
    description="A NAS appliance runs img-storage-nas and a vm-container runs img-storage-vm "
                "(see the img_storage_nas / img_storage_vm attributes for other hosts). "
                "VMs are added with 'rocks add host vm', not with this command.",
    example="rocks add host nas-0-0 appliance=nas\n"
            "rocks add host vm-container-0-14 appliance=vm-container ip=10.1.255.240")
def add_host(inv: Invocation) -> None:
    inv.registry.add_host(inv.args["name"], inv.param("appliance"), ip=inv.param("ip"),
                          rack=int_param(inv, "rack", None), rank=int_param(inv, "rank", None))


@command(
    "remove host", "Forget hosts.",
    args=(Arg("HOST", "the hosts to remove", many=True),),
    params=(Param("force", "BOOL", "remove a VM even when its container cannot be asked "
                  "whether the VM is running"),),
    description="A VM must be stopped first, and a container must have no VMs left. A VM's "
                "disk stays on its NAS: remove it there with 'rocks remove host storageimg'. "
                "A NAS that still holds VM disks is refused. A NAS or VM container loses its "
                "broker user and queue too (a broker out of reach leaves them, with a "
                "warning saying how to remove them by hand).",
    example="rocks remove host compute-0-14-0")
def remove_host(inv: Invocation) -> None:
    force = bool_param(inv, "force", False)
    hosts = [inv.host(name) for name in inv.args["host"]]
    for host in hosts:
        if host.is_virtual:
            refuse_if_running(inv, host, force=force)
    nodes = [(h, inv.registry.broker_identity(h)) for h in hosts
             if inv.registry.node_role(h) is not None]
    for host in hosts:
        inv.registry.remove_host(host)
    for host, identity in nodes:
        if identity is not None:
            forget_broker_user(inv, host, identity)


@command(
    "list host", "List the registered hosts.",
    args=(Arg("HOST", "only these hosts (default: all)", required=False, many=True),),
    example="rocks list host")
def list_host(inv: Invocation) -> None:
    table = Table(["HOST", "APPLIANCE", "IP", "RACK", "RANK", "CONTAINER"], trim_owner=False)
    for h in inv.registry.hosts(inv.args["host"]):
        table.add(h.name, h.appliance, h.ip, h.rack, h.rank,
                  h.container.name if h.container else None)
    inv.table(table)


# -------------------------------------------------------------- attributes
_ATTR_ARGS = (Arg("ATTR", "the attribute name", keyword="attr"),
              Arg("VALUE", "its value", keyword="value"))
_VALUE_NOTE = ("A value holding '=' or starting with a word followed by '=' must be given as "
               "value=...")


def _set_host_attr(inv: Invocation) -> None:
    inv.registry.set_attr(inv.args["attr"], inv.args["value"], host=inv.host(inv.args["host"]))


for _verb in ("set", "add"):
    command(
        f"{_verb} host attr", "Set an attribute of one host.",
        args=(Arg("HOST", "the host"),) + _ATTR_ARGS,
        description=("A host value overrides appliance and global values. 'add host attr' and "
                     "'set host attr' are the same command. " + _VALUE_NOTE),
        example="rocks set host attr compute-0-3 img_sync true\n"
                "rocks set host attr nas-0-0 img_zpools value=\"tank1,tank2\"")(_set_host_attr)


@command(
    "remove host attr", "Remove an attribute set on a host itself.",
    args=(Arg("HOST", "the host"), Arg("ATTR", "the attribute name", keyword="attr")),
    example="rocks remove host attr compute-0-3 img_sync")
def remove_host_attr(inv: Invocation) -> None:
    inv.registry.remove_attr(inv.args["attr"], host=inv.host(inv.args["host"]))


@command(
    "list host attr", "List host attributes and where each comes from.",
    args=(Arg("HOST", "only these hosts (default: all)", required=False, many=True),),
    description="SOURCE tells where the value was set: H the host itself, A its appliance, "
                "G the global attributes (a host value wins over an appliance value, which "
                "wins over a global one).",
    example="rocks list host attr vm-container-0-14")
def list_host_attr(inv: Invocation) -> None:
    table = Table(["HOST", "ATTR", "VALUE", "SOURCE"])
    for host in inv.registry.hosts(inv.args["host"]):
        for a in inv.registry.resolved_attrs(host):
            table.add(host.name, a.name, a.value, a.source)
    inv.table(table)


def _set_appliance_attr(inv: Invocation) -> None:
    inv.registry.set_attr(inv.args["attr"], inv.args["value"], appliance=inv.args["appliance"])


for _verb in ("add", "set"):
    command(
        f"{_verb} appliance attr", "Set an attribute of an appliance.",
        args=(Arg("APPLIANCE", f"one of {', '.join(APPLIANCES)}"),) + _ATTR_ARGS,
        description=("'add appliance attr' and 'set appliance attr' are the same command. "
                     + _VALUE_NOTE),
        example="rocks add appliance attr compute img_storage_vm true")(_set_appliance_attr)


@command(
    "remove appliance attr", "Remove an appliance attribute.",
    args=(Arg("APPLIANCE", f"one of {', '.join(APPLIANCES)}"),
          Arg("ATTR", "the attribute name", keyword="attr")),
    example="rocks remove appliance attr compute img_storage_vm")
def remove_appliance_attr(inv: Invocation) -> None:
    inv.registry.remove_attr(inv.args["attr"], appliance=inv.args["appliance"])


@command(
    "list appliance attr", "List appliance attributes.",
    args=(Arg("APPLIANCE", "only this appliance (default: all)", required=False),),
    example="rocks list appliance attr vm-container")
def list_appliance_attr(inv: Invocation) -> None:
    table = Table(["APPLIANCE", "ATTR", "VALUE"])
    for appliance, name, value in inv.registry.appliance_attrs(inv.args["appliance"]):
        table.add(appliance, name, value)
    inv.table(table)


def _set_global_attr(inv: Invocation) -> None:
    inv.registry.set_attr(inv.args["attr"], inv.args["value"])


for _verb in ("set", "add"):
    command(
        f"{_verb} attr", "Set a global attribute.",
        args=_ATTR_ARGS,
        description=("'add attr' and 'set attr' are the same command. " + _VALUE_NOTE),
        example="rocks set attr img_sync false")(_set_global_attr)


@command(
    "remove attr", "Remove a global attribute.",
    args=(Arg("ATTR", "the attribute name", keyword="attr"),),
    example="rocks remove attr img_sync")
def remove_attr(inv: Invocation) -> None:
    inv.registry.remove_attr(inv.args["attr"])


@command("list attr", "List the global attributes.", example="rocks list attr")
def list_attr(inv: Invocation) -> None:
    table = Table(["ATTR", "VALUE"], owner=False)
    for name, value in inv.registry.global_attrs():
        table.add(name, value)
    inv.table(table)

