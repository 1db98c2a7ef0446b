"""The TCP streams' wire format: the token hello, length-prefixed frames, status lines.

A stream travels as DATA frames and ends with an END frame, or a FAIL frame
carrying the sender's reason; a connection that drops mid-stream therefore
never passes for a complete stream.  Also here: the small socket functions
both ends share, which turn socket errors into one-line DriverErrors.
"""
from __future__ import annotations

import secrets
import socket
import struct
from typing import Optional

from ..errors import DriverError, ValidationError
from .pump import describe

HELLO_SIZE = 64
MAGIC = b"IMGSTREAM1 "
READY = b"IMGSTREAM1 READY\n"
FRAME = struct.Struct("!cI")
DATA, END, FAIL = b"D", b"E", b"X"
MAX_FRAME = 16 << 20
MAX_MESSAGE = 8192
MAX_STATUS = 4096


def new_token() -> str:
    """A one-time secret for one stream; it travels only over the broker."""
    return secrets.token_urlsafe(32)


def hello(token: str) -> bytes:
    """What a client sends first: the magic and its token, padded to HELLO_SIZE."""
    if not isinstance(token, str) or not token or not token.isascii() \
            or any(c.isspace() for c in token):
        raise ValidationError("invalid stream token: expected printable ASCII without spaces")
    raw = MAGIC + token.encode("ascii")
    if len(raw) > HELLO_SIZE:
        raise ValidationError(f"invalid stream token: longer than {HELLO_SIZE - len(MAGIC)} characters")
    # Fixed size, so the server reads exactly this much and compares in
    # constant time without having to parse anything a stranger sent.
    return raw.ljust(HELLO_SIZE, b" ")


def recv_exact(sock: socket.socket, n: int, peer: str, what: str) -> bytes:
    """Up to ``n`` bytes; fewer only at end of stream."""
    parts = []
    got = 0
    while got < n:
        try:
            part = sock.recv(n - got)
        except socket.timeout:
            raise DriverError(f"timed out {what} (peer {peer})") from None
        except OSError as exc:
            raise DriverError(f"connection to {peer} failed while {what}: {describe(exc)}") from None
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def recv_line(sock: socket.socket, peer: str, what: str) -> Optional[str]:
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


def send_all(sock: socket.socket, data: bytes, peer: str) -> None:
    try:
        sock.sendall(data)
    except socket.timeout:
        raise DriverError(f"timed out sending the stream to {peer}") from None
    except OSError as exc:
        raise DriverError(f"connection to {peer} lost while sending the stream: "
                          f"{describe(exc)}") from None


def no_delay(sock: socket.socket) -> None:
    """Send each frame header at once instead of waiting for the peer's ACK.

    A frame is two writes (header, payload); with Nagle's algorithm and the
    peer's delayed ACKs the small tail of each frame could wait tens of
    milliseconds, a stall per MiB.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


class FrameWriter:
    """Writes a stream as frames: data..., then END, or FAIL with the reason."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer

    def data(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_FRAME):
            piece = view[start:start + MAX_FRAME]
            send_all(self.sock, FRAME.pack(DATA, len(piece)), self.peer)
            send_all(self.sock, piece, self.peer)

    def end(self) -> None:
        send_all(self.sock, FRAME.pack(END, 0), self.peer)

    def fail_quietly(self, message: str) -> None:
        """Best effort: the peer learns why; never blocks, never raises."""
        payload = message.encode("utf-8", "replace")[:MAX_MESSAGE]
        try:
            self.sock.setblocking(False)
            self.sock.send(FRAME.pack(FAIL, len(payload)) + payload)
        except OSError:
            pass   # a full buffer or a dead peer: it will see a truncated stream


class FrameReader:
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
                                      f"bytes: {describe(exc)}") from None
                if not data:
                    raise self._truncated()
                self.remaining -= len(data)
                self.received += len(data)
                return data
            header = recv_exact(self.sock, FRAME.size, self.peer, "receiving the stream")
            if len(header) < FRAME.size:
                raise self._truncated()
            kind, length = FRAME.unpack(header)
            if kind == DATA and length <= MAX_FRAME:
                self.remaining = length
            elif kind == END and length == 0:
                self.ended = True
            elif kind == FAIL and length <= MAX_MESSAGE:
                text = recv_exact(self.sock, length, self.peer, "receiving an error")
                reason = text.decode("utf-8", "replace") or "no reason given"
                raise DriverError(f"the sender at {self.peer} failed: {reason}")
            else:
                raise DriverError(f"the stream from {self.peer} is garbled "
                                  f"(frame {kind!r} of {length} bytes)")
        return b""


