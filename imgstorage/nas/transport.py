"""How the NAS moves a zvol's stream to or from a container: TCP or ssh.

Both take the NAS's own ``zfs send``/``zfs receive`` and pump it against the
container's end, throttled and measured by imgstorage.transfer.  With TCP the
container daemon opens a one-time endpoint guarded by a token that travels in
the request; with ssh the NAS runs the container's zfs as ``ssh_user``.  The
simulated backend always uses TCP, so its bytes really cross a socket.

Every receive is resumable (``zfs receive -s``); the sync manager decides
whether a transfer starts fresh or resumes, and the transports only carry it.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

from ..drivers.base import ByteSource
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


def _send_request(row, request: Dict) -> Dict:
    """``send_zvol`` for a new snapshot (``snap``, ``base``) or a resume (``resume_token``)."""
    message = {"action": "send_zvol", "zvol": row.zvol}
    if "resume_token" in request:
        message["resume_token"] = request["resume_token"]
    else:
        message.update(snap=request["snap"], base=request.get("base"))
    return message


class TcpTransport:
    def __init__(self, service):
        self.svc = service

    def _endpoint(self, reply: dict):
        address, port = reply.get("address"), reply.get("port")
        if not isinstance(address, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise ImgStorageError("the container answered without a stream endpoint")
        return address, port

    def upload(self, row, open_source: Callable[[], ByteSource], job, rate: Optional[int]) -> None:
        token = new_token()
        reply = self.svc.remote(row.remotehost, {"action": "recv_zvol", "zvol": row.zvol,
                                                 "token": token})
        address, port = self._endpoint(reply)
        _move(job, rate, open_source, lambda: SocketSink.connect(address, port, token))

    def pull(self, row, request: Dict, job, rate: Optional[int]) -> Optional[int]:
        token = new_token()
        reply = self.svc.remote(row.remotehost, dict(_send_request(row, request), token=token))
        job.progress.total = reply.get("size")
        address, port = self._endpoint(reply)
        _move(job, rate, lambda: SocketSource.connect(address, port, token),
              lambda: self.svc.drivers.zfs.receive(row.zpool, row.zvol, resumable=True))
        return reply.get("size")


class SshTransport:
    def __init__(self, service):
        self.svc = service
        self.user = service.config.ssh_user

    def _host(self, remotehost: str) -> str:
        return network_name(self.svc.config, remotehost) or remotehost

    def upload(self, row, open_source: Callable[[], ByteSource], job, rate: Optional[int]) -> None:
        _move(job, rate, open_source,
              lambda: ssh_sink(default_runner, self.user, self._host(row.remotehost),
                               row.remotepool, row.zvol, resumable=True))

    def pull(self, row, request: Dict, job, rate: Optional[int]) -> Optional[int]:
        reply = self.svc.remote(row.remotehost, _send_request(row, request))
        job.progress.total = reply.get("size")
        host = self._host(row.remotehost)
        if "resume_token" in request:
            open_source = lambda: ssh_source(default_runner, self.user, host,  # noqa: E731
                                             row.remotepool, row.zvol, request["snap"],
                                             resume_token=request["resume_token"])
        else:
            open_source = lambda: ssh_source(default_runner, self.user, host,  # noqa: E731
                                             row.remotepool, row.zvol, request["snap"],
                                             request.get("base"))
        _move(job, rate, open_source,
              lambda: self.svc.drivers.zfs.receive(row.zpool, row.zvol, resumable=True))
        return reply.get("size")


def make_transport(config, service):
    if config.backend == "sim" or config.transport == "tcp":
        return TcpTransport(service)
    return SshTransport(service)
