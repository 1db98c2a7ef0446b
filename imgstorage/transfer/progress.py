"""What a running transfer has done, readable while it runs (listings, ETAs, replies)."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, Optional, Tuple

RATE_WINDOW = 5.0          # seconds of history behind Progress.rate()
RATE_SAMPLE_SPACING = 0.1  # at most one rate sample per this many seconds


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

