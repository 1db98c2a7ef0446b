"""What an operator watches, with real daemons: SAFE moving with the pulls, a watch that
outlives its NAS, and the daemons' JSON logs.

The NAS and vm-container-0-14 run with ``log_format: "json"``; every line
they write must parse, and a zvol's map and unmap must be in them as
transitions.  Each test makes the zvols it looks at, so the tests stand alone.
"""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from typing import List, Tuple

import pytest

from imgstorage.simcluster import ENTRY, PYTHON

from .conftest import ok, registered_cluster
from .sync_helpers import (FAST, KIB, NAS, diagnose, do_writes, nas_row, prepare_zvol,
                           set_zvolattr, storagemap, sync_map, unmap_and_check, wait_local,
                           wait_until)

ZVOL = "safe-vol"
SAFE = re.compile(r"(?:(\d+)d )?(\d+):(\d\d):(\d\d)")
STAMP = re.compile(r"--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ---")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vhost):
    json_logs = {"log_format": "json"}
    yield from registered_cluster(tmp_path_factory, vhost, "listing-watch",
                                  node_settings={NAS: dict(json_logs), FAST: dict(json_logs)})


def seconds_of(safe: str) -> int:
    m = SAFE.fullmatch(safe)
    assert m, f"unexpected SAFE {safe!r}"
    days, hours, minutes, secs = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def listed(cluster) -> Tuple[dict, float, float]:
    """The zvol's JSON row, and the wall clock just before and after it was listed."""
    before = time.time()
    row = storagemap(cluster)[ZVOL]
    return row, before, time.time()


def assert_safe_matches(row: dict, before: float, after: float) -> None:
    """SAFE is the age of the listed recovery point, as seen while the command ran."""
    point = row["recovery_point"]
    assert isinstance(point, float), row
    assert int(before - point) - 1 <= seconds_of(row["safe"]) <= int(after - point) + 1, \
        (row, before, after)


# --------------------------------------------------------------------- SAFE
def test_safe_advances_when_a_pull_arrives(cluster):
    c = cluster
    image, tail = prepare_zvol(c, ZVOL, FAST, 64 * KIB, seed=13)
    set_zvolattr(c, ZVOL, "frequency", 3600)               # no pull unless asked for
    mapped_at = time.time()
    dev = sync_map(c, ZVOL, FAST)

    # while the copy runs, and once local: safe up to the map
    row, before, after = listed(c)
    assert mapped_at - 1 <= row["recovery_point"] <= after, (row, mapped_at)
    assert_safe_matches(row, before, after)
    wait_local(c, FAST, ZVOL)
    row, before, after = listed(c)
    first = row["recovery_point"]
    assert first == nas_row(c, ZVOL)["recovery_point"]     # as the NAS sent it
    assert_safe_matches(row, before, after)

    table = ok(c.rocks("list", "host", "storagemap", NAS)).splitlines()
    header = table[0].split()
    assert header[:6] == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME"]
    assert header.index("SAFE") == header.index("NEXTSYNC") - 1, header
    line = next(x for x in table if x.startswith(ZVOL + " "))
    assert SAFE.fullmatch(line.split()[header.index("SAFE")]), line

    # a write, then a pull: the recovery point moves to the pull's snapshot
    do_writes(c, FAST, dev, image, [(4096, b"written after the map" * 50)])
    set_zvolattr(c, ZVOL, "nextsync", int(time.time()))
    moved = wait_until("the pull's arrival", lambda: (lambda r: r if (
        r["state"] == "local" and r["recovery_point"] != first) else None)(nas_row(c, ZVOL)),
        show=lambda: diagnose(c, ZVOL))
    row, before, after = listed(c)
    assert row["recovery_point"] == moved["recovery_point"] > first, (row, first)
    assert_safe_matches(row, before, after)

    unmap_and_check(c, FAST, ZVOL, image, tail)
    row = storagemap(c)[ZVOL]
    assert row.get("recovery_point") is None and row.get("safe") is None, row


