"""``img-storage-nas``: the NAS daemon (runs in the foreground; init scripts daemonise it)."""
from __future__ import annotations

import logging

from .. import dblock, poolwait, trust
from ..config import Config
from ..daemon import Daemon, command_line
from ..db import create_schema, make_engine
from ..drivers import node_drivers
from ..metrics import Metrics, NasCollector
from . import handlers
from .models import Base, Zvol
from .reexport import reexport_targets
from .service import NasService
from .store import NasStore

log = logging.getLogger("imgstorage.nas")


def build_daemon(cfg: Config) -> Daemon:
    dblock.claim(cfg.db)
    metrics = Metrics(cfg.name, "nas")
    metrics.listen(cfg.metrics_port, cfg.metrics_bind)   # a port in use: nothing started
    engine = make_engine(cfg.db)
    create_schema(engine, Base)
    store = NasStore(engine)
    store.ensure_defaults()
    service = NasService(cfg, store, node_drivers(cfg, target_kind=cfg.target), metrics=metrics)
    metrics.expect_transfers()
    metrics.add_pool("sync", service.sync.jobs.workers, service.sync.jobs.count)
    metrics.register(NasCollector(service))
    poolwait.wait_for_pools(cfg, engine, service.drivers.zfs, Zvol.zpool)
    service.recover()
    reexport_targets(store, service.drivers)
    return Daemon(cfg, handlers.build(service), quick_actions=handlers.QUICK,
                  background=[service.peers, service.sync], metrics=metrics)


def _announce(cfg: Config) -> None:
    trust.announce(cfg, "nas")


cli = command_line(
    "img-storage-nas",
    "Serve the NAS side of imgstorage: zvols, iSCSI targets and their mappings.\n\n"
    "Consumes this node's queue on the broker named in the configuration and runs in the "
    "foreground until SIGTERM, letting work in flight finish.",
    build_daemon, _announce)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
