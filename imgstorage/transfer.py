"""Moving a ZFS stream from one host to another, throttled and measured.

Sync mode copies a zvol NAS -> VM container once, then pulls it back
incrementally every few minutes and when the VM stops.  The original scripts
piped ``zfs send | pv -L | ssh host zfs receive`` and learnt nothing but an
exit status.  Here the bytes go through :func:`pump`, which holds the
operator's rate limit, counts what moved (for listings and ETAs), can be
cancelled, and never lets a receiver commit a stream whose producer failed.

Two transports carry the bytes between hosts:

* TCP with a one-time token: the VM-container daemon opens a
  :class:`StreamServer` on an ephemeral port of its storage address, the
  server draws the token itself, and the daemon hands the port and token to
  the NAS in its answer through the message broker; the NAS connects with
  :class:`SocketSink` (upload) or :class:`SocketSource` (pull).  Data travel
  in length-prefixed frames with an explicit end frame, so a connection that
  drops mid-stream can never pass for a complete stream, and the receiving
  end answers with a status line once its sink has committed, so the sender
  learns whether the data were really stored.
* ssh, as the original roll did: :func:`ssh_source` / :func:`ssh_sink` run
  ``zfs send`` / ``zfs receive`` on the far host.
"""
from __future__ import annotations

import hmac
import logging
import select
import secrets
import selectors
import shlex
import socket
import struct
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Tuple

from .drivers.base import ByteSink, ByteSource
from .drivers.zfs import (CommandSink, CommandSource, check_resume_token, receive_argv,
                          send_argv, send_resume_argv)
from .errors import DriverError, ImgStorageError, ValidationError
from .runner import Runner

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# At low limits a whole chunk would be one burst every few seconds; smaller
# reads keep the flow (and the progress figures) smooth: about 4 per second.
MIN_THROTTLED_READ = 4096
THROTTLED_READS_PER_SECOND = 4
RATE_WINDOW = 5.0          # seconds of history behind Progress.rate()
RATE_SAMPLE_SPACING = 0.1  # at most one rate sample per this many seconds

CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 120.0         # no byte moved for this long: the peer is gone
COMMIT_TIMEOUT = 600.0     # zfs receive may take a while to commit after the end
HELLO_TIMEOUT = 5.0        # a connection gets this long to present its token
MAX_HANDSHAKES = 32        # connections waiting to present a token at once, per endpoint
LOGGED_REFUSALS = 20       # refused connections logged one by one per endpoint; then counted
LINGER = 2.0               # drain the socket this long after an ERR status
ACCEPT_SLICE = 0.5         # how often a waiting accept looks at the cancel event

HELLO_SIZE = 64
_MAGIC = b"IMGSTREAM1 "
_READY = b"IMGSTREAM1 READY\n"
_FRAME = struct.Struct("!cI")
_DATA, _END, _FAIL = b"D", b"E", b"X"
MAX_FRAME = 16 << 20
MAX_MESSAGE = 8192
MAX_STATUS = 4096


class TransferCancelled(ImgStorageError):
    """The operator (or a shutting-down daemon) stopped the transfer."""

    def __init__(self, message: str = "the transfer was cancelled") -> None:
        super().__init__(message)


