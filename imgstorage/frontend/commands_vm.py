"""VM commands: define VMs, place their disks on a NAS, start and stop them.

Starting a VM whose disk lives on a NAS is two steps that must succeed or
fail together: the NAS maps the zvol to the VM's container (and, in sync
mode, starts copying it there), then the hypervisor boots the VM on the block
device the mapping produced.  If the boot fails the mapping is undone, so a
failed start leaves nothing behind that a later start would trip over.

An operator starts or stops a whole rack of VMs in one command; one at a
time, each waiting for its NAS and its hypervisor, that takes minutes where
a few at once take seconds.  So several VMs are worked on in parallel
(``parallel.py``), each failing or succeeding on its own.
"""
from __future__ import annotations

import dataclasses
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import click

from .. import naming
from ..errors import ImgStorageError, NotFoundError, StateError, ValidationError
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
#
# Each VM is planned first, from the registry, in the command's own thread
# (the registry's database handle belongs to it), then worked on: with one VM
# right there, as the command always did; with several, on up to parallel=N
# worker threads, each with an invocation of its own (its own broker
# connection), a VM's lines printed together when it is done.

DEFAULT_PARALLEL = 8
_PARALLEL = Param("parallel", "N", "how many VMs to work on at once (default "
                  f"{DEFAULT_PARALLEL})")
_MANY_VMS = ("With several VMs, up to parallel=N are worked on at once: each VM's lines are "
             "printed when it is done, a failed VM's error as 'error - VM: ...' on standard "
             "error, and the others go on; a progress bar shows on a terminal. The last line "
             "counts the VMs {done} and names those that failed; the exit status is 0 only "
             "when every VM was {done}. Unknown VMs are refused before any is touched.")


class VmPlan:
    """What working on one VM needs from the registry, as plain values a worker thread may use.

    Plain classes rather than dataclasses: building a dataclass takes
    milliseconds, and every command (even a listing) imports this module.
    """

    def __init__(self, vm: str, container: str) -> None:
        self.vm = vm
        self.container = container
        self.lines: List[str] = []          # what it printed, when printed later


class StartPlan(VmPlan):
    def __init__(self, vm: str, container: str, memory_mb: int, cpus: int,
                 disk_path: str) -> None:
        super().__init__(vm, container)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.disk_path = disk_path
        self.nas: Optional[str] = None      # the rest only for a disk on a NAS
        self.zpool: Optional[str] = None
        self.size_gb = 0
        self.sync = False
        self.remotepool: Optional[str] = None
        self.keep_local = False


class StopPlan(VmPlan):
    def __init__(self, vm: str, container: str, nas: Optional[str], terminate: bool) -> None:
        super().__init__(vm, container)
        self.nas = nas
        self.terminate = terminate


Say = Callable[[str], None]


def named_vms(inv: Invocation) -> List[Host]:
    """The VMs named on the command line, each once; every unknown one named in one error.

    Checked before anything starts, so a typing mistake in a list of fifty
    never leaves the command half done.
    """
    vms: List[Host] = []
    problems: List[ImgStorageError] = []
    for name in dict.fromkeys(inv.args["vm"]):
        try:
            vms.append(inv.registry.get_vm(name))
        except ImgStorageError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise NotFoundError("; ".join(str(p) for p in problems))
    return vms


def parallel_param(inv: Invocation) -> int:
    return int_param(inv, "parallel", DEFAULT_PARALLEL, minimum=1)


