"""Zvols whose names LIO would change (capitals, '_') or would share a backstore (x:b, y:b)
map, are listed with their target and unmap without leaving an export behind.

The simulated target is as strict as LIO about target names."""
from __future__ import annotations

import json

import pytest

from imgstorage import naming
from imgstorage.drivers.sim.target import read_targets

from .conftest import ok, registered_cluster

ZVOLS = ["Vol1", "a_b", "x:b", "y:b"]


@pytest.fixture(scope="module")
def named(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "names")


def test_any_zvol_name_maps_and_unmaps_cleanly(named):
    for zvol in ZVOLS:
        out = ok(named.rocks("add", "host", "storagemap", "nas-0-0", "tank", zvol,
                             "vm-container-0-14", "1"))
        assert "/dev/sd" in out
    targets = read_targets(named.sim_root, "nas-0-0")
    assert sorted(targets) == sorted(naming.target_iqn("nas-0-0", z) for z in ZVOLS)
    assert len({t["device"] for t in targets.values()}) == len(ZVOLS)
    maps = json.loads(ok(named.rocks("list", "host", "storagemap", "nas-0-0",
                                     "output-format=json")))
    assert {m["zvol"]: m["target"] for m in maps if m["zvol"] in ZVOLS} == \
        {z: naming.target_iqn("nas-0-0", z) for z in ZVOLS}
    for zvol in ZVOLS:
        ok(named.rocks("remove", "host", "storagemap", "nas-0-0", zvol))
    assert read_targets(named.sim_root, "nas-0-0") == {}
