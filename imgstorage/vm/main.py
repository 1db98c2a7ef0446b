"""``img-storage-vm``: the VM-container daemon (foreground; init scripts daemonise it)."""
from __future__ import annotations

import logging

from .. import dblock, poolwait, trust
from ..config import Config
from ..errors import ImgStorageError
from ..messaging import RpcPool
from ..daemon import Daemon, command_line
from ..db import create_schema, make_engine
from ..drivers import node_drivers
from ..metrics import DeviceCollector, Metrics
from . import handlers
from .models import Base, VmZvol
from .service import VmService

log = logging.getLogger("imgstorage.vm")


def notifier(cfg: Config, peers: RpcPool):
    """Tell a NAS something that needs no answer (a merge finished); log if it cannot be told."""
    def notify(node: str, message: dict) -> None:
        try:
            peers.notify(node, message)
        except ImgStorageError as exc:
            log.error("could not tell %s %s about %s: %s", node, message.get("action"),
                      message.get("zvol"), exc)
    return notify


def build_daemon(cfg: Config) -> Daemon:
    dblock.claim(cfg.db)
    metrics = Metrics(cfg.name, "vm")
    metrics.listen(cfg.metrics_port, cfg.metrics_bind)   # a port in use: nothing started
    engine = make_engine(cfg.db)
    create_schema(engine, Base)
    peers = RpcPool(cfg, keep=4)        # merge reports to NASes, kept open between them
    service = VmService(cfg, engine, node_drivers(cfg), notify=notifier(cfg, peers),
                        metrics=metrics)
    service.initiator_name()  # fail at start, not at the first map, when the initiator is not set up
    metrics.register(DeviceCollector(service))
    poolwait.wait_for_pools(cfg, engine, service.drivers.zfs, VmZvol.remotepool)
    service.recover()
    return Daemon(cfg, handlers.build(service), quick_actions=handlers.QUICK,
                  background=[peers, service.sync], metrics=metrics)


cli = command_line(
    "img-storage-vm",
    "Serve the VM-container side of imgstorage: iSCSI sessions and local devices.\n\n"
    "Consumes this node's queue on the broker named in the configuration and runs in the "
    "foreground until SIGTERM, letting work in flight finish.",
    build_daemon, lambda cfg: trust.announce(cfg, "vm"))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
