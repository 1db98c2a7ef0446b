"""How the NAS moves a zvol's stream to or from a container: TCP or ssh.

Both take the NAS's own ``zfs send``/``zfs receive`` and pump it against the
container's end, throttled and measured by imgstorage.transfer.  With TCP the
container daemon opens a one-time endpoint guarded by a token that travels in
the request; with ssh the NAS runs the container's zfs as ``ssh_user``.  The
simulated backend always uses TCP, so its bytes really cross a socket.
"""
from __future__ import annotations

import logging
from typing import Optional

from ..drivers.resolver import network_name
from ..errors import ImgStorageError
from ..runner import default_runner
from ..transfer import SocketSink, SocketSource, new_token, pump, ssh_sink, ssh_source

log = logging.getLogger(__name__)


def _move(job, rate: Optional[int], open_source, open_sink) -> None:
    """Open both ends (the source first, dropped again if the sink cannot be had) and pump."""
    source = open_source()
    try:
        sink = open_sink()
    except BaseException:
        source.abort()
        raise
    pump(source, sink, rate_limit=rate, progress=job.progress, cancel=job.cancel)


class TcpTransport:
    def __init__(self, service):
        self.svc = service

    def _endpoint(self, reply: dict):
        address, port = reply.get("address"), reply.get("port")
        if not isinstance(address, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ImgStorageError("the container answered without a stream endpoint")
        return address, port

    def upload(self, row, snap: str, job, rate: Optional[int]) -> None:
        token = new_token()
        reply = self.svc.remote(row.remotehost, {"action": "recv_zvol", "zvol": row.zvol,
                                                 "token": token})
        address, port = self._endpoint(reply)
        _move(job, rate, lambda: self.svc.drivers.zfs.send(row.zpool, row.zvol, snap),
              lambda: SocketSink.connect(address, port, token))

    def pull(self, row, snap: str, base: Optional[str], job, rate: Optional[int]) -> int:
        token = new_token()
        reply = self.svc.remote(row.remotehost, {"action": "send_zvol", "zvol": row.zvol,
                                                 "snap": snap, "base": base, "token": token})
        job.progress.total = reply.get("size")
        address, port = self._endpoint(reply)
        _move(job, rate, lambda: SocketSource.connect(address, port, token),
              lambda: self.svc.drivers.zfs.receive(row.zpool, row.zvol))
        return reply.get("size")


class SshTransport:
    def __init__(self, service):
        self.svc = service
        self.user = service.config.ssh_user

    def _host(self, remotehost: str) -> str:
        return network_name(self.svc.config, remotehost) or remotehost

    def upload(self, row, snap: str, job, rate: Optional[int]) -> None:
        _move(job, rate, lambda: self.svc.drivers.zfs.send(row.zpool, row.zvol, snap),
              lambda: ssh_sink(default_runner, self.user, self._host(row.remotehost),
                               row.remotepool, row.zvol))

    def pull(self, row, snap: str, base: Optional[str], job, rate: Optional[int]) -> int:
        reply = self.svc.remote(row.remotehost, {"action": "send_zvol", "zvol": row.zvol,
                                                 "snap": snap, "base": base})
        job.progress.total = reply.get("size")
        _move(job, rate, lambda: ssh_source(default_runner, self.user,
                                            self._host(row.remotehost), row.remotepool,
                                            row.zvol, snap, base),
              lambda: self.svc.drivers.zfs.receive(row.zpool, row.zvol))
        return reply.get("size")


def make_transport(config, service):
    if config.backend == "sim" or config.transport == "tcp":
        return TcpTransport(service)
    return SshTransport(service)
