"""Writers of one database committed together: each still returns after its own commit."""
from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable, List, Set

import pytest
from sqlalchemy import text

from imgstorage import groupcommit
from imgstorage.db import make_engine
from imgstorage.groupcommit import GroupCommit, group_commit


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "gc.db")
    engine = make_engine(path)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER PRIMARY KEY)")
    return path, engine


def committed(path: str) -> List[int]:
    """What another connection sees: only what is committed."""
    con = sqlite3.connect(path)
    try:
        return sorted(v for (v,) in con.execute("SELECT v FROM t"))
    finally:
        con.close()


def add(value: int):
    return lambda s: s.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": value})


def insert(group: GroupCommit, value: int, durable: bool = True) -> None:
    group.run(add(value), durable)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class Gates:
    """Batch commits that wait for the test to open their gate (one gate per commit);
    the commits numbered in ``fail`` fail as a full disk would.  ``sizes``: the
    changes each batch ran."""

    def __init__(self, monkeypatch, count: int, fail: Set[int] = frozenset()):
        self.gates = [threading.Event() for _ in range(count)]
        self.sizes: List[int] = []
        self.commits = 0
        run_batch, finish = GroupCommit._run_batch, groupcommit._Batch.finish

        def counted(group, tasks) -> None:
            self.sizes.append(len(tasks))
            run_batch(group, tasks)

        def gated(batch, keep: bool) -> None:
            n = self.commits
            self.commits += 1
            if n < len(self.gates):
                assert self.gates[n].wait(10), "gate never opened"
            if n in fail:
                batch.conn.rollback()
                batch.conn.close()
                raise sqlite3.OperationalError("disk I/O error")
            finish(batch, keep)
        monkeypatch.setattr(GroupCommit, "_run_batch", counted)
        monkeypatch.setattr(groupcommit._Batch, "finish", gated)


def start(fn: Callable[[], None]) -> threading.Thread:
    errors: List[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors            # type: ignore[attr-defined]
    thread.start()
    return thread


def queued(group: GroupCommit, n: int) -> Callable[[], bool]:
    return lambda: len(group._queue) == n


def test_a_write_is_committed_when_it_returns_and_gives_its_result(db):
    path, engine = db
    group = group_commit(engine)
    assert group.run(lambda s: add(1)(s) and "done") == "done"
    assert committed(path) == [1]
    assert group_commit(engine) is group


def test_writers_arriving_during_a_commit_share_the_next_one(db, monkeypatch):
    path, engine = db
    gates = Gates(monkeypatch, 1)
    group = group_commit(engine)
    first = start(lambda: insert(group, 1))
    wait_for(lambda: gates.commits == 1)             # its commit is being "synced"
    others = [start(lambda v=v: insert(group, v)) for v in (2, 3, 4)]
    wait_for(queued(group, 3))
    assert committed(path) == []
    gates.gates[0].set()
    for t in [first] + others:
        t.join(10)
        assert not t.is_alive() and t.errors == []
    assert gates.sizes == [1, 3]                      # two commits for four writers
    assert committed(path) == [1, 2, 3, 4]


def test_a_failing_change_rolls_back_alone_and_its_writer_hears_why(db, monkeypatch):
    path, engine = db
    gates = Gates(monkeypatch, 1)
    group = group_commit(engine)

    def failing(s) -> None:
        add(20)(s)
        raise RuntimeError("changed its mind")

    first = start(lambda: insert(group, 1))
    wait_for(lambda: gates.commits == 1)
    good = start(lambda: insert(group, 10))
    wait_for(queued(group, 1))
    bad = start(lambda: group.run(failing))
    wait_for(queued(group, 2))
    late = start(lambda: insert(group, 30))
    wait_for(queued(group, 3))
    gates.gates[0].set()
    for t in (first, good, bad, late):
        t.join(10)
    assert [str(e) for e in bad.errors] == ["changed its mind"]
    assert good.errors == late.errors == []
    assert gates.sizes == [1, 3]
    assert committed(path) == [1, 10, 30]


def test_a_failed_commit_reaches_every_writer_in_it(db, monkeypatch):
    path, engine = db
    gates = Gates(monkeypatch, 1, fail={1})
    group = group_commit(engine)
    first = start(lambda: insert(group, 1))
    wait_for(lambda: gates.commits == 1)
    others = [start(lambda v=v: insert(group, v)) for v in (2, 3)]
    wait_for(queued(group, 2))
    gates.gates[0].set()
    for t in [first] + others:
        t.join(10)
    assert first.errors == []
    assert [str(e) for t in others for e in t.errors] == ["disk I/O error"] * 2
    assert committed(path) == [1]
    insert(group, 4)                                  # the next writer starts afresh
    assert committed(path) == [1, 4]


def test_a_change_that_writes_again_makes_that_part_of_itself(db):
    path, engine = db
    group = group_commit(engine)

    def outer(s) -> None:
        add(1)(s)
        insert(group, 2)
        assert committed(path) == []
    group.run(outer)
    assert committed(path) == [1, 2]


def test_a_non_durable_write_does_not_wait_for_its_commit(db, monkeypatch):
    path, engine = db
    gates = Gates(monkeypatch, 2)
    group = group_commit(engine)
    first = start(lambda: insert(group, 1))
    wait_for(lambda: gates.commits == 1)
    durable = start(lambda: insert(group, 2))
    wait_for(queued(group, 1))
    quick = start(lambda: insert(group, 3, durable=False))
    wait_for(queued(group, 2))
    gates.gates[0].set()
    quick.join(10)
    assert not quick.is_alive() and quick.errors == []    # back before its commit ...
    assert gates.commits == 2 and durable.is_alive()      # ... which the leader holds
    assert committed(path) == [1]
    gates.gates[1].set()
    durable.join(10)
    first.join(10)
    assert durable.errors == [] and first.errors == [] and committed(path) == [1, 2, 3]


def test_a_lone_non_durable_write_commits_at_once(db):
    path, engine = db
    insert(group_commit(engine), 5, durable=False)
    assert committed(path) == [5]


def test_an_interrupted_batch_keeps_nothing_and_leaves_nobody_waiting(db, monkeypatch):
    path, engine = db
    gates = Gates(monkeypatch, 1)
    group = group_commit(engine)

    def interrupted(s) -> None:
        raise KeyboardInterrupt

    first = start(lambda: insert(group, 1))
    wait_for(lambda: gates.commits == 1)
    stop = start(lambda: group.run(interrupted))
    wait_for(queued(group, 1))
    after = start(lambda: insert(group, 2))
    wait_for(queued(group, 2))
    gates.gates[0].set()
    for t in (first, stop, after):
        t.join(10)
        assert not t.is_alive()
    assert [type(e) for e in stop.errors] == [KeyboardInterrupt]
    assert len(after.errors) == 1                     # its change was in the undone batch
    insert(group, 3)
    assert committed(path) == [1, 3]


def test_only_a_batch_someone_waits_for_is_synced_to_disk(db):
    """Lock rows need no sync; a batch with any durable change gets one."""
    from sqlalchemy import event

    path, engine = db
    seen: List[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: seen.append(statement))
    group = group_commit(engine)
    insert(group, 1, durable=False)
    relaxed, seen[:] = list(seen), []
    insert(group, 2)
    assert "PRAGMA synchronous=NORMAL" in relaxed
    assert relaxed.index("PRAGMA synchronous=NORMAL") < relaxed.index("BEGIN IMMEDIATE")
    assert not any(s.startswith("PRAGMA synchronous") for s in seen)
    with engine.connect() as conn:                    # the pool's connections are as they were
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    assert committed(path) == [1, 2]