# -------------------------------------------------------------------- watch
class Watch:
    """``rocks list host storagemap NAS watch=1`` running into pipes, read as it prints."""

    def __init__(self, cluster):
        self.proc = subprocess.Popen(
            [PYTHON, "-c", ENTRY["rocks"], "list", "host", "storagemap", NAS, "watch=1"],
            env=cluster.env("frontend"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.lines: "queue.Queue[Tuple[str, str]]" = queue.Queue()
        self.seen: List[Tuple[str, str]] = []
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in (("out", self.proc.stdout),
                                             ("err", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))

    def until(self, what: str, match, timeout: float = 90.0) -> Tuple[str, str]:
        """Read on until a line for which ``match(stream, line)`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                raise AssertionError(f"never saw {what}; last lines: {self.seen[-8:]!r}")
            try:
                item = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            self.seen.append(item)
            if match(*item):
                return item

    def table(self, timeout: float = 90.0) -> str:
        """The header of the next table, after a time line."""
        self.until("a time line", lambda s, line: s == "out" and STAMP.fullmatch(line), timeout)
        return self.until("a table row", lambda s, line: s == "out" and line.startswith("ZVOL "),
                          timeout)[1]

    def stop(self) -> Tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        for reader in self.readers:         # they end with the pipes
            reader.join(10)
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        self.seen += rest
        return code, "\n".join(line for s, line in self.seen if s == "err")


def test_a_watch_reports_a_nas_that_went_away_and_goes_on_when_it_is_back(cluster):
    c = cluster
    ok(c.rocks("add", "host", "storagemap", NAS, "tank", "watch-vol", FAST, "1"))
    watch = Watch(c)
    try:
        watch.table()
        watch.table()                        # two intervals, each with its table
        assert c.stop(NAS) == 0
        _stream, error = watch.until("the NAS's error line", lambda s, line: s == "err")
        assert error.startswith("error - ") and error.endswith("(trying again in 1 s)"), error
        assert NAS in error, error
        c.start([NAS])
        watch.table()                        # the NAS answers again: tables again
    finally:
        code, errors = watch.stop()
    assert code == 0, watch.seen[-10:]
    assert "Traceback" not in errors, errors
    for line in errors.splitlines():
        assert line.startswith("error - ") and line.endswith("(trying again in 1 s)"), line
    ok(c.rocks("remove", "host", "storagemap", NAS, "watch-vol"))


def test_a_watch_into_a_pipe_ends_after_its_count(cluster):
    ok(cluster.rocks("add", "host", "storagemap", NAS, "tank", "pipe-vol", FAST, "1"))
    out = ok(cluster.rocks("list", "host", "storagemap", NAS, "watch=1", "count=3"))
    lines = out.splitlines()
    stamps = [i for i, line in enumerate(lines) if STAMP.fullmatch(line)]
    assert len(stamps) == 3 and stamps[0] == 0, out
    for i in stamps:
        assert lines[i + 1].split()[:6] == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME"]
        assert any(line.split()[:2] == ["pipe-vol", FAST] for line in lines[i + 2:i + 12])
    ok(cluster.rocks("remove", "host", "storagemap", NAS, "pipe-vol"))


# --------------------------------------------------------------------- logs
def json_lines(cluster, node: str) -> List[dict]:
    text = cluster.log_path(node).read_text()
    assert text.endswith("\n")
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{node}'s log line {number} is not JSON: {line[:200]!r}")
    return parsed


@pytest.mark.parametrize("node", [NAS, FAST])
def test_every_line_of_a_json_log_parses(cluster, node):
    zvol = f"log-vol-{node}"
    ok(cluster.rocks("add", "host", "storagemap", NAS, "tank", zvol, FAST, "1"))
    ok(cluster.rocks("remove", "host", "storagemap", NAS, zvol))
    lines = json_lines(cluster, node)
    for line in lines:
        assert {"time", "level", "node", "logger", "event", "message"} <= set(line), line
        assert line["node"] == node and line["time"].endswith("Z")
    assert any(line["event"] == "start" for line in lines)
    moves = [(m["from"], m["to"], m["on"]) for m in lines
             if m["event"] == "transition" and m.get("zvol") == zvol]
    if node == NAS:
        assert moves == [("unmapped", "mapping", "map"), ("mapping", "mapped", "attached"),
                         ("mapped", "unmapping", "unmap"), ("unmapping", "unmapped", "detached")]
    else:
        assert moves and moves[-1][1] is None, moves        # the container forgot it at last
    for m in lines:
        if m["event"] == "transition":
            assert m["message"].startswith(f"zvol {m['zvol']}: {m['from']} -> "), m
