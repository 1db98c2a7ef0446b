"""A NAS service on the simulated kernel whose containers are scripted replies.

For tests of the NAS's own decisions: what it does with a given answer (or a
lost one) from a container.  Everything else is real: the SQLite store, the
state table, the simulated pool and target registry.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from click.testing import CliRunner

from imgstorage import protocol
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.sim import cli as simcli
from imgstorage.errors import NoSuchNode, RemoteError
from imgstorage.nas.models import Base as NasBase
from imgstorage.nas.service import NasService
from imgstorage.nas.store import NasStore

NAS = "nas-0-0"
POOL = "tank"
HOST = "vm-container-0-14"

Answer = Callable[[Dict], Dict]


def put_row(store: NasStore, zvol: str, **fields) -> None:
    """Write a row's columns, state included, as a daemon that stopped there left them.

    Tests only: the daemons change a state through ``NasStore.transition``.
    """
    from imgstorage.nas.models import Zvol
    with store.session() as s, s.begin():
        row = s.get(Zvol, zvol)
        for key, value in fields.items():
            setattr(row, key, value)


class Containers:
    """Answers of the containers by action; every request is recorded."""

    def __init__(self) -> None:
        self.answers: Dict[str, Answer] = {}
        self.requests: List[Tuple[str, Dict]] = []

    def __call__(self) -> "Containers":          # the service's rpc_factory
        return self

    def __enter__(self) -> "Containers":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def call(self, node: str, message: Dict, timeout: float) -> Dict:
        self.requests.append((node, dict(message)))
        answer = self.answers.get(message["action"])
        if answer is None:
            raise NoSuchNode(node)
        return answer(message)

    def request(self, node: str, message: Dict, timeout: float) -> Dict:
        reply = self.call(node, message, timeout)
        if reply.get("status") != "success":
            raise RemoteError(node, message["action"], reply.get("error", "error"),
                              protocol.error_code(reply))
        return reply

    def actions(self) -> List[str]:
        return [message["action"] for _node, message in self.requests]


def nas_service(root) -> Tuple[NasService, Containers]:
    sim_root = str(root / "sim")
    CliRunner().invoke(simcli.cli, ["--sim-root", sim_root, "zpool", "create", "--host", NAS,
                                    POOL])
    cfg = from_dict({"name": NAS, "backend": "sim", "sim_root": sim_root,
                     "db": str(root / "nas.db")})
    engine = make_engine(cfg.db)
    create_schema(engine, NasBase)
    store = NasStore(engine)
    store.ensure_defaults()
    containers = Containers()
    return NasService(cfg, store, node_drivers(cfg), rpc_factory=containers), containers


def success(**fields) -> Answer:
    return lambda message: {"action": message["action"], "status": "success", **fields}
