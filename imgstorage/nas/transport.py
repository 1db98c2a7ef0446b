"""How the NAS moves a zvol's stream to or from a container: TCP or ssh.

Both take the NAS's own ``zfs send``/``zfs receive`` and pump it against the
container's end, throttled and measured by imgstorage.transfer.  With TCP the
NAS asks for a stream and the container daemon opens a one-time endpoint on
its storage address, guarded by a token it draws itself and names in its
answer (the NAS never chooses one); with ssh the NAS runs the container's zfs
as ``ssh_user``.  The simulated backend always uses TCP, so its bytes really
cross a socket.  What the container answers (endpoint, token, size) is
checked before the NAS uses it.

Every receive is resumable (``zfs receive -s``); the sync manager decides
whether a transfer starts fresh or resumes, and the transports only carry it.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, Optional, Tuple

from .. import naming
from ..drivers.base import ByteSource
from ..drivers.resolver import network_name
from ..errors import ImgStorageError
from ..runner import default_runner
from ..transfer import SocketSink, SocketSource, pump, ssh_sink, ssh_source

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,53}")   # as transfer.new_token draws it; fits the hello
MAX_STREAM_SIZE = 1 << 60


def _move(job, rate: Optional[int], open_source, open_sink) -> None:
    """Open both ends (the source first, dropped again if the sink cannot be had) and pump."""
    source = open_source()
    try:
        sink = open_sink()
    except BaseException:
        source.abort()
        raise
    pump(source, sink, rate_limit=rate, progress=job.progress, cancel=job.cancel)


def _send(service, row, request: Dict, stream: bool) -> Dict:
    """``send_zvol`` for a new snapshot (``snap``, ``base``) or a resume (``resume_token``)."""
    container = service.container(row.remotehost)
    if "resume_token" in request:
        return container.send_zvol(row.zvol, resume_token=request["resume_token"],
                                   stream=stream)
    return container.send_zvol(row.zvol, snap=request["snap"], base=request.get("base"),
                               stream=stream)


def _stream_size(reply: Dict) -> Optional[int]:
    """The container's estimate of a pull, used for progress only; refused when absurd."""
    size = reply.get("size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < MAX_STREAM_SIZE:
        raise ImgStorageError("the container answered an invalid stream size")
    return size


def _endpoint(reply: Dict) -> Tuple[str, int, str]:
    """Where the container's endpoint is and its token, checked before anything connects."""
    address, port, token = reply.get("address"), reply.get("port"), reply.get("token")
    if not naming.is_host_or_ip(address) \
            or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ImgStorageError("the container answered without a valid stream endpoint")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise ImgStorageError("the container answered without a valid stream token")
    return address, port, token


class TcpTransport:
    def __init__(self, service):
        self.svc = service

    def upload(self, row, open_source: Callable[[], ByteSource], job, rate: Optional[int],
               base: Optional[Tuple[str, int]] = None) -> None:
        """``base``: the snapshot (and guid) the container's kept copy is rolled back to
        before the stream, which carries only what changed since."""
        reply = self.svc.container(row.remotehost).recv_zvol(
            row.zvol, stream=True, base=base[0] if base else None,
            base_guid=base[1] if base else None)
        address, port, token = _endpoint(reply)
        _move(job, rate, open_source, lambda: SocketSink.connect(address, port, token))

    def pull(self, row, request: Dict, job, rate: Optional[int]) -> Optional[int]:
        reply = _send(self.svc, row, request, stream=True)
        size = _stream_size(reply)
        job.progress.total = size
        address, port, token = _endpoint(reply)
        _move(job, rate, lambda: SocketSource.connect(address, port, token, rate=rate),
              lambda: self.svc.drivers.zfs.receive(row.zpool, row.zvol, resumable=True))
        return size


class SshTransport:
    def __init__(self, service):
        self.svc = service
        self.user = service.config.ssh_user

    def _host(self, remotehost: str) -> str:
        return network_name(self.svc.config, remotehost) or remotehost

    def upload(self, row, open_source: Callable[[], ByteSource], job, rate: Optional[int],
               base: Optional[Tuple[str, int]] = None) -> None:
        if base:
            self.svc.container(row.remotehost).recv_zvol(row.zvol, base=base[0],
                                                         base_guid=base[1])
        _move(job, rate, open_source,
              lambda: ssh_sink(default_runner, self.user, self._host(row.remotehost),
                               row.remotepool, row.zvol, resumable=True))

    def pull(self, row, request: Dict, job, rate: Optional[int]) -> Optional[int]:
        reply = _send(self.svc, row, request, stream=False)
        size = _stream_size(reply)
        job.progress.total = size
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
        return size


def make_transport(config, service):
    if config.backend == "sim" or config.transport == "tcp":
        return TcpTransport(service)
    return SshTransport(service)