@command(
    "start host vm", "Start VMs, mapping their NAS disks first.",
    args=(Arg("VM", "the VMs", many=True),),
    params=(_PARALLEL,),
    description="For a disk on a NAS the zvol VM-vol is mapped to the VM's container; the "
                "container's img_sync attribute chooses direct iSCSI (false) or a local "
                "synchronised copy in its vm_container_zpool (true); with img_keep_local "
                "true the container keeps that copy after the VM stops, and the next start "
                "there copies only what changed. If the boot fails, the zvol is unmapped "
                "again. " + _MANY_VMS.format(done="started"),
    example="rocks start host vm compute-0-14-0\n"
            "nas-0-0:compute-0-14-0-vol mapped to vm-container-0-14:"
            "/dev/mapper/compute-0-14-0-vol-snap\n"
            "rocks start host vm compute-0-14-0 compute-0-14-1 compute-0-15-0 parallel=2\n"
            "nas-0-0:compute-0-14-1-vol mapped to vm-container-0-14:/dev/sdc\n"
            "error - compute-0-15-0: cannot start VM compute-0-15-0: failed to connect to "
            "the hypervisor on vm-container-0-15\n"
            "nas-0-0:compute-0-14-0-vol mapped to vm-container-0-14:/dev/sdb\n"
            "error - started 2 of 3 VMs, 1 failed: compute-0-15-0")
def start_host_vm(inv: Invocation) -> None:
    limit = parallel_param(inv)
    vms = named_vms(inv)
    run_vms(inv, vms, lambda vm: plan_start(inv, vm), start_planned, limit, "started",
            "starting")


def plan_start(inv: Invocation, vm: Host) -> StartPlan:
    """Read and check what the start needs; a bad attribute fails here, before any message."""
    container = vm.container.name
    disk = _first_disk(vm, "allocate")
    plan = StartPlan(vm.name, container, vm.memory_mb, vm.cpus, disk.path)
    if disk.nas is None:
        return plan
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
    plan.nas, plan.zpool, plan.size_gb = disk.nas.name, disk.zpool, disk.size_gb
    plan.sync, plan.remotepool, plan.keep_local = sync, remotepool, keep_local
    return plan


def start_planned(inv: Invocation, plan: StartPlan, say: Say) -> None:
    container = plan.container
    try:
        states = domain_states(inv, container)
    except ImgStorageError as exc:
        # Mapping first and failing the boot afterwards would start (in sync
        # mode) a copy that the rollback then has to wait for: fail now.
        raise StateError(f"cannot start VM {plan.vm}: {exc}") from None
    if is_active(states.get(plan.vm)):
        raise StateError(f"VM {plan.vm} is already running on {container}")
    hyp = inv.hypervisor()
    if plan.nas is None:
        hyp.start(container, plan.vm, plan.disk_path, plan.memory_mb, plan.cpus)
        return

    nas = plan.nas
    zvol = naming.volume_for_vm(plan.vm)
    bdev = nas_client(inv, nas).map_zvol(zvol, zpool=plan.zpool, remotehost=container,
                                         remotepool=plan.remotepool, size=plan.size_gb,
                                         sync=plan.sync, keep_local=plan.keep_local)
    if bdev is None:
        note = _unmap_after_failure(inv, nas, zvol)
        raise StateError(f"{nas} mapped {zvol} but did not say which device it became; {note}")
    say(f"{nas}:{zvol} mapped to {container}:{bdev}")
    try:
        hyp.start(container, plan.vm, bdev, plan.memory_mb, plan.cpus)
    except ImgStorageError as exc:
        note = _unmap_after_failure(inv, nas, zvol)
        raise StateError(f"cannot boot VM {plan.vm} on {container}: {exc}; {note}") from None
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
                  "inside): do not ask the hypervisor, only release its disk"),
            _PARALLEL),
    description="A synced disk is copied back to the NAS after the unmap. A VM that is not "
                "running is not stopped again, but its disk is still released. "
                + _MANY_VMS.format(done="stopped"),
    example="rocks stop host vm compute-0-14-0\n"
            "stopped VM compute-0-14-0 on physical node vm-container-0-14\n"
            "nas-0-0:compute-0-14-0-vol unmapped from vm-container-0-14\n"
            "rocks stop host vm compute-0-14-0 compute-0-14-1\n"
            "stopped VM compute-0-14-1 on physical node vm-container-0-14\n"
            "nas-0-0:compute-0-14-1-vol unmapped from vm-container-0-14\n"
            "stopped VM compute-0-14-0 on physical node vm-container-0-14\n"
            "nas-0-0:compute-0-14-0-vol unmapped from vm-container-0-14\n"
            "stopped 2 of 2 VMs")
