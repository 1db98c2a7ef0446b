"""``rocks list host storagemap``: the SAFE column, and ``watch=`` without and with a terminal."""
from __future__ import annotations

import io
import json
import re
import time as real_time
from types import SimpleNamespace

import pytest

from imgstorage.errors import BrokerUnavailable, RpcTimeout
from imgstorage.frontend import commands_storage, storagemap
from imgstorage.frontend import watch as watch_mod
from imgstorage.frontend.tables import OutputOptions, age, duration

from .test_cli import cluster, conf, fails, hyp, ok, rocks, rpc  # noqa: F401  (fixtures)

NOW = 1_000_000.0
IQN = "iqn.2001-04.com.nas-0-0-"
STAMP = re.compile(r"--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ---")


def _row(zvol, **fields):
    row = {"zvol": zvol, "zpool": "tank", "state": "unmapped", "lifecycle": "unmapped"}
    row.update(fields)
    return row


def _local(zvol, safe_for, **fields):
    """A zvol running from a container's copy, last safe on the NAS ``safe_for`` s ago."""
    return _row(zvol, remotehost="compute-0-3", state="mapped", lifecycle="local", sync=True,
                recovery_point=NOW - safe_for, **fields)


class Clock:
    """The watch's clock: sleeping moves it on at once; a sleep may be a Ctrl-C."""

    def __init__(self, interrupt_after: int = 0):
        self.now = NOW
        self.slept = []
        self.interrupt_after = interrupt_after

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.interrupt_after and len(self.slept) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.now += seconds

    strftime = staticmethod(real_time.strftime)
    localtime = staticmethod(real_time.localtime)


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(watch_mod, "time", fake)
    monkeypatch.setattr(commands_storage, "time", SimpleNamespace(time=fake.time))
    return fake


# ------------------------------------------------------------------ SAFE
def test_safe_reads_hours_minutes_seconds_and_days_in_front():
    assert age(NOW - 252, NOW) == "0:04:12"
    assert age(NOW - 0.4, NOW) == "0:00:00"
    assert age(NOW - 3 * 3600 - 5, NOW) == "3:00:05"
    assert age(NOW - (2 * 86400 + 3 * 3600 + 4 * 60 + 5), NOW) == "2d 3:04:05"
    assert age(NOW + 30, NOW) == "0:00:00"          # the NAS's clock ahead of ours
    for nothing in (None, True, "1700000000", float("nan"), float("inf")):
        assert age(nothing, NOW) is None
    assert duration(59.9) == "0:00:59" and duration(86400) == "1d 0:00:00"


def test_safe_sits_beside_nextsync_after_the_manuals_columns(cluster, clock):
    body = [_local("busy-vol", 252, nextsync=NOW + 48),
            _row("idle-vol"),
            _local("old-vol", 2 * 86400 + 3 * 3600 + 4 * 60 + 5)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    lines = ok("list", "host", "storagemap", "nas-0-0").splitlines()
    assert lines[0].split() == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME", "SAFE",
                                "NEXTSYNC"]
    assert lines[1].split()[:6] == ["busy-vol", "compute-0-3", "tank", "------", "mapped",
                                    "----"]
    assert lines[1].split()[6] == "0:04:12"
    assert lines[2].split()[6:] == ["----------", "------------"]     # dashes, padded to SAFE
    assert lines[3].split()[6:8] == ["2d", "3:04:05"]
    widths = {len(line) for line in lines}
    assert len(widths) == 1, lines                   # every row padded to the same columns


def test_safe_follows_progress_and_rate_and_comes_before_the_errors(cluster, clock):
    body = [_row("moving-vol", remotehost="compute-0-3", iscsi_target=IQN + "moving-vol",
                 state="NAS->VM", lifecycle="uploading", time=NOW - 4, progress=10.0,
                 rate=2e6, recovery_point=NOW - 4, error="x", failures=2, retry_at=NOW + 5),
            _local("quiet-vol", 61, nextsync=NOW + 100)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    header = ok("list", "host", "storagemap", "nas-0-0").splitlines()[0].split()
    assert header == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME", "PROGRESS", "RATE",
                      "SAFE", "NEXTSYNC", "ERROR", "NEXT-RETRY"]


