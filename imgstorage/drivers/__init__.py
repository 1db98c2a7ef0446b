"""Choose the real or the simulated kernel drivers for a node.

``backend: "real"`` gives the tools of a production node; ``backend: "sim"``
gives drivers that keep real bytes under ``sim_root/<node>/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Config
from ..runner import Runner, default_runner
from .base import (BlockDevices, DeviceMapperDriver, HypervisorDriver, InitiatorDriver,
                   TargetDriver, ZfsDriver)


@dataclass
class NodeDrivers:
    zfs: ZfsDriver
    target: TargetDriver
    initiator: InitiatorDriver
    dm: DeviceMapperDriver
    blockdev: BlockDevices


def node_drivers(config: Config, target_kind: str = "lio",
                 runner: Optional[Runner] = None) -> NodeDrivers:
    """The drivers for the node named in ``config``."""
    runner = runner or default_runner
    if config.backend == "sim":
        from .sim import blockdev, dm, initiator, target, zfs
        from .sim.latency import slowed
        root, host, wait = Path(config.sim_root), config.name, config.sim_latency
        return NodeDrivers(zfs=slowed(zfs.SimZfs(root, host), wait, "zfs"),
                           target=slowed(target.SimTarget(root, host), wait, "target"),
                           initiator=slowed(initiator.SimInitiator(root, host), wait, "iscsi"),
                           dm=slowed(dm.SimDeviceMapper(root, host), wait, "dm"),
                           blockdev=blockdev.SimBlockDevices(root, host))
    from . import blockdev as real_blockdev, dm as real_dm, iscsi, zfs as real_zfs
    if target_kind == "tgt":
        from .tgt import TgtTarget
        tgt: TargetDriver = TgtTarget(runner)
    else:
        from .lio import LioTarget
        tgt = LioTarget()
    return NodeDrivers(zfs=real_zfs.make_zfs(runner), target=tgt,
                       initiator=iscsi.Iscsiadm(runner), dm=real_dm.Dmsetup(runner),
                       blockdev=real_blockdev.RealBlockDevices(runner))


def hypervisor(config: Config, runner: Optional[Runner] = None) -> HypervisorDriver:
    """The hypervisor driver the frontend boots and stops VMs with."""
    if config.backend == "sim":
        from .sim.hypervisor import SimHypervisor
        from .sim.latency import slowed
        return slowed(SimHypervisor(Path(config.sim_root)), config.sim_latency, "hypervisor")
    from .virsh import Virsh
    return Virsh(runner or default_runner)
