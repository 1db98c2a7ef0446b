"""``img-storage-vm``: the VM-container daemon (foreground; init scripts daemonise it)."""
from __future__ import annotations

from ..config import Config
from ..daemon import Daemon, command_line
from ..db import create_schema, make_engine
from ..drivers import node_drivers
from . import handlers
from .models import Base
from .service import VmService


def build_daemon(cfg: Config) -> Daemon:
    engine = make_engine(cfg.db)
    create_schema(engine, Base)
    service = VmService(cfg, engine, node_drivers(cfg))
    service.initiator_name()  # fail at start, not at the first map, when the initiator is not set up
    return Daemon(cfg, handlers.build(service), quick_actions=handlers.QUICK)


cli = command_line(
    "img-storage-vm",
    "Serve the VM-container side of imgstorage: iSCSI sessions and local devices.\n\n"
    "Consumes this node's queue on the broker named in the configuration and runs in the "
    "foreground until SIGTERM, letting work in flight finish.",
    build_daemon)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
