"""A NAS with 1000 zvols lists in full: in the table, in JSON, and page by page on the wire."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from imgstorage.config import from_dict
from imgstorage.db import make_engine
from imgstorage.drivers import node_drivers
from imgstorage.messaging import RpcClient
from imgstorage.nas.store import NasStore

from .conftest import ok, registered_cluster

NAS = "nas-0-0"
TOTAL = 1000
MAPPED = {"scale-mapped-a": "compute-0-3", "scale-mapped-b": "vm-container-0-14"}
GIB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory, vhost):
    """A NAS holding 1000 zvols: two mapped by the operator, the rest unmapped.

    No request creates a zvol without mapping it, and 1000 maps (each with
    its target and its container's session) would take minutes; so the
    unmapped ones are made with the NAS's own calls, in the order its map
    makes them before it maps: the zvol in the pool, then its row.  They are
    sparse: the simulated pool checks the space of a thick zvol against every
    other zvol, which over 1000 zvols costs minutes and says nothing about
    listing them.
    """
    for cluster in registered_cluster(tmp_path_factory, vhost, "listing-scale"):
        for zvol, host in MAPPED.items():
            ok(cluster.rocks("add", "host", "storagemap", NAS, "tank", zvol, host, "1"))
        cfg = from_dict(json.loads(cluster.config_path(NAS).read_text()))
        zfs, store = node_drivers(cfg).zfs, NasStore(make_engine(cfg.db))
        for i in range(TOTAL - len(MAPPED)):
            zfs.create_zvol("tank", f"scale-{i:04d}", GIB, sparse=True)
            store.add(f"scale-{i:04d}", "tank", GIB)
        yield cluster


def names():
    return sorted([f"scale-{i:04d}" for i in range(TOTAL - len(MAPPED))] + list(MAPPED))


@pytest.fixture
def rpc(big):
    with RpcClient(from_dict(json.loads(big.config_path("frontend").read_text()))) as client:
        yield client


def test_the_table_lists_every_zvol_exactly_once(big):
    lines = ok(big.rocks("list", "host", "storagemap", NAS)).splitlines()
    assert lines[0].split() == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME"]
    counts = Counter(line.split()[0] for line in lines[1:])
    assert sorted(counts) == names() and set(counts.values()) == {1}
    by = {line.split()[0]: line.split() for line in lines[1:]}
    for zvol, host in MAPPED.items():
        assert by[zvol][1:5] == [host, "tank", f"iqn.2001-04.com.{NAS}-{zvol}", "mapped"]
    host, zpool, target, state, _time = by["scale-0500"][1:]
    assert (set(host), zpool, set(target), state) == ({"-"}, "tank", {"-"}, "unmapped")


def test_json_lists_every_zvol_exactly_once(big):
    rows = json.loads(ok(big.rocks("list", "host", "storagemap", NAS, "output-format=json")))
    assert sorted(r["zvol"] for r in rows) == names()
    by = {r["zvol"]: r for r in rows}
    assert by["scale-mapped-a"]["host"] == "compute-0-3"
    assert by["scale-0997"]["state"] == "unmapped"
    assert by["scale-0001"] == {"nas": NAS, "zvol": "scale-0001", "host": None, "zpool": "tank",
                                "target": None, "state": "unmapped", "time": None}


def test_an_unpaged_request_gets_the_whole_compact_listing(rpc):
    reply = rpc.request(NAS, {"action": "list_zvols"}, timeout=30)
    assert reply["more"] is False and "next" not in reply
    assert [r["zvol"] for r in reply["body"]] == names()
    row = next(r for r in reply["body"] if r["zvol"] == "scale-0002")
    assert row == {"zvol": "scale-0002", "zpool": "tank", "state": "unmapped",
                   "lifecycle": "unmapped", "size": 1}
    mapped = next(r for r in reply["body"] if r["zvol"] == "scale-mapped-b")
    assert mapped["remotehost"] == "vm-container-0-14" and mapped["lifecycle"] == "mapped"
    assert not {"locked", "is_sending", "is_delete_remote", "bdev"} & set(mapped)


def test_pages_on_the_wire_cover_the_listing_once(rpc):
    seen, after, pages = [], None, 0
    while True:
        message = {"action": "list_zvols", "limit": 150}
        if after is not None:
            message["after"] = after
        reply = rpc.request(NAS, message, timeout=30)
        pages += 1
        keys = [r["zvol"] for r in reply["body"]]
        assert len(keys) <= 150 and all(after is None or k > after for k in keys)
        seen.extend(keys)
        if not reply["more"]:
            break
        assert reply["next"] == keys[-1]
        after = reply["next"]
    assert pages == -(-TOTAL // 150) and seen == names()


def test_a_bad_page_request_is_one_error_and_changes_nothing(rpc):
    reply = rpc.call(NAS, {"action": "list_zvols", "limit": 0}, timeout=30)
    assert reply["status"] == "error" and "limit" in reply["error"]
    reply = rpc.call(NAS, {"action": "list_zvols", "after": "../x"}, timeout=30)
    assert reply["status"] == "error" and "invalid zvol name" in reply["error"]
    assert len(rpc.request(NAS, {"action": "list_zvols"}, timeout=30)["body"]) == TOTAL


def test_storagedev_of_a_container_in_pages(rpc, big):
    reply = rpc.request("compute-0-3", {"action": "list_dev", "limit": 1}, timeout=30)
    assert list(reply["body"]) == ["scale-mapped-a"] and reply["more"] is False
    rows = json.loads(ok(big.rocks("list", "host", "storagedev", "compute-0-3",
                                   "output-format=json")))
    assert [r["zvol"] for r in rows] == ["scale-mapped-a"]
