"""Background transfers of the NAS: at most one per zvol, cancellable, measured.

The sync scheduler starts jobs; an operator's unmap blocks new jobs for the
zvol and cancels the running one before it changes the zvol's state, so a
periodic pull can never race an unmap (the original treated a half-finished
pull as the final sync).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Set

from ..transfer import Progress

log = logging.getLogger(__name__)


@dataclass
class Job:
    zvol: str
    kind: str                                   # upload | pull | final_pull | release | merge_check
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)


class Jobs:
    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync")
        self._lock = threading.Lock()
        self._jobs: Dict[str, Job] = {}
        self._blocked: Set[str] = set()

    def get(self, zvol: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(zvol)

    def count(self) -> int:
        """Jobs running or waiting for a worker (the metrics' saturation of the pool)."""
        with self._lock:
            return len(self._jobs)

    def start(self, zvol: str, kind: str, work: Callable[[Job], None]) -> Optional[Job]:
        """Run ``work`` for ``zvol`` unless a job runs or an operator holds the zvol."""
        with self._lock:
            if zvol in self._jobs or zvol in self._blocked:
                return None
            job = Job(zvol, kind)
            self._jobs[zvol] = job

        def run() -> None:
            try:
                work(job)
            except Exception:  # work functions log their own failures; this is a bug trap
                log.exception("%s of %s crashed", kind, zvol)
            finally:
                with self._lock:
                    self._jobs.pop(zvol, None)
                job.done.set()

        self._pool.submit(run)
        return job

    @contextmanager
    def held(self, zvol: str, wait: float = 120.0) -> Iterator[None]:
        """Keep the scheduler off ``zvol`` and cancel what runs on it, for an operator's request."""
        with self._lock:
            self._blocked.add(zvol)
            job = self._jobs.get(zvol)
        try:
            if job is not None:
                log.info("cancelling %s of %s for an operator request", job.kind, zvol)
                job.cancel.set()
                if not job.done.wait(wait):
                    raise TimeoutError(f"the {job.kind} of {zvol} did not stop within {wait:g} s")
            yield
        finally:
            with self._lock:
                self._blocked.discard(zvol)

    def shutdown(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        self._pool.shutdown(wait=True)
