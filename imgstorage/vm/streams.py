"""The container's end of a transfer: a one-time TCP endpoint per stream.

The NAS asks (``recv_zvol`` / ``send_zvol`` with ``"stream": true``); the
container opens a StreamServer on its storage address, which draws the
token, answers with the address, port and token, and serves the one
connection that presents it on a thread of its own, so the request returns
at once and the message loop never waits on a transfer.  A requester never
chooses the token: one it could choose, it could also know in advance.

Each stream holds one of the node's ``max_streams`` slots from before its
endpoint opens until its transfer has ended, whichever way, so requests
cannot make a node open endpoints (and transfer threads) without bound; one
more is answered ``busy`` and the NAS tries again later.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Optional

from ..config import Config
from ..drivers.base import ByteSink, ByteSource
from ..errors import BusyError, ImgStorageError
from ..transfer import StreamServer

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 60.0


def advertised_address(config: Config) -> str:
    if config.stream_address:
        return config.stream_address
    return f"{config.name}.{config.network}" if config.network else config.name


def bind_address(config: Config) -> str:
    """Where endpoints listen: ``stream_bind``, else the storage address, never all interfaces."""
    return config.stream_bind or advertised_address(config)


class StreamSlots:
    """How many streams this process serves at once, against a limit given at each take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    def take(self, limit: int) -> None:
        with self._lock:
            if self._open >= limit:
                raise BusyError(f"this node already serves {self._open} streams "
                                f"(max_streams is {limit}); try again later")
            self._open += 1

    def give_back(self) -> None:
        with self._lock:
            if self._open > 0:
                self._open -= 1


slots = StreamSlots()


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


class Reservation:
    """One of the node's stream slots, held from the request until its transfer ends.

    Taken before the handler changes anything, so a busy node refuses the
    request having done nothing; handed to the serving thread once the
    endpoint is open, and given back by whoever holds it last, whichever
    way the stream ends.
    """

    def __init__(self, config: Config) -> None:
        self._slots = slots      # the counter it came from, even if the module's is replaced
        self._slots.take(config.max_streams)
        self.config = config
        self._mine = True

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._mine:
            self._mine = False
            self._slots.give_back()

    def _serve(self, open_end: Callable, serve: Callable, what: str, name: str) -> Dict:
        """Open the end and the endpoint, serve it on a thread, answer where it is."""
        if not self._mine:
            raise RuntimeError("this stream slot was already used")
        end = server = None
        try:
            end = open_end()
            server = StreamServer.open(bind_address(self.config), ACCEPT_TIMEOUT)
            log.info("%s: stream endpoint listening on %s:%d", what, server.host, server.port)

            def run() -> None:
                try:
                    _serve(what, lambda: serve(server, end))
                finally:
                    server.close()
                    self._slots.give_back()

            thread = threading.Thread(target=run, name=name, daemon=True)
            self._mine = False     # from here on the thread gives the slot back
            try:
                thread.start()
            except BaseException:
                self._mine = True
                raise
        except BaseException:
            if server is not None:
                server.close()
            if end is not None:
                end.abort()
            self.release()
            raise
        return {"address": advertised_address(self.config), "port": server.port,
                "token": server.token}

    def serve_receive(self, open_sink: Callable[[], ByteSink], what: str) -> Dict:
        """An endpoint the NAS streams into ``open_sink()``; the reply fields that name it."""
        return self._serve(open_sink, lambda server, sink: server.serve_into(sink), what,
                           "stream-in")

    def serve_send(self, open_source: Callable[[], ByteSource], what: str) -> Dict:
        """An endpoint the NAS reads ``open_source()`` from; the reply fields that name it."""
        return self._serve(open_source, lambda server, source: server.serve_from(source),
                           what, "stream-out")


def reserve(config: Config, wanted: bool = True) -> ContextManager[Optional[Reservation]]:
    """A stream slot when ``wanted`` (BusyError when none is free), else nothing."""
    return Reservation(config) if wanted else nullcontext()
