"""VM commands: define VMs, place their disks on a NAS, start and stop them.

Starting a VM whose disk lives on a NAS is two steps that must succeed or
fail together: the NAS maps the zvol to the VM's container (and, in sync
mode, starts copying it there), then the hypervisor boots the VM on the block
device the mapping produced.  If the boot fails the mapping is undone, so a
failed start leaves nothing behind that a later start would trip over.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .. import naming
from ..errors import ImgStorageError, StateError, ValidationError
from .commands_base import (Arg, Invocation, Param, bool_param, command, int_param,
                            size_param)
from .commands_storage import nas_client
from .registry import (APPLIANCES, DEFAULT_CPUS, DEFAULT_DISK_GB, DEFAULT_MEMORY_MB, Disk,
                       Host)
from .tables import Table

INACTIVE_STATES = ("shut off", "shutoff", "shutdown", "nostate", "")
UNKNOWN_STATE = "nostate"


# --------------------------------------------------------------- helpers
def domain_states(inv: Invocation, container: str) -> Dict[str, str]:
    """What the hypervisor on ``container`` says about its domains (raises when it cannot)."""
    return {d.name: d.state for d in inv.hypervisor().domains(container)}


def is_active(state: Optional[str]) -> bool:
    return state is not None and state.strip().lower() not in INACTIVE_STATES


def refuse_if_running(inv: Invocation, vm: Host, *, force: bool = False) -> None:
    """Removing a running VM's definition would orphan a domain that still uses its disk."""
    container = vm.container.name
    try:
        states = domain_states(inv, container)
    except ImgStorageError as exc:
        if force:
            return
        raise StateError(f"cannot tell whether VM {vm.name} is running on {container} ({exc}); "
                         f"add force=true to remove it anyway") from None
    if is_active(states.get(vm.name)):
        raise StateError(f"VM {vm.name} is running on {container}: stop it first "
                         f"(rocks stop host vm {vm.name})")


def _first_disk(vm: Host, purpose: str) -> Disk:
    if not vm.disks:
        raise StateError(f"Unable to {purpose} storage for {vm.name}: it has no disk")
    return vm.disks[0]


def _disk_text(disk: Disk) -> str:
    return f"{disk.vbd_type}:{disk.path},{disk.device}"


# ------------------------------------------------------------- define VMs
@command(
    "add host vm", "Define a VM on a VM container.",
    args=(Arg("CONTAINER", "the physical host that will run the VM"),
          Arg("MEMBERSHIP", f"what the VM is: {', '.join(APPLIANCES)}")),
    params=(Param("disksize", "GB", f"size of its disk (default {DEFAULT_DISK_GB})"),
            Param("mem", "MB", f"memory (default {DEFAULT_MEMORY_MB})"),
            Param("cpus", "N", f"virtual CPUs (default {DEFAULT_CPUS})"),
            Param("name", "NAME", "the VM's name (default: MEMBERSHIP-RACK-RANK-N after the "
                  "container's rack and rank, or vm-CONTAINER-N)")),
    description="The VM gets one local disk file; 'rocks set host vm nas' puts it on a NAS.",
    example="rocks add host vm vm-container-0-14 compute\n"
            "added VM compute-0-14-0 on physical node vm-container-0-14")
def add_host_vm(inv: Invocation) -> None:
    vm = inv.registry.add_vm(
        inv.host(inv.args["container"]), inv.args["membership"],
        disksize=size_param(inv, "disksize", DEFAULT_DISK_GB),
        memory_mb=int_param(inv, "mem", DEFAULT_MEMORY_MB, minimum=1),
        cpus=int_param(inv, "cpus", DEFAULT_CPUS, minimum=1), name=inv.param("name"))
    inv.echo(f"added VM {vm.name} on physical node {vm.container.name}")


@command(
    "remove host vm", "Remove VM definitions (the VMs must be stopped).",
    args=(Arg("VM", "the VMs", many=True),),
    params=(Param("force", "BOOL", "remove even when the container cannot be asked whether "
                  "the VM is running"),),
    description="The VM's disk stays on its NAS; 'rocks remove host storageimg' deletes it.",
    example="rocks remove host vm compute-0-14-0")
def remove_host_vm(inv: Invocation) -> None:
    force = bool_param(inv, "force", False)
    vms = inv.registry.vms(inv.args["vm"])
    for vm in vms:
        refuse_if_running(inv, vm, force=force)
    for vm in vms:
        inv.registry.remove_vm(vm)


@command(
    "list host vm", "List VMs with their container and state.",
    args=(Arg("VM", "only these VMs (default: all)", required=False, many=True),),
    params=(Param("showdisks", "BOOL", "also show each disk (one row per disk)"),),
    description="STATUS is what the container's hypervisor reports; nostate when the VM is "
                "not defined there or the container cannot be asked.",
    example="rocks list host vm showdisks=1")
