"""The container's end of a transfer: a one-time TCP endpoint per stream.

The NAS asks (``recv_zvol`` / ``send_zvol``) with a token; the container
opens a StreamServer, answers with its address and port, and serves the one
connection that presents the token on a thread of its own, so the request
returns at once and the message loop never waits on a transfer.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict

from ..config import Config
from ..drivers.base import ByteSink, ByteSource
from ..errors import ImgStorageError
from ..transfer import StreamServer

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 60.0


def advertised_address(config: Config) -> str:
    if config.stream_address:
        return config.stream_address
    return f"{config.name}.{config.network}" if config.network else config.name


def _serve(what: str, work: Callable[[], int]) -> None:
    started = time.monotonic()
    try:
        moved = work()
        took = max(time.monotonic() - started, 1e-6)
        log.info("%s: %d bytes in %.1fs (%.0f B/s)", what, moved, took, moved / took)
    except ImgStorageError as exc:
        log.error("%s failed: %s", what, exc)
    except Exception:
        log.exception("%s failed", what)


def _serve_one(config: Config, token: str, end, serve: Callable[[StreamServer], int],
               what: str, name: str) -> Dict:
    """Open the one-time endpoint, serve it on a thread, answer where it listens."""
    try:
        server = StreamServer.open(config.stream_bind or advertised_address(config), token,
                                   ACCEPT_TIMEOUT)
    except BaseException:
        end.abort()
        raise
    threading.Thread(target=_serve, args=(what, lambda: serve(server)), name=name,
                     daemon=True).start()
    return {"address": advertised_address(config), "port": server.port}


def serve_receive(config: Config, token: str, sink: ByteSink, what: str) -> Dict:
    return _serve_one(config, token, sink, lambda server: server.serve_into(sink), what,
                      "stream-in")


def serve_send(config: Config, token: str, source: ByteSource, what: str) -> Dict:
    return _serve_one(config, token, source, lambda server: server.serve_from(source), what,
                      "stream-out")