def test_json_carries_the_recovery_point_as_the_nas_sent_it(cluster, clock):
    body = [_local("busy-vol", 252), _row("idle-vol")]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    rows = json.loads(ok("list", "host", "storagemap", "nas-0-0", "output-format=json"))
    assert rows[0]["safe"] == "0:04:12" and rows[0]["recovery_point"] == NOW - 252
    assert rows[1]["safe"] is None and rows[1]["recovery_point"] is None


def test_no_safe_column_when_no_zvol_runs_from_a_copy(cluster, clock):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"},
                       {"body": [_row("idle-vol"), _row("direct-vol", state="mapped",
                                                         lifecycle="mapped")]})
    out = ok("list", "host", "storagemap", "nas-0-0", "output-format=json")
    assert all("safe" not in r and "recovery_point" not in r for r in json.loads(out))


# --------------------------------------------------------- watch, no terminal
def expect_listings(cluster, n, body):
    for _ in range(n):
        cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})


def split_tables(out: str):
    """The tables of a watch's output, each after its time line."""
    tables, current = [], None
    for line in out.splitlines():
        if STAMP.fullmatch(line):
            current = []
            tables.append(current)
        else:
            assert current is not None, f"output before the first time line: {line!r}"
            current.append(line)
    return tables


def test_watch_without_a_terminal_prints_one_table_per_interval(cluster, clock):
    body = [_local("busy-vol", 252)]
    expect_listings(cluster, 3, body)
    out = ok("list", "host", "storagemap", "nas-0-0", "watch=5", "count=3")
    tables = split_tables(out)
    assert len(tables) == 3
    assert tables[0][0].split()[-1] == "SAFE" and tables[0][1].split()[0] == "busy-vol"
    # the clock moved on by the interval between tables, and SAFE with it
    assert clock.slept == [5.0, 5.0]
    assert [t[1].split()[-1] for t in tables] == ["0:04:12", "0:04:17", "0:04:22"]
    stamps = [line for line in out.splitlines() if STAMP.fullmatch(line)]
    assert len(set(stamps)) == 3


def test_a_refresh_waits_about_the_interval_for_a_nas_unless_timeout_says(cluster, clock):
    assert watch_mod.refresh_timeout(2, 60) == 10        # never less than 10 s
    assert watch_mod.refresh_timeout(30, 60) == 30
    assert watch_mod.refresh_timeout(600, 60) == 60      # nor more than the configuration's
    expect_listings(cluster, 2, [])
    ok("list", "host", "storagemap", "nas-0-0", "watch=2", "count=2")
    assert [timeout for _node, _msg, timeout in cluster.rpc.sent] == [7.0, 7.0]   # conf: 7 s
    expect_listings(cluster, 1, [])
    ok("list", "host", "storagemap", "nas-0-0", "watch=2", "count=1", "timeout=30")
    assert cluster.rpc.sent[-1][2] == 30.0


def test_a_nas_that_stops_answering_is_reported_and_asked_again(cluster, clock):
    body = [_local("busy-vol", 10)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, error=RpcTimeout("nas-0-0", 7))
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"},
                       error=BrokerUnavailable("no message broker answers at 127.0.0.1:5672"))
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    res = rocks("list", "host", "storagemap", "nas-0-0", "watch=1", "count=4")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    tables = split_tables(res.stdout)
    assert [len(t) for t in tables] == [2, 0, 0, 2]          # header and row, or nothing
    assert res.stderr.splitlines() == [
        "error - node nas-0-0 did not answer within 7 s (trying again in 1 s)",
        "error - no message broker answers at 127.0.0.1:5672 (trying again in 1 s)"]
    assert "Traceback" not in res.stderr