# ----------------------------------------------------------------- progress
class Progress:
    """What a running transfer has done, readable from other threads.

    The pumping thread calls :meth:`add` and :meth:`finish`; listings call
    :meth:`snapshot` at any time.  ``rate()`` looks only at the last few
    seconds so a listing shows the current speed, not an average dragged
    down by a slow start or a stall long ago.
    """

    def __init__(self, total: Optional[int] = None, *, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._window = window
        self._total = total
        self._done = 0
        self._error: Optional[str] = None
        self.started = wall()
        self._wall = wall
        self._finished: Optional[float] = None
        self._t0 = clock()
        self._t_end: Optional[float] = None
        self._samples: Deque[Tuple[float, int]] = deque([(self._t0, 0)])

    # The estimate comes from ``zfs send -nP``, which may run after the
    # Progress was created and listed.
    @property
    def total(self) -> Optional[int]:
        with self._lock:
            return self._total

    @total.setter
    def total(self, value: Optional[int]) -> None:
        with self._lock:
            self._total = value

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    @property
    def finished(self) -> Optional[float]:
        """Epoch seconds when the transfer ended (either way), else None."""
        with self._lock:
            return self._finished

    @property
    def error(self) -> Optional[str]:
        with self._lock:
            return self._error

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = self._clock()
            if now - self._samples[-1][0] >= RATE_SAMPLE_SPACING:
                self._samples.append((now, self._done))
            self._prune(now)

    def finish(self, error: Optional[str] = None) -> None:
        with self._lock:
            if self._finished is not None:
                return
            self._finished = self._wall()
            self._t_end = self._clock()
            self._error = error

    def _prune(self, now: float) -> None:
        # Keep the newest sample at or before the window's start as the base,
        # so the rate always spans at least the whole window once it exists.
        cutoff = now - self._window
        while len(self._samples) >= 2 and self._samples[1][0] <= cutoff:
            self._samples.popleft()

    def rate(self) -> float:
        """Bytes per second: over the last window while running, overall once finished."""
        with self._lock:
            if self._t_end is not None:
                elapsed = self._t_end - self._t0
                return self._done / elapsed if elapsed > 0 else 0.0
            now = self._clock()
            self._prune(now)
            base_t, base_done = self._samples[0]
            span = now - base_t
            return (self._done - base_done) / span if span > 0 else 0.0

    def percent(self) -> Optional[float]:
        """Share of the estimate done, capped at 100 (a real `zfs send -nP` over-estimates by about 2%, other estimates may err either way); None if unknown."""
        with self._lock:
            if self._finished is not None and self._error is None:
                return 100.0
            if not self._total:
                return None
            return min(100.0, 100.0 * self._done / self._total)

    def eta(self) -> Optional[float]:
        """Seconds left at the current rate, when both the estimate and a rate exist."""
        total, done, finished = self.total, self.done, self.finished
        if finished is not None:
            return 0.0
        rate = self.rate()
        if not total or rate <= 0:
            return None
        return max(0.0, (total - done) / rate)

    def snapshot(self) -> Dict[str, object]:
        """A plain dict for listings and replies (JSON-friendly)."""
        rate, percent, eta = self.rate(), self.percent(), self.eta()
        with self._lock:
            return {
                "total": self._total,
                "done": self._done,
                "started": self.started,
                "finished": self._finished,
                "error": self._error,
                "rate": int(rate),
                "percent": None if percent is None else round(percent, 1),
                "eta": None if eta is None else int(eta),
            }


# --------------------------------------------------------------------- pump
class _TokenBucket:
    """Average-rate limiter that sleeps (on the cancel event) instead of spinning.

    The bucket starts empty and holds at most one read's worth, so the
    transfer never runs ahead of ``rate`` by more than one read, neither at
    the start nor after a stall of the producer.
    """

    def __init__(self, rate: float, burst: int, cancel: threading.Event) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.cancel = cancel
        self.tokens = 0.0
        self.last = time.monotonic()

    def _refill(self, cap: float) -> None:
        now = time.monotonic()
        self.tokens = min(cap, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self, n: int) -> None:
        # A source may hand back more than it was asked for; letting the
        # bucket hold that much once is what keeps the wait below finite.
        cap = max(self.burst, float(n))
        self._refill(cap)
        while self.tokens < n:
            if self.cancel.wait((n - self.tokens) / self.rate):
                raise TransferCancelled()
            self._refill(cap)
        self.tokens -= n


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _abort_source(source: ByteSource) -> None:
    try:
        source.abort()
    except Exception:   # abort must never hide the original failure
        log.exception("aborting a stream source failed")


def _abort_sink(sink: ByteSink, reason: BaseException) -> None:
    """Abort the sink, telling it why when it can pass that on (a socket peer)."""
    try:
        fail = getattr(sink, "fail", None)
        if callable(fail):
            fail(_describe(reason))
        else:
            sink.abort()
    except Exception:
        log.exception("aborting a stream sink failed")


def pump(source: ByteSource, sink: ByteSink, *, rate_limit: Optional[int] = None,
         progress: Optional[Progress] = None, cancel: Optional[threading.Event] = None,
         chunk: int = CHUNK) -> int:
    """Copy ``source`` into ``sink``; return the number of bytes moved.

    The order of the endings is the point: the source is closed first, and
    only when the producer reports success is the sink closed (committed).
    Any failure or cancellation aborts both sides, so a receiver never keeps
    half a stream.  ``rate_limit`` is in bytes per second (None or 0: none).
    """
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    if rate_limit is not None and rate_limit < 0:
        raise ValidationError(f"invalid rate limit {rate_limit!r}: must be positive")
    progress = progress if progress is not None else Progress()
    cancel = cancel if cancel is not None else threading.Event()
    read_size = chunk
    bucket = None
    if rate_limit:
        read_size = max(MIN_THROTTLED_READ,
                        min(chunk, int(rate_limit) // THROTTLED_READS_PER_SECOND))
        bucket = _TokenBucket(rate_limit, read_size, cancel)
    moved = 0
    try:
        while True:
            if cancel.is_set():
                raise TransferCancelled()
            data = source.read(read_size)
            if not data:
                break
            if bucket is not None:
                bucket.take(len(data))
            sink.write(data)
            moved += len(data)
            progress.add(len(data))
    except BaseException as exc:
        _abort_source(source)
        _abort_sink(sink, exc)
        progress.finish(error=_describe(exc))
        raise
    try:
        source.close()
    except BaseException as exc:
        # The producer failed after its last byte: whatever arrived is not a
        # whole stream, so the sink must not commit it.
        _abort_sink(sink, exc)
        progress.finish(error=_describe(exc))
        raise
    try:
        sink.close()
    except BaseException as exc:
        progress.finish(error=_describe(exc))
        raise
    progress.finish()
    return moved


# ------------------------------------------------------------- TCP framing
def new_token() -> str:
    """A one-time secret for one stream; it travels only over the broker."""
    return secrets.token_urlsafe(32)


def _hello(token: str) -> bytes:
    if not isinstance(token, str) or not token or not token.isascii() \
            or any(c.isspace() for c in token):
        raise ValidationError("invalid stream token: expected printable ASCII without spaces")
    raw = _MAGIC + token.encode("ascii")
    if len(raw) > HELLO_SIZE:
        raise ValidationError(f"invalid stream token: longer than {HELLO_SIZE - len(_MAGIC)} characters")
    # Fixed size, so the server reads exactly this much and compares in
    # constant time without having to parse anything a stranger sent.
    return raw.ljust(HELLO_SIZE, b" ")


def _recv_exact(sock: socket.socket, n: int, peer: str, what: str) -> bytes:
    """Up to ``n`` bytes; fewer only at end of stream."""
    parts = []
    got = 0
    while got < n:
        try:
            part = sock.recv(n - got)
        except socket.timeout:
            raise DriverError(f"timed out {what} (peer {peer})") from None
        except OSError as exc:
            raise DriverError(f"connection to {peer} failed while {what}: {_describe(exc)}") from None
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _recv_line(sock: socket.socket, peer: str, what: str) -> Optional[str]:
    """One status line, or None when the peer closed without sending one."""
    data = bytearray()
    while len(data) < MAX_STATUS:
        try:
            part = sock.recv(MAX_STATUS - len(data))
        except socket.timeout:
            raise DriverError(f"timed out {what} (peer {peer})") from None
        except OSError:
            break   # reset: same as a close without a status
        if not part:
            break
        data += part
        if b"\n" in data:
            return data.split(b"\n", 1)[0].decode("utf-8", "replace")
    return None


def _send_all(sock: socket.socket, data: bytes, peer: str) -> None:
    try:
        sock.sendall(data)
    except socket.timeout:
        raise DriverError(f"timed out sending the stream to {peer}") from None
    except OSError as exc:
        raise DriverError(f"connection to {peer} lost while sending the stream: "
                          f"{_describe(exc)}") from None


def _no_delay(sock: socket.socket) -> None:
    """Send each frame header at once instead of waiting for the peer's ACK.

    A frame is two writes (header, payload); with Nagle's algorithm and the
    peer's delayed ACKs the small tail of each frame could wait tens of
    milliseconds, a stall per MiB.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class _FrameWriter:
    """Writes a stream as frames: data..., then END, or FAIL with the reason."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer

    def data(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_FRAME):
            piece = view[start:start + MAX_FRAME]
            _send_all(self.sock, _FRAME.pack(_DATA, len(piece)), self.peer)
            _send_all(self.sock, piece, self.peer)

    def end(self) -> None:
        _send_all(self.sock, _FRAME.pack(_END, 0), self.peer)

    def fail_quietly(self, message: str) -> None:
        """Best effort: the peer learns why; never blocks, never raises."""
        payload = message.encode("utf-8", "replace")[:MAX_MESSAGE]
        try:
            self.sock.setblocking(False)
            self.sock.send(_FRAME.pack(_FAIL, len(payload)) + payload)
        except OSError:
            pass   # a full buffer or a dead peer: it will see a truncated stream


class _FrameReader:
    """Reads frames back into a byte stream; a missing END frame is an error."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.remaining = 0       # bytes left in the current data frame
        self.ended = False
        self.received = 0

    def _truncated(self) -> DriverError:
        return DriverError(f"the stream from {self.peer} ended early after {self.received} bytes "
                           "(the sender stopped without finishing)")

    def read(self, n: int) -> bytes:
        while not self.ended:
            if self.remaining:
                try:
                    data = self.sock.recv(min(n, self.remaining))
                except socket.timeout:
                    raise DriverError(f"timed out receiving the stream from {self.peer}") from None
                except OSError as exc:
                    raise DriverError(f"connection to {self.peer} lost after {self.received} "
                                      f"bytes: {_describe(exc)}") from None
                if not data:
                    raise self._truncated()
                self.remaining -= len(data)
                self.received += len(data)
                return data
            header = _recv_exact(self.sock, _FRAME.size, self.peer, "receiving the stream")
            if len(header) < _FRAME.size:
                raise self._truncated()
            kind, length = _FRAME.unpack(header)
            if kind == _DATA and length <= MAX_FRAME:
                self.remaining = length
            elif kind == _END and length == 0:
                self.ended = True
            elif kind == _FAIL and length <= MAX_MESSAGE:
                text = _recv_exact(self.sock, length, self.peer, "receiving an error")
                reason = text.decode("utf-8", "replace") or "no reason given"
                raise DriverError(f"the sender at {self.peer} failed: {reason}")
            else:
                raise DriverError(f"the stream from {self.peer} is garbled "
                                  f"(frame {kind!r} of {length} bytes)")
        return b""


def _connect(host: str, port: int, token: str, connect_timeout: float,
             io_timeout: float) -> Tuple[socket.socket, str]:
    peer = f"{host}:{port}"
    hello = _hello(token)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except socket.timeout:
        raise DriverError(f"timed out connecting to the stream server at {peer}") from None
    except OSError as exc:
        raise DriverError(f"cannot connect to the stream server at {peer}: "
                          f"{exc.strerror or _describe(exc)}") from None
    try:
        _no_delay(sock)
        sock.settimeout(io_timeout)
        ready = b""
        try:
            sock.sendall(hello)
            while len(ready) < len(_READY):
                part = sock.recv(len(_READY) - len(ready))
                if not part:
                    break
                ready += part
        except socket.timeout:
            raise DriverError(f"timed out waiting for the stream server at {peer}") from None
        except OSError:
            ready = b""   # reset: the server dropped us, same as a refusal
        if ready != _READY:
            raise DriverError(f"the stream server at {peer} refused the connection "
                              "(wrong or expired token, or its one transfer already started)")
    except BaseException:
        _close_quietly(sock)
        raise
    return sock, peer


class SocketSink:
    """The connecting end that sends a stream (the NAS uploading to a VM container).

    ``close()`` returns only once the far side's sink has committed: it
    sends the end frame, half-closes, and waits for ``OK`` or ``ERR <why>``.
    """

    def __init__(self, sock: socket.socket, peer: str, *,
                 commit_timeout: float = COMMIT_TIMEOUT) -> None:
        self.sock = sock
        self.peer = peer
        self.commit_timeout = commit_timeout
        self._writer = _FrameWriter(sock, peer)
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
            status = _recv_line(self.sock, self.peer, "reading the receiver's status")
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
        _close_quietly(self.sock)
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
            status = _recv_line(self.sock, self.peer, "waiting for the stream to be stored")
        finally:
            _close_quietly(self.sock)
        if status != "OK":
            raise self._status_error(status)

    def fail(self, message: str) -> None:
        """Stop sending and tell the receiver why, so it discards the stream."""
        if self._closed:
            return
        self._closed = True
        self._writer.fail_quietly(message)
        _close_quietly(self.sock)

    def abort(self) -> None:
        self.fail("the sender aborted the transfer")


class SocketSource:
    """The connecting end that receives a stream (the NAS pulling from a VM container)."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._reader = _FrameReader(sock, peer)
        self._closed = False

    @classmethod
    def connect(cls, host: str, port: int, token: str, *,
                connect_timeout: float = CONNECT_TIMEOUT,
                io_timeout: float = IO_TIMEOUT) -> "SocketSource":
        sock, peer = _connect(host, port, token, connect_timeout, io_timeout)
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
        _close_quietly(self.sock)
        if not self._reader.ended:
            raise DriverError(f"the stream from {self.peer} was closed before its end "
                              f"({self._reader.received} bytes received)")

    def abort(self) -> None:
        self._closed = True
        _close_quietly(self.sock)


class _ServedSource:
    """Serving side of an upload: frames in; the socket stays open for the status."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self._reader = _FrameReader(sock, peer)
        self.peer = peer

    def read(self, n: int) -> bytes:
        return self._reader.read(n)

    def close(self) -> None:
        if not self._reader.ended:
            raise DriverError(f"the stream from {self.peer} was closed before its end")

    def abort(self) -> None:
        pass   # serve_into answers ERR and closes the socket itself


class _ServedSink:
    """Serving side of a pull: frames out, END on success, FAIL with the reason."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._writer = _FrameWriter(sock, peer)
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
            _close_quietly(self.sock)

    def fail(self, message: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.fail_quietly(message)
        _close_quietly(self.sock)

    def abort(self) -> None:
        self.fail("the sender aborted the transfer")


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
        _close_quietly(sock)


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
            self.why = f"connection failed: {_describe(exc)}"
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
        self._expected = _hello(self.token)
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
                              f"{exc.strerror or _describe(exc)}") from None
        return cls(listener, timeout, io_timeout, hello_timeout=hello_timeout,
                   max_handshakes=max_handshakes)

    def __enter__(self) -> "StreamServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            _close_quietly(listener)

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
                _close_quietly(hs.sock)
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
                              f"{_describe(exc)}") from None
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
        _close_quietly(hs.sock)
        self.refused += 1
        if self.refused <= LOGGED_REFUSALS:
            log.warning("refused a stream connection from %s on port %d: %s",
                        hs.peer, self.port, why)

    def _admit(self, hs: "_Handshake") -> bool:
        conn, peer = hs.sock, hs.peer
        try:
            conn.setblocking(True)
            _no_delay(conn)
            conn.settimeout(self.io_timeout)
            _send_all(conn, _READY, peer)
            return True
        except (DriverError, OSError) as exc:
            log.warning("lost the stream connection from %s before it started: %s", peer, exc)
            _close_quietly(conn)
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
            _abort_sink(sink, exc)
            if progress is not None:
                progress.finish(error=_describe(exc))
            raise
        try:
            moved = pump(_ServedSource(conn, peer), sink, rate_limit=rate_limit,
                         progress=progress, cancel=cancel)
        except BaseException as exc:
            message = _describe(exc)[:MAX_STATUS - 8]
            try:
                conn.settimeout(LINGER)
                conn.sendall(f"ERR {message}\n".encode("utf-8", "replace"))
            except OSError:
                pass   # the peer is gone; it will see no status
            _linger_close(conn)
            raise
        try:
            _send_all(conn, b"OK\n", peer)
        finally:
            _close_quietly(conn)
        return moved

    def serve_from(self, source: ByteSource, *, rate_limit: Optional[int] = None,
                   progress: Optional[Progress] = None,
                   cancel: Optional[threading.Event] = None) -> int:
        """Send ``source`` to the peer; a producer failure reaches it as an error frame."""
        try:
            conn, peer = self.accept(cancel)
        except BaseException as exc:
            _abort_source(source)
            if progress is not None:
                progress.finish(error=_describe(exc))
            raise
        return pump(source, _ServedSink(conn, peer), rate_limit=rate_limit,
                    progress=progress, cancel=cancel)


# ---------------------------------------------------------------------- ssh
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


def _ssh_argv(user: str, host: str, remote: List[str]) -> List[str]:
    for kind, value in (("user", user), ("host", host)):
        if not value or value.startswith("-") or "@" in value or any(c.isspace() for c in value):
            # ssh would read it as an option or a different destination.
            raise ValidationError(f"invalid ssh {kind} {value!r}")
    # ssh joins the remote command's words with spaces and hands the result
    # to the remote user's shell.  Pool, zvol and snapshot names were
    # validated (imgstorage.naming) before reaching here; quoting each word
    # anyway keeps the remote argv exactly the local one if that ever changes.
    return ["ssh", *SSH_OPTIONS, f"{user}@{host}", *(shlex.quote(word) for word in remote)]


def ssh_source(runner: Runner, user: str, host: str, pool: str, zvol: str, snap: str,
               base: Optional[str] = None, resume_token: Optional[str] = None) -> ByteSource:
    """``zfs send`` on ``host``, read through ssh (the pull of a VM container's copy).

    With ``resume_token`` (the receiver's, after a cut resumable receive) the
    remote command is ``zfs send -t TOKEN``, which continues where the
    receiver stopped; the token names the snapshot, so ``snap`` and ``base``
    are not used then.  The token is checked before it goes on the command line.
    """
    if resume_token is not None:
        remote = send_resume_argv(check_resume_token(resume_token))
    else:
        remote = send_argv(pool, zvol, snap, base)
    return CommandSource(runner, _ssh_argv(user, host, remote))


def ssh_sink(runner: Runner, user: str, host: str, pool: str, zvol: str,
             resumable: bool = False) -> ByteSink:
    """``zfs receive -F`` on ``host``, written through ssh (the upload to a VM container).

    ``resumable`` makes it ``zfs receive -s -F``: a stream cut short (the
    connection broke) leaves a resume token on ``host`` instead of nothing.
    """
    return CommandSink(runner, _ssh_argv(user, host, receive_argv(pool, zvol, resumable)))