def stop_host_vm(inv: Invocation) -> None:
    terminate = bool_param(inv, "terminate", False)
    limit = parallel_param(inv)
    vms = named_vms(inv)
    run_vms(inv, vms, lambda vm: plan_stop(vm, terminate), stop_planned, limit, "stopped",
            "stopping")


def plan_stop(vm: Host, terminate: bool) -> StopPlan:
    disk = _first_disk(vm, "release")
    return StopPlan(vm.name, vm.container.name,
                    disk.nas.name if disk.nas is not None else None, terminate)


def stop_planned(inv: Invocation, plan: StopPlan, say: Say) -> None:
    container = plan.container
    if not plan.terminate:
        try:
            states = domain_states(inv, container)
        except ImgStorageError as exc:
            raise StateError(f"cannot ask {container} about VM {plan.vm} ({exc}); if the VM is "
                             f"already off, add terminate=true to release its disk") from None
        if is_active(states.get(plan.vm)):
            inv.hypervisor().stop(container, plan.vm)
            say(f"stopped VM {plan.vm} on physical node {container}")
        else:
            say(f"VM {plan.vm} is not running on physical node {container}")
    if plan.nas is not None:
        zvol = naming.volume_for_vm(plan.vm)
        nas_client(inv, plan.nas).unmap_zvol(zvol)
        say(f"{plan.nas}:{zvol} unmapped from {container}")


# ------------------------------------------------------------- many VMs
@contextmanager
def _own_invocation(inv: Invocation) -> Iterator[Invocation]:
    """A worker thread's copy of the command's invocation: same input, its own connections."""
    own = dataclasses.replace(inv, _registry=None, _rpc=None, _hypervisor=None)
    try:
        yield own
    finally:
        own.finish(True)


def run_vms(inv: Invocation, vms: Sequence[Host], plan: Callable[[Host], VmPlan],
            act: Callable[[Invocation, Any, Say], None], limit: int, done: str,
            doing: str) -> None:
    """Plan and act on each VM; with several, in parallel, ending with a summary line."""
    if len(vms) == 1:
        act(inv, plan(vms[0]), inv.echo)
        return
    from .parallel import Outcome, Progress, run_bounded, terminal_wanted   # not at start-up
    failed: Set[str] = set()
    with Progress(len(vms), f"{doing} VMs", terminal_wanted() and not inv.state.debug) as shown:

        def failure(vm: str, exc: BaseException) -> None:
            failed.add(vm)
            if isinstance(exc, ImgStorageError):
                text = str(exc)
            else:                                   # a bug: it stays this VM's failure
                if inv.state.debug:
                    traceback.print_exception(type(exc), exc, exc.__traceback__)
                text = f"internal error: {type(exc).__name__}: {exc}"
            shown.line("error - " + " ".join(f"{vm}: {text}".split()), err=True)

        plans: List[VmPlan] = []
        for vm in vms:
            try:
                plans.append(plan(vm))
            except ImgStorageError as exc:
                failure(vm.name, exc)
                shown.advance(False)
        _ = inv.config                              # loaded here, shared by the workers

        def finished(outcome: Outcome) -> None:
            for line in outcome.item.lines:
                shown.line(line)
            if not outcome.ok:
                failure(outcome.item.vm, outcome.error)
            shown.advance(outcome.ok)

        report = run_bounded(plans, lambda own, p: act(own, p, p.lines.append),
                             limit=limit, resources=lambda: _own_invocation(inv),
                             on_done=finished, on_idle=shown.refresh)
    names = [vm.name for vm in vms if vm.name in failed]
    summary = f"{done} {len(vms) - len(names) - len(report.not_run)} of {len(vms)} VMs"
    if names:
        summary += f", {len(names)} failed: {', '.join(names)}"
    if report.interrupted:
        summary += f", {len(report.not_run)} not tried (interrupted)"
        click.echo(summary, err=True)
        raise KeyboardInterrupt
    if names:
        raise ImgStorageError(summary)
    inv.echo(summary)
