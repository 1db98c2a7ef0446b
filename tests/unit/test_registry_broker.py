"""The registry's broker identities: kept apart from attributes, created for old files too."""
from __future__ import annotations

import sqlite3

from imgstorage.frontend.registry import Registry


def test_an_older_registry_gains_the_table_and_keeps_its_hosts(tmp_path):
    path = str(tmp_path / "frontend.db")
    with Registry(path) as reg:
        reg.add_host("nas-0-0", "nas")
    con = sqlite3.connect(path)
    con.execute("DROP TABLE broker_identities")      # as a registry of the release before
    con.commit()
    con.close()
    with Registry(path) as reg:
        assert reg.broker_identity("nas-0-0") is None
        reg.set_broker_identity("nas-0-0", "nas-0-0", "pw1")
    with Registry(path) as reg:
        assert reg.broker_identity("nas-0-0") == ("nas-0-0", "pw1")
        reg.set_broker_identity("nas-0-0", "nas-0-0", "pw2")
        assert reg.broker_identity("nas-0-0") == ("nas-0-0", "pw2")
        assert all("pw2" not in a.value for a in reg.resolved_attrs("nas-0-0"))


def test_the_identity_goes_with_its_host(tmp_path):
    path = str(tmp_path / "frontend.db")
    with Registry(path) as reg:
        reg.add_host("vm-container-0-1", "vm-container")
        reg.set_broker_identity("vm-container-0-1", "vm-container-0-1", "pw")
    with Registry(path) as reg:
        reg.remove_host("vm-container-0-1")
    with Registry(path) as reg:
        reg.add_host("vm-container-0-1", "vm-container")
        assert reg.broker_identity("vm-container-0-1") is None
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM broker_identities").fetchone() == (0,)
    con.close()


def test_roles(tmp_path):
    with Registry(str(tmp_path / "frontend.db")) as reg:
        reg.add_host("nas-0-0", "nas")
        reg.add_host("vm-container-0-1", "vm-container")
        reg.add_host("compute-0-1", "compute")
        reg.add_host("compute-0-2", "compute")
        reg.set_attr("img_storage_vm", "true", host="compute-0-2")
        vm = reg.add_vm("vm-container-0-1", "compute")
        assert [reg.node_role(h) for h in ("nas-0-0", "vm-container-0-1", "compute-0-1",
                                           "compute-0-2", vm.name)] == \
            ["nas", "vm", None, "vm", None]
