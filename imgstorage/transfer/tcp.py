"""The TCP transport: one-shot endpoints admitted by a one-time token.

The VM-container daemon opens a :class:`StreamServer` on an ephemeral port
of its storage address; the server draws the token itself, and the daemon
hands the port and token to the NAS in its answer through the message
broker.  The NAS connects with :class:`SocketSink` (upload) or
:class:`SocketSource` (pull).  The receiving end answers with a status line
once its sink has committed, so the sender learns whether the data were
really stored.
"""
from __future__ import annotations

import hmac
import logging
import select
import selectors
import socket
import threading
import time
from typing import Dict, Optional, Tuple

from ..drivers.base import ByteSink, ByteSource
from ..errors import DriverError
from .frames import (HELLO_SIZE, MAX_STATUS, READY, FrameReader, FrameWriter, close_quietly,
                     hello, new_token, no_delay, recv_line, send_all)
from .progress import Progress
from .pump import TransferCancelled, abort_sink, abort_source, describe, pump

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 120.0         # no byte moved for this long: the peer is gone
COMMIT_TIMEOUT = 600.0     # zfs receive may take a while to commit after the end
HELLO_TIMEOUT = 5.0        # a connection gets this long to present its token
MAX_HANDSHAKES = 32        # connections waiting to present a token at once, per endpoint
LOGGED_REFUSALS = 20       # refused connections logged one by one per endpoint; then counted
LINGER = 2.0               # drain the socket this long after an ERR status
ACCEPT_SLICE = 0.5         # how often a waiting accept looks at the cancel event


MIN_RECEIVE_BUFFER = 64 * 1024
MAX_RECEIVE_BUFFER = 4 * 1024 * 1024


