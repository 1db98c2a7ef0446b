"""VM-container message handlers: validate, call the service, reply."""
from __future__ import annotations

import threading
from typing import Dict

from .. import naming, protocol
from ..drivers.base import ChapCredentials
from ..errors import BusyError, ValidationError
from ..messaging import Envelope
from ..protocol import field, optional_name
from .service import VmService

QUICK = {"list_dev", "initiator_name", "ping"}


def _chap(value) -> ChapCredentials:
    if not isinstance(value, dict) or not isinstance(value.get("userid"), str) \
            or not isinstance(value.get("password"), str) \
            or not (0 < len(value["userid"]) <= 64) or not (0 < len(value["password"]) <= 64):
        raise ValidationError("invalid chap credentials")
    return ChapCredentials(value["userid"], value["password"])


def build(service: VmService) -> Dict[str, object]:
    default_timeout = service.config.timeout
    busy: set = set()
    busy_lock = threading.Lock()

    class _Busy:
        """One operation per zvol at a time on the container too."""
        def __init__(self, zvol: str):
            self.zvol = zvol

        def __enter__(self):
            with busy_lock:
                if self.zvol in busy:
                    raise BusyError(f"ZVol {self.zvol} is busy")
                busy.add(self.zvol)

        def __exit__(self, *exc):
            with busy_lock:
                busy.discard(self.zvol)

    def map_zvol(env: Envelope) -> dict:
        m = env.body
        zvol = field(m, "zvol", naming.zvol_name)
        target = field(m, "target", naming.iqn)
        nas = field(m, "nas", naming.host_name)
        sync = field(m, "sync", protocol.bool_field, required=False, default=False)
        remotepool = field(m, "remotepool", optional_name(naming.zpool_name), required=False)
        chap = field(m, "chap", _chap, required=False)
        if m.get("size") is not None:
            naming.size_gb(m["size"])
        with _Busy(zvol):
            bdev = service.map_zvol(zvol, target, nas, sync, remotepool, chap,
                                    env.remaining(default_timeout))
        return protocol.success("map_zvol", target=target, bdev=bdev, zvol=zvol)

    def unmap_zvol(env: Envelope) -> dict:
        zvol = field(env.body, "zvol", naming.zvol_name)
        target = field(env.body, "target", optional_name(naming.iqn), required=False)
        with _Busy(zvol):
            service.unmap_zvol(zvol, target, env.remaining(default_timeout))
        return protocol.success("unmap_zvol", target=target, zvol=zvol)

    def list_dev(env: Envelope) -> dict:
        return protocol.success("list_dev", node_type="mixed", body=service.list_dev())

    def initiator_name(env: Envelope) -> dict:
        return protocol.success("initiator_name", initiator=service.initiator_name())

    def ping(env: Envelope) -> dict:
        return protocol.success("ping", node=service.config.name, role="vm")

    return {"map_zvol": map_zvol, "unmap_zvol": unmap_zvol, "list_dev": list_dev,
            "initiator_name": initiator_name, "ping": ping}
