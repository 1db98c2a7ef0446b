"""A starting daemon waits for the pools its zvols live on.

After a reboot the daemon may start before ZFS has imported its pools (slow
disks, a pool imported by hand, a unit ordering a distribution got wrong).
Serving then would fail every request on those zvols, and recovery would take
the missing zvols for lost.  So before recovery the daemon waits for every
pool its database names (and ``default_pool``), saying which pool it waits
for and which zvols need it, and goes on as soon as they are all there.

The wait is bounded by ``pool_wait`` (seconds): a pool that never comes back
must not keep the zvols of the other pools from being served, so after that
time the daemon starts anyway and says which zvols will fail.  SIGTERM or
SIGINT during the wait ends the daemon at once (exit status 0): nothing has
been touched yet.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from sqlalchemy import Engine, select
from sqlalchemy.orm import InstrumentedAttribute

from .config import Config
from .errors import ImgStorageError

log = logging.getLogger(__name__)

POLL = 1.0          # seconds between two looks at the pools
REMIND = 60.0       # seconds between two reminders of what is still missing


def pools_in_use(engine: Engine, pool_column: InstrumentedAttribute) -> Dict[str, List[str]]:
    """Each pool named in ``pool_column`` with the zvols of its table that need it."""
    model = pool_column.class_
    needs: Dict[str, List[str]] = {}
    with engine.connect() as conn:
        for zvol, pool in conn.execute(select(model.zvol, pool_column)
                                       .where(pool_column.is_not(None))
                                       .order_by(model.zvol)):
            if pool:
                needs.setdefault(pool, []).append(zvol)
    return needs


def _missing(zfs, pools: List[str]) -> Dict[str, str]:
    """The pools that are not there, each with why (a failing ``zpool`` says why)."""
    missing = {}
    for pool in pools:
        try:
            if not zfs.pool_exists(pool):
                missing[pool] = "is not imported"
        except (ImgStorageError, OSError) as exc:
            missing[pool] = f"cannot be listed: {exc}"
    return missing


def _who(needs: Dict[str, List[str]], pool: str) -> str:
    zvols = needs.get(pool) or []
    return ", ".join(zvols) if zvols else "no zvol yet (default_pool)"


class _Signals:
    """SIGTERM and SIGINT set ``stop`` while the wait runs (main thread only)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.saved: Dict[int, object] = {}
        self.signum: Optional[int] = None

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        self.stop.set()

    def __exit__(self, *_exc) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)


def wait_for_pools(cfg: Config, engine: Engine, zfs, pool_column: InstrumentedAttribute,
                   stop: Optional[threading.Event] = None,
                   clock: Callable[[], float] = time.monotonic,
                   poll: float = POLL, remind: float = REMIND) -> bool:
    """Return once every needed pool is there (True) or ``pool_wait`` ran out (False).

    ``pool_column`` is the column of the daemon's zvol table that names each
    zvol's pool.  A signal during the wait exits the process.
    """
    needs = pools_in_use(engine, pool_column)
    if cfg.default_pool:
        needs.setdefault(cfg.default_pool, [])
    missing = _missing(zfs, sorted(needs))
    if not missing:
        return True
    stop = stop or threading.Event()
    started = clock()
    bound = cfg.pool_wait
    reminded = started
    with _Signals(stop) as signals:
        for pool, why in missing.items() if bound > 0 else ():
            log.warning("pool %s %s; zvols that need it: %s; waiting up to %.0fs for it "
                        "before serving", pool, why, _who(needs, pool), bound)
        while True:
            now = clock()
            if now - started >= bound:
                break
            if stop.wait(poll):
                if signals.signum is None:
                    return False
                log.info("received signal %d while waiting for pool(s) %s; stopping",
                         signals.signum, ", ".join(missing))
                sys.exit(0)
            still = _missing(zfs, list(missing))
            now = clock()
            for pool in [p for p in missing if p not in still]:
                log.info("pool %s is there after %.1fs", pool, now - started)
            missing = still
            if not missing:
                return True
            if now - reminded >= remind:
                reminded = now
                for pool, why in missing.items():
                    log.warning("still waiting for pool %s (it %s) after %.0fs; zvols that need "
                                "it: %s", pool, why, now - started, _who(needs, pool))
    for pool, why in missing.items():
        log.error("pool %s %s after %.0fs: serving anyway; requests on its zvols "
                  "(%s) fail until it is imported", pool, why, clock() - started,
                  _who(needs, pool))
    return False