def list_host_vm(inv: Invocation) -> None:
    showdisks = bool_param(inv, "showdisks", False)
    vms = inv.registry.vms(inv.args["vm"])
    headers = ["VM-HOST", "SLICE", "MEM", "CPUS", "HOST", "STATUS"]
    if showdisks:
        headers += ["DISK", "DISKSIZE"]
    table = Table(headers, trim_owner=False)
    states: Dict[str, Optional[Dict[str, str]]] = {}
    for vm in vms:
        container = vm.container.name
        if container not in states:
            try:
                states[container] = domain_states(inv, container)
            except ImgStorageError:
                states[container] = None
        status = (states[container] or {}).get(vm.name) or UNKNOWN_STATE
        row = [vm.name, vm.slice_no, vm.memory_mb, vm.cpus, container, status]
        if not showdisks:
            table.add(*row)
            continue
        for disk in vm.disks or [None]:
            table.add(*row, _disk_text(disk) if disk else None, disk.size_gb if disk else None)
    inv.table(table)


# ---------------------------------------------------------- disks on a NAS
@command(
    "set host vm nas", "Keep VM disks on a NAS (nas=none: local again).",
    args=(Arg("VM", "the VMs", many=True),),
    params=(Param("nas", "NAS|none", "the NAS (a registered host of appliance nas, or with "
                  "img_storage_nas=true); none goes back to the local disk", required=True),
            Param("zpool", "POOL", "the NAS zpool; default: one picked at random, for each "
                  "VM, from the NAS's img_zpools attribute (comma separated)"),
            Param("index", "N", "which disk of the VM (default 0; only disk 0 is used at "
                  "start)")),
    description="The disk is the zvol VM-vol on the NAS; it is created at the first start. "
                "Change it only while the VM is stopped.",
    example="rocks set host vm nas compute-0-14-0 nas=nas-0-0 zpool=tank\n"
            "rocks set host attr nas-0-0 img_zpools value=\"tank1,tank2\"\n"
            "rocks set host vm nas compute-0-14-0 compute-0-14-1 nas=nas-0-0")
def set_host_vm_nas(inv: Invocation) -> None:
    text = inv.param("index", "0").strip()
    try:
        index = int(text)
    except ValueError:
        raise ValidationError("index must be an integer") from None
    nas_name = inv.param("nas").strip()
    zpool = inv.param("zpool")
    vms = inv.registry.vms(inv.args["vm"])
    if nas_name.lower() == "none":
        for vm in vms:
            inv.registry.clear_vm_nas(vm, index)
        return
    nas = inv.nas(nas_name)
    if zpool is not None:
        zpool = naming.zpool_name(zpool)
    for vm in vms:
        inv.registry.set_vm_nas(vm, nas, zpool, index)


def _nas_rows(inv: Invocation) -> List[tuple]:
    return [(vm, disk) for vm in inv.registry.vms(inv.args["vm"]) for disk in vm.disks]


@command(
    "list host vm nas", "List the NAS and zpool of each VM disk.",
    args=(Arg("VM", "only these VMs (default: all)", required=False, many=True),),
    example="rocks list host vm nas")
def list_host_vm_nas(inv: Invocation) -> None:
    table = Table(["VM-HOST", "NAS", "ZPOOL"], trim_owner=False)
    for vm, disk in _nas_rows(inv):
        table.add(vm.name, disk.nas.name if disk.nas else None, disk.zpool)
    inv.table(table)


@command(
    "dump host vm nas", "Print commands recreating the VM disk placements.",
    args=(Arg("VM", "only these VMs (default: all)", required=False, many=True),),
    example="rocks dump host vm nas > vm-nas.sh")
def dump_host_vm_nas(inv: Invocation) -> None:
    for vm, disk in _nas_rows(inv):
        if disk.nas is None:
            continue
        index = f" index={disk.index}" if disk.index else ""
        inv.echo(f"rocks set host vm nas {vm.name} nas={disk.nas.name} zpool={disk.zpool}{index}")


@command(
    "remove host vm nas", "Forget the NAS of VM disks (the zvols stay).",
    args=(Arg("VM", "the VMs", many=True),),
    example="rocks remove host vm nas compute-0-14-0")
def remove_host_vm_nas(inv: Invocation) -> None:
    for vm in inv.registry.vms(inv.args["vm"]):
        inv.registry.clear_vm_nas(vm)


