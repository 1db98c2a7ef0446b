"""Run one job per item on a bounded number of threads, reporting each as it ends.

Starting fifty VMs one after the other makes the operator wait fifty times
for a NAS and a hypervisor that could have served several at once; starting
them all at once would open fifty broker connections and pile the work on a
few nodes.  So a command hands its items to at most ``limit`` worker threads.

Each worker owns what it talks through (``resources``: its own broker
connection, which is not thread-safe, and its own hypervisor handle), made
when the thread starts and released when it ends.  The caller's thread only
collects outcomes, in the order the jobs finish, and is the only one that
prints, so one item's lines never interleave with another's.

A job that fails fails alone: its exception becomes its outcome and the other
items go on.  Ctrl-C stops handing out items, lets the jobs already running
finish (a half-started VM is worse than a started one) and reports which items
were never tried; a second Ctrl-C stops waiting.

The command line must start quickly: this module is imported only by a
command that has several items, and the terminal library of the progress
display only when a terminal is there to draw on.
"""
from __future__ import annotations

import queue
import sys
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, List, Optional, Sequence, TextIO, TypeVar

import click

T = TypeVar("T")
W = TypeVar("W")

TICK = 0.5          # seconds between refreshes of the progress display while nothing ends


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """How one item's job ended: ``error`` is what it raised, None when it succeeded."""

    item: T
    index: int
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Report(Generic[T]):
    """Everything a run did: outcomes in the order they ended, and what never ran."""

    outcomes: List[Outcome[T]] = field(default_factory=list)
    not_run: List[T] = field(default_factory=list)
    interrupted: bool = False

    @property
    def failed(self) -> List[Outcome[T]]:
        return sorted((o for o in self.outcomes if not o.ok), key=lambda o: o.index)

    @property
    def succeeded(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)


_FINISHED = object()    # a worker thread's last message


def run_bounded(items: Sequence[T], job: Callable[[W, T], Any], *, limit: int,
                resources: Callable[[], AbstractContextManager] = nullcontext,
                on_done: Callable[[Outcome[T]], None] = lambda outcome: None,
                on_idle: Callable[[], None] = lambda: None,
                tick: float = TICK) -> Report[T]:
    """Run ``job(resource, item)`` for every item, at most ``limit`` at a time.

    ``resources()`` is entered once in each worker thread and its value given
    to every job that thread runs; if entering it fails, every item that thread
    takes fails with that error (so nothing waits for a thread that is gone).
    ``on_done`` runs in the calling thread as each job ends; ``on_idle`` runs
    there every ``tick`` seconds while none does.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    todo: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
    for index, item in enumerate(items):
        todo.put((index, item))
    results: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        try:
            try:
                context = resources()
                resource = context.__enter__()
            except BaseException as exc:            # noqa: B902 (reported per item)
                _fail_all(exc)
                return
            try:
                while not stop.is_set():
                    try:
                        index, item = todo.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        job(resource, item)
                    except Exception as exc:        # one item's failure is its outcome
                        results.put(Outcome(item, index, exc))
                    else:
                        results.put(Outcome(item, index))
            finally:
                context.__exit__(None, None, None)
        finally:
            results.put(_FINISHED)

    def _fail_all(exc: BaseException) -> None:
        while not stop.is_set():
            try:
                index, item = todo.get_nowait()
            except queue.Empty:
                return
            results.put(Outcome(item, index, exc))

    report: Report[T] = Report()
    threads = [threading.Thread(target=worker, name=f"parallel-{n}")
               for n in range(min(limit, len(items)))]
    for thread in threads:
        thread.start()
    running = [len(threads)]
    try:
        _collect(results, running, report, on_done, on_idle, tick)
    except KeyboardInterrupt:
        stop.set()
        report.interrupted = True
        _collect(results, running, report, on_done, on_idle, tick)   # a second Ctrl-C escapes
    except BaseException:
        stop.set()
        raise
    done = {o.index for o in report.outcomes}
    report.not_run = [item for index, item in enumerate(items) if index not in done]
    return report


def _collect(results: "queue.SimpleQueue[Any]", running: List[int], report: Report,
             on_done: Callable[[Outcome], None], on_idle: Callable[[], None],
             tick: float) -> None:
    while running[0]:
        try:
            message = results.get(timeout=tick)
        except queue.Empty:
            on_idle()
            continue
        if message is _FINISHED:
            running[0] -= 1
            continue
        report.outcomes.append(message)
        on_done(message)


# ---------------------------------------------------------------- progress
def terminal_wanted(stream: Optional[TextIO] = None) -> bool:
    """A progress display only where a person watches: ``stream`` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # closed or not a real file
        return False


class Progress:
    """How many items are done and how many failed, drawn on stderr when it is a terminal.

    Without a terminal it draws nothing and ``line`` is a plain print, so the
    output of a script is exactly the items' own lines.  With one, ``line``
    lifts the bar, prints, and puts it back, so results and bar never mix.
    """

    def __init__(self, total: int, what: str, enabled: bool):
        self.total = total
        self.what = what
        self.failed = 0
        self._bar: Any = None
        if enabled and total > 0:
            from tqdm import tqdm                 # only now: a terminal is there to draw on
            self._tqdm = tqdm
            self._bar = tqdm(total=total, desc=what, unit="VM", file=sys.stderr, leave=False,
                             dynamic_ncols=True, mininterval=0.2, postfix="failed=0")

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def line(self, text: str, err: bool = False) -> None:
        if self._bar is None:
            click.echo(text, err=err)
            (sys.stderr if err else sys.stdout).flush()
            return
        self._tqdm.write(text, file=sys.stderr if err else sys.stdout)

    def advance(self, ok: bool) -> None:
        if not ok:
            self.failed += 1
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"failed={self.failed}", refresh=False)
        self._bar.update(1)

    def refresh(self) -> None:
        if self._bar is not None:
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
