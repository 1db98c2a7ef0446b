"""The merge monitor switches the zvols merged at one tick side by side, each under its lock."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

from imgstorage.errors import DriverError
from imgstorage.vm.states import Event, State
from imgstorage.vm.sync import ContainerSync

MERGING = State.MERGING.value


class FakeService:
    """Just what the monitor asks of the container's service."""

    def __init__(self, zvols, busy=()):
        self.drivers = SimpleNamespace()
        self.notify = lambda node, message: None
        self.rows_ = {z: SimpleNamespace(zvol=z, state=MERGING) for z in zvols}
        self.busy = set(busy)
        self.events = []
        self.store = SimpleNamespace(transition=self.transition)
        self.rebuilder = SimpleNamespace(retry_due=lambda: None)

    def transition(self, zvol, event):
        self.events.append((zvol, event))
        if event is Event.SWITCHED:
            self.rows_[zvol].state = State.LOCAL.value

    def rows(self, state):
        return [r for r in self.rows_.values() if r.state == state.value]

    def row(self, zvol):
        return self.rows_.get(zvol)

    @contextmanager
    def zvol_lock(self, zvol, raise_busy=True):
        yield zvol not in self.busy


def monitor(service, figures):
    sync = ContainerSync(service)
    sync.merge_figures = figures
    sync.report_merged = lambda row: None
    return sync


def test_zvols_merged_at_one_tick_are_switched_side_by_side():
    zvols = [f"vm{i}" for i in range(4)]
    service = FakeService(zvols)
    together = threading.Barrier(len(zvols), timeout=30)   # broken unless all four wait at once
    sync = monitor(service, lambda zvol: (8, 100, 8))

    def finish_switch(row):
        together.wait()
    sync.finish_switch = finish_switch
    try:
        sync.tick()
    finally:
        sync.stop()
    assert not together.broken
    assert sorted(service.events) == sorted(
        [(z, Event.MERGED) for z in zvols] + [(z, Event.SWITCHED) for z in zvols])
    assert all(service.row(z).state == State.LOCAL.value for z in zvols)


def test_a_busy_zvol_an_unmerged_one_and_one_without_figures_wait_for_a_later_tick():
    service = FakeService(["busy", "merging", "gone", "done"], busy={"busy"})

    def figures(zvol):
        if zvol == "gone":
            raise DriverError("dmsetup status: No such device or address")
        return (8, 100, 50) if zvol == "merging" else (8, 100, 8)
    sync = monitor(service, figures)
    switched = []
    sync.finish_switch = lambda row: switched.append(row.zvol)
    try:
        sync.tick()
    finally:
        sync.stop()
    assert switched == ["done"]
    assert [service.row(z).state for z in ("busy", "merging", "gone")] == [MERGING] * 3
