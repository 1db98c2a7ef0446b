"""``rocks list host storagemap`` and ``storagedev``: pages, a failing transfer's error and retry."""
from __future__ import annotations

import json
from types import SimpleNamespace

from imgstorage.frontend import commands_storage
from imgstorage.frontend.tables import OutputOptions, Table, countdown, short_error

from .test_cli import cluster, conf, fails, hyp, ok, rpc  # noqa: F401  (fixtures)

IQN = "iqn.2001-04.com.nas-0-0-"
NOW = 1000.0


def _row(zvol, **fields):
    row = {"zvol": zvol, "zpool": "tank", "state": "unmapped", "lifecycle": "unmapped"}
    row.update(fields)
    return row


def _frozen(monkeypatch):
    monkeypatch.setattr(commands_storage, "time", SimpleNamespace(time=lambda: NOW))


# ------------------------------------------------------------------ helpers
def test_short_error_is_one_cut_line_with_its_count():
    assert short_error(None) is None and short_error("  ") is None
    assert short_error("NAS->VM copy: refused") == "NAS->VM copy: refused"
    assert short_error("NAS->VM copy: refused", 3) == "NAS->VM copy: refused (x3)"
    assert short_error("NAS->VM copy: refused", 1) == "NAS->VM copy: refused"
    text = "NAS->VM copy: [Errno 111] Connection refused while connecting to 127.0.0.2\nmore"
    assert short_error(text) == "NAS->VM copy: [Errno 111] Connection..."
    assert len(short_error("x" * 100)) == 40


def test_countdown_counts_to_the_retry_and_stays_at_zero_once_due():
    assert countdown(None, NOW) is None and countdown(True, NOW) is None
    assert countdown(NOW + 32, NOW) == "0:00:32"
    assert countdown(NOW + 31.2, NOW) == "0:00:32"
    assert countdown(NOW + 3725, NOW) == "1:02:05"
    assert countdown(NOW - 5, NOW) == "0:00:00"


def test_json_only_data_joins_the_json_rows_but_not_the_table():
    table = Table(["NAS", "ZVOL", "ERROR"])
    table.add("nas-0-0", "v1", "short...", data={"error": "short and long", "failures": 2})
    table.add("nas-0-0", "v2", None)
    assert table.render().splitlines() == ["ZVOL ERROR   ", "v1   short...", "v2   --------"]
    assert json.loads(table.render(OutputOptions(format="json"))) == [
        {"nas": "nas-0-0", "zvol": "v1", "error": "short and long", "failures": 2},
        {"nas": "nas-0-0", "zvol": "v2", "error": None}]
    # chosen columns are exactly the columns chosen
    assert json.loads(table.render(OutputOptions(format="json", columns=["zvol", "error"]))) == [
        {"zvol": "v1", "error": "short..."}, {"zvol": "v2", "error": None}]


# ------------------------------------------------------------ retry columns
def test_storagemap_shows_the_error_and_the_next_retry(cluster, monkeypatch):
    _frozen(monkeypatch)
    error = "NAS->VM copy: [Errno 111] Connection refused"
    body = [_row("fine-vol", remotehost="compute-0-3", iscsi_target=IQN + "fine-vol",
                 state="mapped", lifecycle="mapped"),
            _row("stuck-vol", remotehost="compute-0-3", iscsi_target=IQN + "stuck-vol",
                 state="NAS->VM", lifecycle="uploading", time=NOW - 64, error=error,
                 failures=5, retry_at=NOW + 32)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body, "more": False})
    assert ok("list", "host", "storagemap", "nas-0-0").splitlines() == [
        "ZVOL      HOST        ZPOOL TARGET                            STATE   TIME    "
        "ERROR                                        NEXT-RETRY",
        "fine-vol  compute-0-3 tank  iqn.2001-04.com.nas-0-0-fine-vol  mapped  ------- "
        "-------------------------------------------- ----------",
        "stuck-vol compute-0-3 tank  iqn.2001-04.com.nas-0-0-stuck-vol NAS->VM 0:01:04 "
        "NAS->VM copy: [Errno 111] Connection... (x5) 0:00:32   ",
    ]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body, "more": False})
    rows = json.loads(ok("list", "host", "storagemap", "nas-0-0", "output-format=json"))
    assert rows[1] == {"nas": "nas-0-0", "zvol": "stuck-vol", "host": "compute-0-3",
                       "zpool": "tank", "target": IQN + "stuck-vol", "state": "NAS->VM",
                       "time": "0:01:04", "error": error, "next-retry": "0:00:32",
                       "failures": 5, "retry_at": NOW + 32}
    assert (rows[0]["error"], rows[0]["failures"], rows[0]["retry_at"]) == (None, 0, None)


def test_an_error_without_a_retry_shows_no_retry_column(cluster, monkeypatch):
    _frozen(monkeypatch)
    body = [_row("v1", error="unmap interrupted by a daemon restart")]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"}, {"body": body})
    assert ok("list", "host", "storagemap", "nas-0-0").splitlines() == [
        "ZVOL HOST ZPOOL TARGET STATE    TIME ERROR                                ",
        "v1   ---- tank  ------ unmapped ---- unmap interrupted by a daemon restart"]


# -------------------------------------------------------------------- pages
def test_storagemap_fetches_every_page_transparently(cluster, monkeypatch):
    _frozen(monkeypatch)
    names = [f"vol-{i:04d}" for i in range(7)]
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"},
                       {"body": [_row(n) for n in names[:3]], "more": True, "next": names[2]})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols", "after": names[2]},
                       {"body": [_row(n) for n in names[3:6]], "more": True, "next": names[5]})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols", "after": names[5]},
                       {"body": [_row(names[6])], "more": False})
    lines = ok("list", "host", "storagemap", "nas-0-0").splitlines()
    assert [line.split()[0] for line in lines[1:]] == names


def test_storagemap_refuses_a_page_that_goes_backwards(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"},
                       {"body": [_row("b")], "more": True, "next": "b"})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols", "after": "b"},
                       {"body": [_row("a")], "more": False})
    assert fails("list", "host", "storagemap", "nas-0-0") == "nas-0-0 sent a malformed zvol list"


def test_storagedev_fetches_every_page(cluster):
    dev = {"zvol": None, "device": None, "status": "iscsi", "size": 1, "bdev": "sdb"}
    cluster.rpc.expect("compute-0-3", {"action": "list_dev"},
                       {"body": {"a-vol": dict(dev, zvol="a-vol")}, "more": True,
                        "next": "a-vol"})
    cluster.rpc.expect("compute-0-3", {"action": "list_dev", "after": "a-vol"},
                       {"body": {"b-vol": dict(dev, zvol="b-vol")}, "more": False})
    rows = json.loads(ok("list", "host", "storagedev", "compute-0-3", "output-format=json"))
    assert [r["zvol"] for r in rows] == ["a-vol", "b-vol"]


def test_clean_finds_its_zvol_on_a_later_page(cluster):
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols"},
                       {"body": [_row("a-vol")], "more": True, "next": "a-vol"})
    cluster.rpc.expect("nas-0-0", {"action": "list_zvols", "after": "a-vol"},
                       {"body": [_row("z-vol")], "more": False})
    cluster.rpc.expect("nas-0-0", {"action": "clean_zvol", "zvol": "z-vol", "force": False})
    assert ok("clean", "host", "storagemap", "nas-0-0", "z-vol", "nodetype=nas") == \
        "cleaning nas-0-0\nSuccess\n"
