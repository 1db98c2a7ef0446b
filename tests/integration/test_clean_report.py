"""rocks clean host storagemap and rocks report host imgstorage against real daemons."""
from __future__ import annotations

import json
import uuid

from imgstorage.config import from_dict

from .conftest import fails, ok
from .test_storagemap import storagemap


def test_clean_a_broken_direct_mapping(cluster):
    bdev = ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "brokenvol",
                            "compute-0-3", "1")).splitlines()[1]
    out = ok(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "brokenvol"))
    assert out.splitlines()[0] == "cleaning compute-0-3"
    assert any("logged out of iqn.2001-04.com.nas-0-0-brokenvol" in line for line in out.splitlines())
    assert out.splitlines()[-2:] == ["cleaning nas-0-0", "Success"]
    row = storagemap(cluster)["brokenvol"]
    assert row["state"] == "unmapped" and row["host"] is None and row["target"] is None
    assert cluster.sim("read", "--host", "compute-0-3", bdev, "--offset", "0",
                       "--length", "1").returncode != 0
    # usable again
    ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "brokenvol", "compute-0-3", "1"))
    ok(cluster.rocks("remove", "host", "storagemap", "nas-0-0", "brokenvol"))


def test_clean_the_nas_side_when_the_container_is_dead(cluster):
    ok(cluster.rocks("add", "host", "storagemap", "nas-0-0", "tank", "deadvol",
                     "vm-container-0-14", "1"))
    cluster.stop("vm-container-0-14")
    try:
        out = ok(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "deadvol", "nodetype=nas"))
        assert out.splitlines() == ["cleaning nas-0-0", "Success"]
        assert storagemap(cluster)["deadvol"]["state"] == "unmapped"
    finally:
        cluster.start(["vm-container-0-14"])
    # the NAS forgot the host: the container's leftover session is cleaned by naming it
    fails(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "deadvol", "nodetype=vmc"),
          "name the container with host=HOST")
    out = ok(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "deadvol", "nodetype=vmc",
                           "host=vm-container-0-14"))
    assert out.splitlines()[0] == "cleaning vm-container-0-14"
    assert "logged out of iqn.2001-04.com.nas-0-0-deadvol" in out


def test_clean_errors(cluster):
    fails(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "novol"),
          "Unable to find volume novol on nas nas-0-0")
    fails(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "novol", "nodetype=both"),
          "nodetype can be only nas or vmc (both)")
    fails(cluster.rocks("clean", "host", "storagemap", "nas-0-0", "../x"), "invalid zvol name")


def test_report_host_imgstorage(cluster):
    # Broker users are global to the broker: these nodes get names of their own.
    run = uuid.uuid4().hex[:6]
    nas, vmc = f"nas-r{run}", f"compute-r{run}"
    ok(cluster.rocks("add", "host", nas, "appliance=nas"))
    ok(cluster.rocks("add", "host", vmc, "appliance=compute"))
    ok(cluster.rocks("set", "host", "attr", vmc, "img_storage_vm", "true"))
    ok(cluster.rocks("set", "host", "attr", vmc, "imgstorage-network", "ibnet"))
    fails(cluster.rocks("report", "host", "imgstorage", vmc),
          f"host {vmc} has no broker user yet: run 'rocks sync host imgstorage {vmc}' first")
    try:
        ok(cluster.rocks("sync", "host", "imgstorage", nas, vmc))
        conf = json.loads(ok(cluster.rocks("report", "host", "imgstorage", vmc)))
        cfg = from_dict(conf)              # what it prints is a valid node configuration
        assert (cfg.name, cfg.network, cfg.default_pool, cfg.img_sync_workers) == (
            vmc, "ibnet", "tank", 8)
        assert cfg.broker_user == vmc and cfg.admin_users == ["guest"]
        assert nas in cfg.nas_users and "nas-0-0" in cfg.nas_users
        conf = json.loads(ok(cluster.rocks("report", "host", "imgstorage", nas, "workers=3")))
        assert conf["name"] == nas and conf["img_sync_workers"] == 3 and "nas" in conf["db"]
        assert "nas_users" not in conf and conf["admin_users"] == ["guest"]
        fails(cluster.rocks("report", "host", "imgstorage", "nobody-9"), "unknown host nobody-9")
    finally:
        ok(cluster.rocks("remove", "host", nas, vmc))