def receive_buffer_for(rate: Optional[int]) -> Optional[int]:
    """The socket receive buffer of a throttled reader: a quarter second at its rate.

    Left to itself the kernel grows a receive buffer to tens of MiB (tcp_rmem),
    so a reader throttled to a few hundred kB/s lets the sender put most of a
    stream into kernel buffers and believe it has finished long before the data
    arrived: the sender's progress and its end say nothing, and a sender killed
    "in the middle" has in fact nothing left to send.  A bounded buffer keeps
    the sender close to what the reader really took.  None (no rate): the
    kernel's own tuning, fastest for an unthrottled stream.
    """
    if not rate:
        return None
    return max(MIN_RECEIVE_BUFFER, min(MAX_RECEIVE_BUFFER, int(rate) // 4))


def _open(host: str, port: int, timeout: float, receive_buffer: Optional[int]) -> socket.socket:
    """Connect as socket.create_connection does, setting the receive buffer first
    (it must be set before the connection exists to bound the advertised window)."""
    last: Optional[OSError] = None
    for family, kind, proto, _name, address in socket.getaddrinfo(host, port,
                                                                  type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            close_quietly(sock)
            last = exc
    raise last or OSError(f"no address for {host}")


def _connect(host: str, port: int, token: str, connect_timeout: float,
             io_timeout: float, receive_buffer: Optional[int] = None) -> Tuple[socket.socket, str]:
    peer = f"{host}:{port}"
    greeting = hello(token)
    try:
        sock = _open(host, port, connect_timeout, receive_buffer)
    except socket.timeout:
        raise DriverError(f"timed out connecting to the stream server at {peer}") from None
    except OSError as exc:
        raise DriverError(f"cannot connect to the stream server at {peer}: "
                          f"{exc.strerror or describe(exc)}") from None
    try:
        no_delay(sock)
        sock.settimeout(io_timeout)
        ready = b""
        try:
            sock.sendall(greeting)
            while len(ready) < len(READY):
                part = sock.recv(len(READY) - len(ready))
                if not part:
                    break
                ready += part
        except socket.timeout:
            raise DriverError(f"timed out waiting for the stream server at {peer}") from None
        except OSError:
            ready = b""   # reset: the server dropped us, same as a refusal
        if ready != READY:
            raise DriverError(f"the stream server at {peer} refused the connection "
                              "(wrong or expired token, or its one transfer already started)")
    except BaseException:
        close_quietly(sock)
        raise
    return sock, peer


class _SendingEnd:
    """What both sending ends (connecting and served) do when the stream must stop."""

    sock: socket.socket
    _writer: FrameWriter
    _closed: bool

    def fail(self, message: str) -> None:
        """Stop sending and tell the receiver why, so it discards the stream."""
        if self._closed:
            return
        self._closed = True
        self._writer.fail_quietly(message)
        close_quietly(self.sock)

    def abort(self) -> None:
        self.fail("the sender aborted the transfer")


class SocketSink(_SendingEnd):
    """The connecting end that sends a stream (the NAS uploading to a VM container).

    ``close()`` returns only once the far side's sink has committed: it
    sends the end frame, half-closes, and waits for ``OK`` or ``ERR <why>``.
    """

    def __init__(self, sock: socket.socket, peer: str, *,
                 commit_timeout: float = COMMIT_TIMEOUT) -> None:
        self.sock = sock
        self.peer = peer
        self.commit_timeout = commit_timeout
        self._writer = FrameWriter(sock, peer)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._closed = False

    @classmethod
    def connect(cls, host: str, port: int, token: str, *,
                connect_timeout: float = CONNECT_TIMEOUT, io_timeout: float = IO_TIMEOUT,
                commit_timeout: float = COMMIT_TIMEOUT) -> "SocketSink":
        sock, peer = _connect(host, port, token, connect_timeout, io_timeout)
        return cls(sock, peer, commit_timeout=commit_timeout)

    def _status_error(self, status: Optional[str]) -> DriverError:
        if status is not None and status.startswith("ERR"):
            reason = status[3:].strip() or "no reason given"
            return DriverError(f"{self.peer} could not store the stream: {reason}")
        if status is None:
            return DriverError(f"{self.peer} closed the connection without confirming "
                               "that the stream was stored")
        return DriverError(f"{self.peer} answered {status[:80]!r} instead of a stream status")

    def _early_status(self) -> Optional[DriverError]:
        """Anything from the receiver before the end is a refusal: read why."""
        if not self._poll.poll(0):
            return None
        self.sock.settimeout(LINGER)
        try:
            status = recv_line(self.sock, self.peer, "reading the receiver's status")
        except DriverError as exc:
            return exc
        return self._status_error(status)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise DriverError(f"the stream to {self.peer} is already closed")
        refusal = self._early_status()
        if refusal is None:
            try:
                self._writer.data(data)
                return
            except DriverError as exc:
                refusal = self._early_status() or exc
        self._closed = True
        close_quietly(self.sock)
        raise refusal

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._writer.end()
            except DriverError as exc:
                raise (self._early_status() or exc) from None
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the status read below tells what happened
            self.sock.settimeout(self.commit_timeout)
            status = recv_line(self.sock, self.peer, "waiting for the stream to be stored")
        finally:
            close_quietly(self.sock)
        if status != "OK":
            raise self._status_error(status)


class SocketSource:
    """The connecting end that receives a stream (the NAS pulling from a VM container)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._reader = FrameReader(sock, peer)
        self._closed = False

    @classmethod
    def connect(cls, host: str, port: int, token: str, *,
                connect_timeout: float = CONNECT_TIMEOUT,
                io_timeout: float = IO_TIMEOUT,
                rate: Optional[int] = None) -> "SocketSource":
        """``rate``: the reader's limit in bytes/s, which bounds the receive buffer."""
        sock, peer = _connect(host, port, token, connect_timeout, io_timeout,
                              receive_buffer_for(rate))
        return cls(sock, peer)

    @property
    def received(self) -> int:
        return self._reader.received

    def read(self, n: int) -> bytes:
        if self._closed:
            raise DriverError(f"the stream from {self.peer} is already closed")
        return self._reader.read(n)

    def close(self) -> None:
        """Raise unless the sender's end frame arrived: only then is the stream whole."""
        if self._closed:
            return
        self._closed = True
        close_quietly(self.sock)
        if not self._reader.ended:
            raise DriverError(f"the stream from {self.peer} was closed before its end "
                              f"({self._reader.received} bytes received)")

    def abort(self) -> None:
        self._closed = True
        close_quietly(self.sock)


class _ServedSource:
    """Serving side of an upload: frames in; the socket stays open for the status."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._reader = FrameReader(sock, peer)
        self.peer = peer

    def read(self, n: int) -> bytes:
        return self._reader.read(n)

    def close(self) -> None:
        if not self._reader.ended:
            raise DriverError(f"the stream from {self.peer} was closed before its end")

    def abort(self) -> None:
        pass   # serve_into answers ERR and closes the socket itself


class _ServedSink(_SendingEnd):
    """Serving side of a pull: frames out, END on success, FAIL with the reason."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._writer = FrameWriter(sock, peer)
        self._closed = False

    def write(self, data: bytes) -> None:
        self._writer.data(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.end()
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        finally:
            close_quietly(self.sock)


def _linger_close(sock: socket.socket) -> None:
    """Close after an ERR status without losing it.

    Closing a socket with unread input makes the kernel send a reset, and a
    reset can destroy the status line before the sender reads it; so stop
    writing, swallow what the sender still has in flight for a moment, then
    close.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            try:
                if not sock.recv(1 << 16):
                    break
            except socket.timeout:
                continue
    except OSError:
        pass
    finally:
        close_quietly(sock)


class _Handshake:
    """A connection that has yet to present the token, read without blocking."""

    def __init__(self, sock: socket.socket, peer: str, expected: bytes, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.expected = expected
        self.deadline = deadline
        self.data = b""
        self.why = ""

    def receive(self) -> Optional[bool]:
        """True: the token; False: anything else (``why`` says what); None: not all there yet."""
        try:
            part = self.sock.recv(HELLO_SIZE - len(self.data))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.why = f"connection failed: {describe(exc)}"
            return False
        if not part:
            self.why = "closed before presenting a token"
            return False
        self.data += part
        if len(self.data) < HELLO_SIZE:
            return None
        # Fixed size: compared in constant time, nothing a stranger sent is parsed.
        if hmac.compare_digest(self.data, self.expected):
            return True
        self.why = "wrong token"
        return False


class StreamServer:
    """A one-shot TCP endpoint for one stream, opened by the side that serves it.

    The server draws its own token (:attr:`token`); whoever asked for the
    stream learns it only from the answer, so a requester can never choose
    or replay one.  It listens on an ephemeral port of the address it is
    given and admits exactly one connection: the first that presents the
    token.  Connections are admitted concurrently: each gets
    ``hello_timeout`` seconds to present the token and is closed when it
    does not, and at most ``max_handshakes`` wait at once (the longest
    waiting is dropped for a newcomer), so strangers that connect and say
    nothing, or say the wrong thing, never hold up the peer with the token.
    """

    def __init__(self, listener: socket.socket, timeout: float,
                 io_timeout: float = IO_TIMEOUT, *, hello_timeout: float = HELLO_TIMEOUT,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be positive")
        self._listener: Optional[socket.socket] = listener
        self.token = new_token()
        self._expected = hello(self.token)
        self.timeout = timeout
        self.io_timeout = io_timeout
        self.hello_timeout = hello_timeout
        self.max_handshakes = max_handshakes
        self.host, self.port = listener.getsockname()[:2]
        self._deadline = time.monotonic() + timeout
        self._used = False
        self.refused = 0     # connections closed without admission, for logs and tests

    @classmethod
    def open(cls, bind_host: str, timeout: float, *, io_timeout: float = IO_TIMEOUT,
             hello_timeout: float = HELLO_TIMEOUT,
             max_handshakes: int = MAX_HANDSHAKES) -> "StreamServer":
        """Listen on ``bind_host`` (an ephemeral port); ``timeout`` bounds the wait for the peer."""
        try:
            listener = socket.create_server((bind_host, 0), backlog=max(8, max_handshakes))
        except OSError as exc:
            raise DriverError(f"cannot listen for a stream on {bind_host}: "
                              f"{exc.strerror or describe(exc)}") from None
        return cls(listener, timeout, io_timeout, hello_timeout=hello_timeout,
                   max_handshakes=max_handshakes)

    def __enter__(self) -> "StreamServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            close_quietly(listener)

    def accept(self, cancel: Optional[threading.Event] = None) -> Tuple[socket.socket, str]:
        """Wait for the connection that presents the token; return it and its address."""
        if self._used or self._listener is None:
            raise DriverError(f"the stream server on port {self.port} was already used")
        self._used = True
        listener = self._listener
        waiting: Dict[socket.socket, _Handshake] = {}
        selector = selectors.DefaultSelector()
        try:
            try:
                listener.setblocking(False)
                selector.register(listener, selectors.EVENT_READ, None)
            except (OSError, ValueError):        # closed from another thread meanwhile
                raise DriverError(f"the stream server on port {self.port} was closed") from None
            while True:
                if cancel is not None and cancel.is_set():
                    raise TransferCancelled()
                if self._listener is None:       # closed from another thread
                    raise DriverError(f"the stream server on port {self.port} was closed")
                now = time.monotonic()
                if now >= self._deadline:
                    raise DriverError(f"nobody connected to the stream server on port "
                                      f"{self.port} with the transfer's token within "
                                      f"{self.timeout:g} s")
                for hs in [hs for hs in waiting.values() if hs.deadline <= now]:
                    self._refuse(selector, waiting, hs,
                                 f"no token within {self.hello_timeout:g} s")
                wake = min([self._deadline] + [hs.deadline for hs in waiting.values()])
                for key, _ in selector.select(max(0.0, min(wake - now, ACCEPT_SLICE))):
                    if key.data is None:
                        self._take_one(listener, selector, waiting)
                        continue
                    hs = key.data
                    if hs.sock not in waiting:
                        continue   # dropped earlier in this round
                    verdict = hs.receive()
                    if verdict is None:
                        continue
                    if verdict:
                        selector.unregister(hs.sock)
                        del waiting[hs.sock]
                        if self._admit(hs):
                            return hs.sock, hs.peer
                    else:
                        self._refuse(selector, waiting, hs, hs.why)
        finally:
            # The listener goes first: once a stranger sees its own connection closed,
            # nobody may connect to this port any more.
            selector.close()
            self.close()
            for hs in waiting.values():
                close_quietly(hs.sock)
            if waiting:
                self.refused += len(waiting)
                log.warning("stream server on port %d closed %d connections that had not "
                            "presented the token", self.port, len(waiting))
            if self.refused > LOGGED_REFUSALS:
                log.warning("stream server on port %d refused %d connections in all",
                            self.port, self.refused)

    def _take_one(self, listener: socket.socket, selector: selectors.BaseSelector,
                  waiting: Dict[socket.socket, "_Handshake"]) -> None:
        """One new connection per round, so the hellos already sent are read in between."""
        try:
            conn, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise DriverError(f"the stream server on port {self.port} failed: "
                              f"{describe(exc)}") from None
        if len(waiting) >= self.max_handshakes:
            oldest = min(waiting.values(), key=lambda hs: hs.deadline)
            self._refuse(selector, waiting, oldest,
                         f"more than {self.max_handshakes} connections waiting to present a token")
        conn.setblocking(False)
        hs = _Handshake(conn, f"{addr[0]}:{addr[1]}", self._expected,
                        time.monotonic() + self.hello_timeout)
        waiting[conn] = hs
        selector.register(conn, selectors.EVENT_READ, hs)

    def _refuse(self, selector: selectors.BaseSelector,
                waiting: Dict[socket.socket, "_Handshake"], hs: "_Handshake", why: str) -> None:
        selector.unregister(hs.sock)
        del waiting[hs.sock]
        close_quietly(hs.sock)
        self.refused += 1
        if self.refused <= LOGGED_REFUSALS:
            log.warning("refused a stream connection from %s on port %d: %s",
                        hs.peer, self.port, why)

    def _admit(self, hs: "_Handshake") -> bool:
        conn, peer = hs.sock, hs.peer
        try:
            conn.setblocking(True)
            no_delay(conn)
            conn.settimeout(self.io_timeout)
            send_all(conn, READY, peer)
            return True
        except (DriverError, OSError) as exc:
            log.warning("lost the stream connection from %s before it started: %s", peer, exc)
            close_quietly(conn)
            return False

    def serve_into(self, sink: ByteSink, *, rate_limit: Optional[int] = None,
                   progress: Optional[Progress] = None,
                   cancel: Optional[threading.Event] = None) -> int:
        """Receive the peer's stream into ``sink``, then tell the peer whether it committed.

        Returns the bytes received; raises (after answering ``ERR``) when
        the stream was incomplete or the sink refused it.
        """
        try:
            conn, peer = self.accept(cancel)
        except BaseException as exc:
            abort_sink(sink, exc)
            if progress is not None:
                progress.finish(error=describe(exc))
            raise
        try:
            moved = pump(_ServedSource(conn, peer), sink, rate_limit=rate_limit,
                         progress=progress, cancel=cancel)
        except BaseException as exc:
            message = describe(exc)[:MAX_STATUS - 8]
            try:
                conn.settimeout(LINGER)
                conn.sendall(f"ERR {message}\n".encode("utf-8", "replace"))
            except OSError:
                pass   # the peer is gone; it will see no status
            _linger_close(conn)
            raise
        try:
            send_all(conn, b"OK\n", peer)
        finally:
            close_quietly(conn)
        return moved

    def serve_from(self, source: ByteSource, *, rate_limit: Optional[int] = None,
                   progress: Optional[Progress] = None,
                   cancel: Optional[threading.Event] = None) -> int:
        """Send ``source`` to the peer; a producer failure reaches it as an error frame."""
        try:
            conn, peer = self.accept(cancel)
        except BaseException as exc:
            abort_source(source)
            if progress is not None:
                progress.finish(error=describe(exc))
            raise
        return pump(source, _ServedSink(conn, peer), rate_limit=rate_limit,
                    progress=progress, cancel=cancel)