def test_one_nas_that_does_not_answer_leaves_the_others_listed(cluster, clock):
    ok("add", "host", "nas-0-1", "appliance=nas")
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": [_local("busy-vol", 9)]})
    cluster.rpc.expect("nas-0-1", {"action": "list_zvols"}, error=RpcTimeout("nas-0-1", 7))
    res = rocks("list", "host", "storagemap", "nas-0-0", "nas-0-1", "watch=2", "count=1")
    assert res.exit_code == 1                  # the last refresh did not show everything
    [table] = split_tables(res.stdout)
    assert [line.split()[0] for line in table] == ["ZVOL", "busy-vol"]    # nas-0-0's
    assert res.stderr == "error - node nas-0-1 did not answer within 7 s\n"


def test_a_watch_that_ends_on_a_failure_says_so_in_its_status(cluster, clock):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, error=RpcTimeout("nas-0-0", 7))
    res = rocks("list", "host", "storagemap", "nas-0-0", "watch=1", "count=1")
    assert res.exit_code == 1
    assert res.stderr == "error - node nas-0-0 did not answer within 7 s\n"   # no retry to come
    assert [STAMP.fullmatch(line) is not None for line in res.stdout.splitlines()] == [True]


def test_ctrl_c_ends_a_watch_cleanly(cluster, monkeypatch):
    fake = Clock(interrupt_after=2)
    monkeypatch.setattr(watch_mod, "time", fake)
    expect_listings(cluster, 2, [_row("idle-vol")])
    res = rocks("list", "host", "storagemap", "nas-0-0", "watch=3")
    assert (res.exit_code, res.stderr) == (0, "")
    assert len(split_tables(res.stdout)) == 2


def test_ctrl_c_while_waiting_for_the_nas_ends_the_watch_too(cluster, clock):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": [_row("idle-vol")]})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, error=KeyboardInterrupt())
    res = rocks("list", "host", "storagemap", "nas-0-0", "watch=3")
    assert (res.exit_code, res.stderr) == (0, "")
    assert len(split_tables(res.stdout)) == 1
    assert cluster.rpc.closed == 1                          # the connection was let go


def test_output_options_apply_to_every_table(cluster, clock):
    expect_listings(cluster, 2, [_local("busy-vol", 252)])
    out = ok("list", "host", "storagemap", "nas-0-0", "watch=1", "count=2",
             "output-col=zvol,safe", "output-header=no")
    assert split_tables(out) == [["busy-vol 0:04:12"], ["busy-vol 0:04:13"]]


@pytest.mark.parametrize("words,message", [
    (["watch=0"], "invalid watch '0': expected a positive number of seconds"),
    (["watch=-5"], "invalid watch '-5': expected a positive number of seconds"),
    (["watch=soon"], "invalid watch 'soon': expected a number of seconds between two tables"),
    (["watch="], "invalid watch '': expected a number of seconds between two tables"),
    (["watch=nan"], "invalid watch 'nan': expected a positive number of seconds"),
    (["watch=inf"], "invalid watch 'inf': expected a positive number of seconds"),
    (["watch=0.01"], "invalid watch '0.01': at least 1 second between two tables"),
    (["watch=1e9"], "invalid watch '1e9': at most 86400 seconds (a day) between two tables"),
    (["count=3"], "count= ends a watch: it needs watch=SECONDS"),
    (["watch=5", "count=0"], "invalid count '0': expected a whole number of tables, at least 1"),
    (["watch=5", "count=two"], "invalid count 'two': expected a whole number of tables"),
    (["watch=5", "output-format=json"], "watch= shows tables: it cannot be used with "
                                        "output-format=json"),
])
def test_bad_watch_values_are_one_line_and_ask_nothing(cluster, words, message):
    # the rpc fixture fails the test on any request sent
    assert message in fails("list", "host", "storagemap", "nas-0-0", *words)


