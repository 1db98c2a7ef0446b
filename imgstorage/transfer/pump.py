"""The pump: one stream from a source into a sink, throttled, counted and cancellable.

The order of the endings is what keeps a receiver from committing a stream
whose producer failed; see :func:`pump`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from ..drivers.base import ByteSink, ByteSource
from ..errors import ImgStorageError, ValidationError
from .progress import Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# At low limits a whole chunk would be one burst every few seconds; smaller
# reads keep the flow (and the progress figures) smooth: about 4 per second.
MIN_THROTTLED_READ = 4096
THROTTLED_READS_PER_SECOND = 4


class TransferCancelled(ImgStorageError):
    """The operator (or a shutting-down daemon) stopped the transfer."""

    def __init__(self, message: str = "the transfer was cancelled") -> None:
        super().__init__(message)


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


def describe(exc: BaseException) -> str:
    """One line, never empty: for logs, status lines and FAIL frames."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def abort_source(source: ByteSource) -> None:
    """Abort, logging rather than raising: the failure that led here is the one to report."""
    try:
        source.abort()
    except Exception:   # abort must never hide the original failure
        log.exception("aborting a stream source failed")


def abort_sink(sink: ByteSink, reason: BaseException) -> None:
    """Abort the sink, telling it why when it can pass that on (a socket peer)."""
    try:
        fail = getattr(sink, "fail", None)
        if callable(fail):
            fail(describe(reason))
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
        abort_source(source)
        abort_sink(sink, exc)
        progress.finish(error=describe(exc))
        raise
    try:
        source.close()
    except BaseException as exc:
        # The producer failed after its last byte: whatever arrived is not a
        # whole stream, so the sink must not commit it.
        abort_sink(sink, exc)
        progress.finish(error=describe(exc))
        raise
    try:
        sink.close()
    except BaseException as exc:
        progress.finish(error=describe(exc))
        raise
    progress.finish()
    return moved

