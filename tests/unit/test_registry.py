"""The cluster registry: VM naming, attribute precedence, NAS placement, refusals."""
from __future__ import annotations

import random
import sqlite3

import pytest

from imgstorage.errors import NotFoundError, StateError, ValidationError
from imgstorage.frontend.registry import (DEFAULT_DISK_GB, Registry, RegistryError, natural_key,
                                          split_pools)


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "frontend.db")


@pytest.fixture
def reg(db):
    r = Registry(db)
    r.add_host("nas-0-0", "nas")
    r.add_host("vm-container-0-14", "vm-container")
    r.add_host("hpcdev-pub02", "vm-container")
    r.add_host("compute-0-3", "compute")
    r.commit()
    yield r
    r.close()


def dump(db):
    """Every row of every table, to prove a failed change left nothing behind."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(map(tuple, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        con.close()


# ------------------------------------------------------------------ schema
def test_new_registry_has_the_original_default_attributes(db):
    with Registry(db) as r:
        assert r.global_attrs() == [("img_sync", "false")]
        assert r.appliance_attrs() == [
            ("compute", "vm_container_zpool", "tank"),
            ("nas", "img_storage_nas", "true"),
            ("vm-container", "img_storage_vm", "true"),
            ("vm-container", "vm_container_zpool", "tank"),
        ]


def test_defaults_are_set_once_only(db):
    with Registry(db) as r:
        r.remove_attr("img_sync")
    with Registry(db) as r:
        assert r.global_attrs() == []


def test_wal_mode_and_foreign_keys(db):
    with Registry(db) as r:
        with r.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unopenable_registry_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="folder .* does not exist"):
        Registry(str(tmp_path / "missing" / "fe.db"))
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="cannot open the cluster registry"):
        Registry(str(bad))


# ------------------------------------------------------------------- hosts
def test_rack_and_rank_come_from_the_name(reg):
    h = reg.get_host("vm-container-0-14")
    assert (h.rack, h.rank) == (0, 14)
    assert (reg.get_host("hpcdev-pub02").rack, reg.get_host("hpcdev-pub02").rank) == (None, None)


def test_add_host_checks(reg):
    with pytest.raises(ValidationError, match="already exists"):
        reg.add_host("nas-0-0", "nas")
    with pytest.raises(ValidationError, match="invalid appliance"):
        reg.add_host("x", "storage")
    with pytest.raises(ValidationError, match="invalid ip"):
        reg.add_host("x", "nas", ip="10.0.0.300")
    with pytest.raises(ValidationError, match="invalid rack"):
        reg.add_host("x", "nas", rack=-1)
    assert reg.add_host("x", "nas", ip=" 10.0.0.3".strip()).ip == "10.0.0.3"


@pytest.mark.parametrize("name", ["a/b", "a;b", "a b", "..", "a,b", "", "-a", "a" * 64,
                                  "a\nb", "a$b"])
def test_bad_host_names(reg, name):
    with pytest.raises(ValidationError):
        reg.add_host(name, "nas")


def test_unknown_host(reg):
    with pytest.raises(NotFoundError, match="^unknown host nas-9-9$"):
        reg.get_host("nas-9-9")


def test_hosts_in_natural_order(reg):
    reg.add_host("compute-0-10", "compute")
    reg.add_host("compute-0-2", "compute")
    names = [h.name for h in reg.hosts()]
    assert names.index("compute-0-2") < names.index("compute-0-3") < names.index("compute-0-10")
    assert natural_key("a-2") < natural_key("a-10")


# ---------------------------------------------------------------- VM names
def test_vm_named_after_membership_and_container_rack_rank(reg):
    vm = reg.add_vm("vm-container-0-14", "compute")
    assert vm.name == "compute-0-14-0"
    assert vm.container.name == "vm-container-0-14"
    assert vm.appliance == vm.membership == "compute"
    assert (vm.memory_mb, vm.cpus, vm.slice_no) == (1024, 1, 0)
    assert [(d.index, d.size_gb, d.path, d.vbd_type) for d in vm.disks] == [
        (0, DEFAULT_DISK_GB, "/state/partition1/kvm/disks/compute-0-14-0.vda", "file")]


def test_vm_takes_the_next_free_number(reg):
    names = [reg.add_vm("vm-container-0-14", "compute").name for _ in range(3)]
    assert names == ["compute-0-14-0", "compute-0-14-1", "compute-0-14-2"]
    reg.remove_vm("compute-0-14-1")
    assert reg.add_vm("vm-container-0-14", "compute").name == "compute-0-14-1"


def test_vm_on_a_container_without_rack_rank_suffix(reg):
    assert reg.add_vm("hpcdev-pub02", "compute").name == "vm-hpcdev-pub02-0"
    assert reg.add_vm("hpcdev-pub02", "nas").name == "vm-hpcdev-pub02-1"


def test_vm_uses_explicit_rack_rank_when_the_name_has_none(reg):
    reg.add_host("bigbox", "vm-container", rack=2, rank=7)
    assert reg.add_vm("bigbox", "compute").name == "compute-2-7-0"


def test_vm_membership_is_part_of_the_name(reg):
    assert reg.add_vm("compute-0-3", "nas").name == "nas-0-3-0"


def test_vm_with_explicit_name_and_sizes(reg):
    vm = reg.add_vm("compute-0-3", "compute", name="vm-hpcdev-pub03-1", disksize=40,
                    memory_mb=2048, cpus=2)
    assert (vm.name, vm.disks[0].size_gb, vm.memory_mb, vm.cpus) == (
        "vm-hpcdev-pub03-1", 40, 2048, 2)
    with pytest.raises(ValidationError, match="already exists"):
        reg.add_vm("compute-0-3", "compute", name="nas-0-0")


@pytest.mark.parametrize("kw, text", [
    ({"disksize": -1}, "invalid size"), ({"disksize": 0}, "invalid size"),
    ({"disksize": "ten"}, "invalid size"), ({"memory_mb": 0}, "invalid mem"),
    ({"cpus": -2}, "invalid cpus"), ({"cpus": 5000}, "at most 1024"),
    ({"name": "a/b"}, "invalid host name"),
])
def test_add_vm_rejects_bad_values(reg, kw, text):
    with pytest.raises(ValidationError, match=text):
        reg.add_vm("vm-container-0-14", "compute", **kw)


def test_add_vm_rejects_bad_membership_and_virtual_container(reg):
    with pytest.raises(ValidationError, match="invalid appliance"):
        reg.add_vm("vm-container-0-14", "webserver")
    reg.add_vm("vm-container-0-14", "compute")
    with pytest.raises(ValidationError, match="is a VM itself"):
        reg.add_vm("compute-0-14-0", "compute")
    with pytest.raises(NotFoundError, match="unknown host nowhere"):
        reg.add_vm("nowhere", "compute")


# --------------------------------------------------------------- attributes
def test_attribute_precedence_host_over_appliance_over_global(reg):
    vmc = "vm-container-0-14"
    assert reg.attr(vmc, "img_sync") == "false"                 # global
    reg.set_attr("img_sync", "true", appliance="vm-container")
    assert reg.attr(vmc, "img_sync") == "true"                  # appliance wins
    reg.set_attr("img_sync", "no", host=vmc)
    assert reg.attr(vmc, "img_sync") == "no"                    # host wins
    assert reg.attr("hpcdev-pub02", "img_sync") == "true"       # others keep the appliance's
    assert reg.attr("nas-0-0", "img_sync") == "false"           # other appliances the global
    reg.remove_attr("img_sync", host=vmc)
    assert reg.attr(vmc, "img_sync") == "true"
    assert reg.attr(vmc, "nothing") is None


def test_resolved_attrs_say_where_each_comes_from(reg):
    reg.set_attr("img_zpools", "tank1,tank2", host="nas-0-0")
    got = {(a.name, a.value, a.source) for a in reg.resolved_attrs("nas-0-0")}
    assert got == {("img_storage_nas", "true", "A"), ("img_sync", "false", "G"),
                   ("img_zpools", "tank1,tank2", "H")}


def test_vm_sees_its_membership_appliance_attributes(reg):
    reg.add_vm("vm-container-0-14", "compute")
    assert reg.attr("compute-0-14-0", "vm_container_zpool") == "tank"


def test_set_attr_replaces(reg):
    reg.set_attr("x", "1")
    reg.set_attr("x", "2")
    assert reg.global_attrs().count(("x", "2")) == 1


@pytest.mark.parametrize("name", ["a b", "1abc", "a/b", "a;b", ""])
def test_bad_attribute_names(reg, name):
    with pytest.raises(ValidationError):
        reg.set_attr(name, "v", host="nas-0-0")


def test_bad_attribute_values(reg):
    with pytest.raises(ValidationError, match="control characters"):
        reg.set_attr("x", "a\nb")


def test_remove_missing_attributes(reg):
    with pytest.raises(NotFoundError, match="comes from its appliance nas"):
        reg.remove_attr("img_storage_nas", host="nas-0-0")
    with pytest.raises(NotFoundError, match="comes from the global attributes"):
        reg.remove_attr("img_sync", host="nas-0-0")
    with pytest.raises(NotFoundError, match="host nas-0-0 has no attribute zz"):
        reg.remove_attr("zz", host="nas-0-0")
    with pytest.raises(NotFoundError, match="appliance nas has no attribute zz"):
        reg.remove_attr("zz", appliance="nas")
    with pytest.raises(NotFoundError, match="no global attribute zz"):
        reg.remove_attr("zz")


def test_attr_bool(reg):
    assert reg.attr_bool("compute-0-3", "img_sync") is False
    reg.set_attr("img_sync", "yes", host="compute-0-3")
    assert reg.attr_bool("compute-0-3", "img_sync") is True
    reg.set_attr("img_sync", "maybe", host="compute-0-3")
    with pytest.raises(ValidationError, match="attribute img_sync of host compute-0-3 is 'maybe'"):
        reg.attr_bool("compute-0-3", "img_sync")


def test_is_nas_by_appliance_or_attribute(reg):
    assert reg.is_nas("nas-0-0")
    assert not reg.is_nas("compute-0-3")
    reg.set_attr("img_storage_nas", "true", host="compute-0-3")
    assert reg.is_nas("compute-0-3")
    with pytest.raises(ValidationError, match="host hpcdev-pub02 is not a NAS"):
        reg.get_nas("hpcdev-pub02")


# -------------------------------------------------------------- VM on a NAS
def test_set_vm_nas_with_zpool(reg):
    reg.add_vm("vm-container-0-14", "compute")
    disk = reg.set_vm_nas("compute-0-14-0", "nas-0-0", "zank321")
    assert (disk.nas.name, disk.zpool) == ("nas-0-0", "zank321")


def test_set_vm_nas_needs_a_zpool_or_img_zpools(reg):
    reg.add_vm("vm-container-0-14", "compute")
    with pytest.raises(ValidationError, match="^you need to specify a zpool parameter or set "
                                              "the img_zpools attribute$"):
        reg.set_vm_nas("compute-0-14-0", "nas-0-0")


def test_single_img_zpools_is_used(reg):
    reg.add_vm("vm-container-0-14", "compute")
    reg.set_attr("img_zpools", "zank123", host="nas-0-0")
    assert reg.set_vm_nas("compute-0-14-0", "nas-0-0").zpool == "zank123"


def test_img_zpools_random_choice_among_listed_pools(reg):
    reg.add_vm("vm-container-0-14", "compute")
    reg.set_attr("img_zpools", " zank123 , ,zank111,", host="nas-0-0")
    seen = {reg.set_vm_nas("compute-0-14-0", "nas-0-0", rng=random.Random(seed)).zpool
            for seed in range(40)}
    assert seen == {"zank123", "zank111"}


def test_img_zpools_choice_uses_the_rng(reg):
    class Last:
        def choice(self, seq):
            return seq[-1]
    reg.set_attr("img_zpools", "a1,b2,c3", host="nas-0-0")
    assert reg.choose_zpool("nas-0-0", rng=Last()) == "c3"


def test_img_zpools_from_the_appliance_too(reg):
    reg.set_attr("img_zpools", "pool9", appliance="nas")
    assert reg.choose_zpool("nas-0-0") == "pool9"


def test_img_zpools_with_an_invalid_pool(reg):
    reg.set_attr("img_zpools", "tank,../x", host="nas-0-0")
    with pytest.raises(ValidationError, match="img_zpools of host nas-0-0"):
        reg.choose_zpool("nas-0-0")


def test_split_pools():
    assert split_pools(" a, b ,,c ") == ["a", "b", "c"]
    assert split_pools(None) == [] == split_pools("")


def test_set_vm_nas_refusals(reg):
    reg.add_vm("vm-container-0-14", "compute")
    with pytest.raises(ValidationError, match="^node compute-0-3 is not a virtual node$"):
        reg.set_vm_nas("compute-0-3", "nas-0-0", "tank")
    with pytest.raises(NotFoundError, match="unknown host nas-9-9"):
        reg.set_vm_nas("compute-0-14-0", "nas-9-9", "tank")
    with pytest.raises(ValidationError, match="is not a NAS"):
        reg.set_vm_nas("compute-0-14-0", "compute-0-3", "tank")
    with pytest.raises(ValidationError, match="invalid zpool name"):
        reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank/x")


def test_index_equal_to_the_disk_count_is_refused_not_a_crash(reg):
    """The original compared with >= the wrong way round and crashed with IndexError."""
    reg.add_vm("vm-container-0-14", "compute")
    with pytest.raises(ValidationError, match="index 1 is out of range: VM compute-0-14-0 has "
                                              "1 disk"):
        reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank", index=1)
    with pytest.raises(ValidationError, match="out of range"):
        reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank", index=-1)
    with pytest.raises(ValidationError, match="index must be an integer"):
        reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank", index="0")


def test_clear_vm_nas(reg):
    reg.add_vm("vm-container-0-14", "compute")
    reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank")
    reg.clear_vm_nas("compute-0-14-0", 0)
    disk = reg.get_vm("compute-0-14-0").disks[0]
    assert (disk.nas, disk.zpool) == (None, None)


# ----------------------------------------------------------------- removal
def test_remove_container_with_vms_is_refused(reg):
    reg.add_vm("vm-container-0-14", "compute")
    with pytest.raises(StateError, match="still has VMs \\(compute-0-14-0\\)"):
        reg.remove_host("vm-container-0-14")


def test_remove_nas_holding_disks_is_refused(reg):
    reg.add_vm("vm-container-0-14", "compute")
    reg.set_vm_nas("compute-0-14-0", "nas-0-0", "tank")
    with pytest.raises(StateError, match="holds the disks of VMs \\(compute-0-14-0\\)"):
        reg.remove_host("nas-0-0")


def test_removing_a_vm_removes_its_disks_and_attributes(reg, db):
    reg.add_vm("vm-container-0-14", "compute")
    reg.set_attr("kvm", "true", host="compute-0-14-0")
    reg.commit()
    reg.remove_host("compute-0-14-0")
    reg.commit()
    rows = dump(db)
    assert rows["vm_disks"] == [] and rows["host_attrs"] == []
    reg.remove_host("vm-container-0-14")


def test_remove_vm_of_a_physical_host_is_refused(reg):
    with pytest.raises(ValidationError, match="not a virtual node"):
        reg.remove_vm("compute-0-3")


def test_failed_unit_of_work_changes_nothing(db):
    with Registry(db) as r:
        r.add_host("vm-container-0-14", "vm-container")
    before = dump(db)
    with pytest.raises(ValidationError):
        with Registry(db) as r:
            r.add_vm("vm-container-0-14", "compute")
            r.set_attr("x", "1")
            r.add_vm("vm-container-0-14", "compute", disksize=-3)
    assert dump(db) == before