def test_a_bad_watch_value_is_named_before_an_unknown_nas(cluster):
    assert fails("list", "host", "storagemap", "no-such-nas", "watch=0").startswith(
        "invalid watch '0'")


# ------------------------------------------------------------ on a terminal
def moving_listing(eta=3.0):
    rows = [_row("copy-vol", remotehost="compute-0-3", iscsi_target=IQN + "copy-vol",
                 state="NAS->VM", lifecycle="uploading", time=NOW - 12, progress=81.3,
                 rate=184.2e6, recovery_point=NOW - 12, **({"eta": eta} if eta else {})),
            _row("pull-vol", remotehost="compute-0-3", state="NAS<-VM sched",
                 lifecycle="pulling", time=NOW - 1, rate=0.0, recovery_point=NOW - 300),
            _local("quiet-vol", 40)]
    return storagemap.build([("nas-0-0", rows)], NOW)


def test_a_running_transfer_has_a_bar_with_its_share_rate_and_time_left():
    listing = moving_listing()
    assert [(t.zvol, t.percent, t.eta) for t in listing.transfers] == [
        ("copy-vol", 81.3, 3.0), ("pull-vol", None, None)]
    # a NAS that sends no ETA: the average speed so far (12 s for 81.3 %) gives one
    older = moving_listing(eta=None).transfers[0]
    assert older.eta == pytest.approx(12 * (100 - 81.3) / 81.3)


def render(frame, retry=True, width=160) -> str:
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(watch_mod.render_frame(frame, NOW, "rocks list host storagemap nas-0-0", 5,
                                         retry))
    return console.file.getvalue()


def test_the_terminal_screen_shows_the_table_then_a_bar_per_transfer():
    text = render(watch_mod.Frame(moving_listing(), ["node nas-0-1 did not answer within 10 s"]))
    lines = text.splitlines()
    assert lines[0].startswith("Every 5 s: rocks list host storagemap nas-0-0")
    header = next(i for i, line in enumerate(lines) if line.startswith("ZVOL "))
    assert lines[header].split()[-2:] == ["RATE", "SAFE"]
    bars = {line.split()[0]: line for line in lines if "━" in line or "ETA" in line}
    assert set(bars) == {"copy-vol", "pull-vol"}
    assert re.search(r"NAS->VM +━+ *81% 184\.2 MB/s ETA 0:00:03$", bars["copy-vol"].rstrip())
    assert re.search(r"\?% +- +ETA -$", bars["pull-vol"].rstrip())    # no estimate, no rate yet
    assert "error - node nas-0-1 did not answer within 10 s (trying again in 5 s)" in text
    assert lines[-1] == "Ctrl-C ends the watch"


def test_a_terminal_watch_redraws_in_place_and_ends_by_its_count(monkeypatch):
    from rich.console import Console
    fake = Clock()
    monkeypatch.setattr(watch_mod, "time", fake)
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    frames = iter([watch_mod.Frame(moving_listing()), watch_mod.Frame(None, ["broker down"])])
    status = watch_mod.watch(lambda: next(frames), 2.0, 2, OutputOptions(),
                             "rocks list host storagemap nas-0-0", terminal=True,
                             console=console)
    assert status == 1                                   # the last refresh failed
    text = out.getvalue()
    assert "copy-vol" in text and "error - broker down" in text
    assert "\x1b[" in text                               # cursor moves: drawn over, not appended
    assert fake.slept == [2.0]


def test_ctrl_c_during_a_terminal_watch_leaves_the_screen_usable(monkeypatch):
    from rich.console import Console
    monkeypatch.setattr(watch_mod, "time", Clock(interrupt_after=1))
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    status = watch_mod.watch(lambda: watch_mod.Frame(moving_listing()), 5.0, None,
                             OutputOptions(), "t", terminal=True, console=console)
    assert status == 0
    assert "copy-vol" in out.getvalue() and "\x1b[?25h" in out.getvalue()   # cursor shown again
