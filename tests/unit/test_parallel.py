"""The bounded parallel runner and its progress display, with jobs the tests hold and release.

Every job here waits for an event the test sets, so the order in which jobs
end, and how many run at once, are decided by the test and not by timing.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Dict, List

import pytest

from imgstorage.frontend.parallel import Progress, Report, run_bounded, terminal_wanted

WAIT = 10.0     # a safety net for a broken runner; a correct one never comes near it


class Gates:
    """One event per item: its job runs until the test opens its gate."""

    def __init__(self, items) -> None:
        self.cond = threading.Condition()
        self.gates = {item: threading.Event() for item in items}
        self.entered: List = []
        self.ended: List = []
        self.active = 0
        self.peak = 0

    def job(self, _resource, item) -> None:
        with self.cond:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.entered.append(item)
            self.cond.notify_all()
        try:
            assert self.gates[item].wait(WAIT), f"job {item} was never released"
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()

    def on_done(self, outcome) -> None:
        with self.cond:
            self.ended.append(outcome.item)
            self.cond.notify_all()

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT), f"waited for {what}: entered " \
                f"{self.entered}, ended {self.ended}, active {self.active}"

    def release(self, item) -> None:
        self.gates[item].set()


def in_background(run: Callable[[], Report]) -> Callable[[], Report]:
    """Start ``run`` on a thread; the returned function joins it and gives its report."""
    box: Dict[str, object] = {}

    def target() -> None:
        try:
            box["report"] = run()
        except BaseException as exc:   # re-raised in the test's thread
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Report:
        thread.join(WAIT)
        assert not thread.is_alive(), "the runner did not return"
        if "error" in box:
            raise box["error"]
        return box["report"]
    return join


def test_outcomes_arrive_in_the_order_the_jobs_end():
    g = Gates("abc")
    join = in_background(lambda: run_bounded(list("abc"), g.job, limit=3, on_done=g.on_done))
    g.wait_for("all three running", lambda: g.active == 3)
    for n, item in enumerate("cab", start=1):
        g.release(item)
        g.wait_for(f"{item} reported", lambda n=n: len(g.ended) == n)
    report = join()
    assert g.ended == ["c", "a", "b"]
    assert [o.item for o in report.outcomes] == ["c", "a", "b"]
    assert [o.index for o in report.outcomes] == [2, 0, 1]
    assert report.succeeded == 3 and report.failed == [] and report.not_run == []
    assert not report.interrupted


def test_never_more_jobs_at_once_than_the_limit_and_the_limit_is_used():
    items, limit = list(range(12)), 3
    g = Gates(items)
    join = in_background(lambda: run_bounded(items, g.job, limit=limit, on_done=g.on_done))
    released: set = set()
    for _ in items:
        # after each release a freed worker takes the next item: again `limit` running,
        # until fewer items than that are left
        expect = min(limit, len(items) - len(released))
        g.wait_for(f"{expect} running", lambda: g.active == expect
                   and len(set(g.entered) - released) == expect)
        oldest = next(i for i in g.entered if i not in released)
        released.add(oldest)
        g.release(oldest)
    report = join()
    assert g.peak == limit
    assert sorted(o.item for o in report.outcomes) == items
    assert g.entered == items               # handed out in the order given


def test_each_worker_has_its_own_resource_made_and_released_in_its_thread():
    made: List[tuple] = []
    lock = threading.Lock()

    @contextmanager
    def resource():
        mine = {"thread": threading.get_ident(), "closed": False}
        with lock:
            made.append(mine)
        yield mine
        mine["closed"] = threading.get_ident()

    seen: List[tuple] = []

    def job(res, item):
        assert res["thread"] == threading.get_ident()   # never shared between threads
        with lock:
            seen.append((item, id(res)))

    report = run_bounded(list(range(10)), job, limit=4, resources=resource)
    assert report.succeeded == 10
    assert len(made) == 4                               # one per worker thread
    assert all(m["closed"] == m["thread"] for m in made)
    assert {r for _, r in seen} <= {id(m) for m in made}

    made.clear()
    run_bounded(["only"], job, limit=8, resources=resource)
    assert len(made) == 1                               # no idle workers for few items


def test_a_failing_job_fails_alone():
    def job(_res, item):
        if item in (1, 3):
            raise ValueError(f"item {item} is bad")

    done: List = []
    report = run_bounded(list(range(6)), job, limit=2, on_done=done.append)
    assert report.succeeded == 4
    assert [(o.item, str(o.error)) for o in report.failed] == [(1, "item 1 is bad"),
                                                              (3, "item 3 is bad")]
    assert sorted(o.item for o in done) == list(range(6))
    assert all(o.ok == (o.item not in (1, 3)) for o in report.outcomes)
    assert report.not_run == [] and not report.interrupted


def test_a_worker_whose_resource_cannot_be_made_fails_its_items_without_hanging():
    def broken():
        raise OSError("no connection")

    report = run_bounded(list("xyz"), lambda res, item: None, limit=2, resources=broken)
    assert sorted(o.item for o in report.failed) == list("xyz")
    assert all(isinstance(o.error, OSError) for o in report.outcomes)


def test_an_interrupt_stops_handing_out_items_and_lets_running_ones_finish():
    items = list(range(6))
    gate = threading.Event()
    interrupted = threading.Event()

    def job(_res, item):
        if item > 0:
            assert gate.wait(WAIT)

    def on_done(outcome):
        if outcome.item == 0:
            interrupted.set()
            raise KeyboardInterrupt

    def on_idle():
        if interrupted.is_set():     # the runner is draining: let the job in flight end
            gate.set()

    report = run_bounded(items, job, limit=1, on_done=on_done, on_idle=on_idle, tick=0.01)
    assert report.interrupted
    ran = [o.item for o in report.outcomes]
    assert ran in ([0], [0, 1])      # item 1 finishes if it had been taken already
    assert report.not_run == items[len(ran):]
    assert all(o.ok for o in report.outcomes)


def test_an_error_in_the_callers_thread_propagates_after_stopping_the_workers():
    def on_done(outcome):
        raise OSError("broken pipe")

    with pytest.raises(OSError, match="broken pipe"):
        run_bounded(list(range(20)), lambda res, item: None, limit=2, on_done=on_done)


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError):
        run_bounded([1], lambda res, item: None, limit=0)


# ---------------------------------------------------------------- progress
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_where_stderr_is_a_terminal(monkeypatch):
    assert terminal_wanted(io.StringIO()) is False
    assert terminal_wanted(Tty()) is True
    closed = io.StringIO()
    closed.close()
    assert terminal_wanted(closed) is False
    monkeypatch.setattr(sys, "stderr", Tty())
    assert terminal_wanted() is True


def test_without_a_terminal_no_library_is_loaded_and_lines_are_plain(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)      # importing it would now fail
    with Progress(3, "starting VMs", enabled=False) as shown:
        shown.line("vm-1 started")
        shown.advance(True)
        shown.line("error - vm-2: broken", err=True)
        shown.advance(False)
        shown.refresh()
    assert not shown.shown and shown.failed == 1
    out, err = capsys.readouterr()
    assert out == "vm-1 started\n"
    assert err == "error - vm-2: broken\n"


def test_on_a_terminal_the_bar_counts_done_and_failed_and_lines_stay_whole(monkeypatch):
    out, err = Tty(), Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(3, "stopping VMs", enabled=True) as shown:
        assert shown.shown
        shown.line("vm-1 stopped")
        shown.advance(True)
        shown.advance(False)
        shown.line("error - vm-2: broken", err=True)
        bar = err.getvalue()
    assert out.getvalue() == "vm-1 stopped\n"
    assert "stopping VMs" in bar and "2/3" in bar and "failed=1" in bar
    assert "error - vm-2: broken\n" in err.getvalue()


def test_the_command_line_starts_without_the_runner_or_the_terminal_library():
    code = ("import sys, imgstorage.frontend.cli; "
            "print(sorted(m for m in ('tqdm', 'imgstorage.frontend.parallel') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