# ------------------------------------------------------------ start / stop
@command(
    "start host vm", "Start VMs, mapping their NAS disks first.",
    args=(Arg("VM", "the VMs", many=True),),
    description="For a disk on a NAS the zvol VM-vol is mapped to the VM's container; the "
                "container's img_sync attribute chooses direct iSCSI (false) or a local "
                "synchronised copy in its vm_container_zpool (true); with img_keep_local "
                "true the container keeps that copy after the VM stops, and the next start "
                "there copies only what changed. If the boot fails, the zvol is unmapped "
                "again.",
    example="rocks start host vm compute-0-14-0\n"
            "nas-0-0:compute-0-14-0-vol mapped to vm-container-0-14:"
            "/dev/mapper/compute-0-14-0-vol-snap")
def start_host_vm(inv: Invocation) -> None:
    for vm in inv.registry.vms(inv.args["vm"]):
        start_vm(inv, vm)


def start_vm(inv: Invocation, vm: Host) -> None:
    container = vm.container.name
    disk = _first_disk(vm, "allocate")
    try:
        states = domain_states(inv, container)
    except ImgStorageError as exc:
        # Mapping first and failing the boot afterwards would start (in sync
        # mode) a copy that the rollback then has to wait for: fail now.
        raise StateError(f"cannot start VM {vm.name}: {exc}") from None
    if is_active(states.get(vm.name)):
        raise StateError(f"VM {vm.name} is already running on {container}")
    hyp = inv.hypervisor()
    if disk.nas is None:
        hyp.start(container, vm.name, disk.path, vm.memory_mb, vm.cpus)
        return

    nas = disk.nas.name
    zvol = naming.volume_for_vm(vm.name)
    sync = inv.registry.attr_bool(container, "img_sync")
    keep_local = sync and inv.registry.attr_bool(container, "img_keep_local")
    remotepool = inv.registry.attr(container, "vm_container_zpool") or None
    if remotepool is not None:
        try:
            naming.zpool_name(remotepool)
        except ValidationError as exc:
            raise ValidationError(f"attribute vm_container_zpool of host {container}: "
                                  f"{exc}") from None
    if sync and remotepool is None:
        raise ValidationError(f"img_sync is true for {container} but its vm_container_zpool "
                              f"attribute is not set")
    bdev = nas_client(inv, nas).map_zvol(zvol, zpool=disk.zpool, remotehost=container,
                                         remotepool=remotepool, size=disk.size_gb, sync=sync,
                                         keep_local=keep_local)
    if bdev is None:
        note = _unmap_after_failure(inv, nas, zvol)
        raise StateError(f"{nas} mapped {zvol} but did not say which device it became; {note}")
    inv.echo(f"{nas}:{zvol} mapped to {container}:{bdev}")
    try:
        hyp.start(container, vm.name, bdev, vm.memory_mb, vm.cpus)
    except ImgStorageError as exc:
        note = _unmap_after_failure(inv, nas, zvol)
        raise StateError(f"cannot boot VM {vm.name} on {container}: {exc}; {note}") from None
    except BaseException:
        _unmap_after_failure(inv, nas, zvol)
        raise


def _unmap_after_failure(inv: Invocation, nas: str, zvol: str) -> str:
    """Undo a mapping nobody will use; say how that went, for the one error line."""
    try:
        nas_client(inv, nas).unmap_zvol(zvol)
    except ImgStorageError as exc:
        return f"unmapping {nas}:{zvol} failed too: {exc}"
    return f"{nas}:{zvol} was unmapped again"


@command(
    "stop host vm", "Stop VMs, then unmap their NAS disks.",
    args=(Arg("VM", "the VMs", many=True),),
    params=(Param("terminate", "BOOL", "the VM is already off (for instance shut down from "
                  "inside): do not ask the hypervisor, only release its disk"),),
    description="A synced disk is copied back to the NAS after the unmap. A VM that is not "
                "running is not stopped again, but its disk is still released.",
    example="rocks stop host vm compute-0-14-0")
def stop_host_vm(inv: Invocation) -> None:
    terminate = bool_param(inv, "terminate", False)
    for vm in inv.registry.vms(inv.args["vm"]):
        stop_vm(inv, vm, terminate)


def stop_vm(inv: Invocation, vm: Host, terminate: bool) -> None:
    container = vm.container.name
    disk = _first_disk(vm, "release")
    if not terminate:
        try:
            states = domain_states(inv, container)
        except ImgStorageError as exc:
            raise StateError(f"cannot ask {container} about VM {vm.name} ({exc}); if the VM is "
                             f"already off, add terminate=true to release its disk") from None
        if is_active(states.get(vm.name)):
            inv.hypervisor().stop(container, vm.name)
            inv.echo(f"stopped VM {vm.name} on physical node {container}")
        else:
            inv.echo(f"VM {vm.name} is not running on physical node {container}")
    if disk.nas is not None:
        zvol = naming.volume_for_vm(vm.name)
        nas_client(inv, disk.nas.name).unmap_zvol(zvol)
        inv.echo(f"{disk.nas.name}:{zvol} unmapped from {container}")
