"""The LIO target driver against a small stand-in for rtslib-fb's object model.

The stand-in keeps the objects it was asked to create in the same tree as
configfs would (target > TPG > LUN / ACL / portal, storage objects beside)
and records every creation, deletion and attribute write, so the tests can
check both the resulting tree and the order in which it was built.
"""
from __future__ import annotations

import sys

import pytest

from imgstorage.drivers.base import ChapCredentials, TargetDriver, TargetInfo
from imgstorage import naming
from imgstorage.drivers.lio import LioTarget, legacy_storage_name, storage_name
from imgstorage.errors import DriverError

IQN = "iqn.2001-04.com.nas-0-0-compute-0-1-0-vol"
DEV = "/dev/zvol/tank/compute-0-1-0-vol"
INIT = "iqn.1993-08.org.debian:01:3f2b9c1d7e5a"
SO_NAME = "com.nas-0-0-compute-0-1-0-vol"


class FakeRTSLibError(Exception):
    pass


class Node:
    """What every configfs object has: a way to go away, recorded."""
    kind = "node"

    def __init__(self, rts: "FakeRts", key) -> None:
        self.rts = rts
        self.key = key
        self.exists = True

    def delete(self) -> None:
        self.rts.events.append(("delete", self.kind, self.key))
        self.exists = False


class Storage(Node):
    kind = "BlockStorageObject"
    plugin = "block"

    def __init__(self, rts, name, dev):
        super().__init__(rts, name)
        self.name, self.udev_path, self.luns = name, dev, []
        rts.storage.append(self)

    @property
    def attached_luns(self):
        return iter([lun for lun in self.luns if lun.exists])

    def delete(self):
        super().delete()
        self.rts.storage.remove(self)


class Fabric:
    def __init__(self, name):
        self.name = name
        self.targets = []


class Target(Node):
    kind = "Target"

    def __init__(self, rts, fabric, wwn):
        super().__init__(rts, wwn)
        self.fabric_module, self.wwn, self.tpgs = fabric, wwn, []
        fabric.targets.append(self)

    def delete(self):
        for tpg in list(self.tpgs):
            tpg.delete()
        super().delete()
        self.fabric_module.targets.remove(self)


class TPG(Node):
    kind = "TPG"

    def __init__(self, rts, target, tag):
        super().__init__(rts, (target.wwn, tag))
        self.tag, self.luns, self.node_acls, self.network_portals = tag, [], [], []
        self.attributes = {"authentication": "0", "generate_node_acls": "0"}
        self._enable = False
        target.tpgs.append(self)

    def set_attribute(self, name, value):
        self.rts.events.append(("set_attribute", name, value))
        self.attributes[name] = value

    def get_attribute(self, name):
        return self.attributes[name]

    @property
    def enable(self):
        return self._enable

    @enable.setter
    def enable(self, value):
        self.rts.events.append(("set", "enable", value))
        self._enable = value

    def delete(self):
        for child in self.node_acls + self.luns + self.network_portals:
            child.delete()
        super().delete()


class LUN(Node):
    kind = "LUN"

    def __init__(self, rts, tpg, lun, storage_object):
        super().__init__(rts, lun)
        self.lun, self.storage_object = lun, storage_object
        tpg.luns.append(self)
        storage_object.luns.append(self)


class NodeACL(Node):
    kind = "NodeACL"

    def __init__(self, rts, tpg, wwn):
        super().__init__(rts, wwn)
        self.node_wwn, self.mapped_luns = wwn, []
        self._chap = {"chap_userid": "", "chap_password": ""}
        tpg.node_acls.append(self)

    def _set(self, name, value):
        self.rts.events.append(("set", name, value))
        self._chap[name] = value

    chap_userid = property(lambda self: self._chap["chap_userid"],
                           lambda self, v: self._set("chap_userid", v))
    chap_password = property(lambda self: self._chap["chap_password"],
                             lambda self, v: self._set("chap_password", v))


class FakeRts:
    """Module-like: the attribute names the driver uses from rtslib_fb."""

    RTSLibError = FakeRTSLibError

    def __init__(self):
        self.events = []
        self.storage = []
        self.fail = set()
        self.iscsi = Fabric("iscsi")
        self.loopback = Fabric("loopback")

    def _create(self, kind, *detail):
        if kind in self.fail:
            raise FakeRTSLibError(f"cannot create {kind}")
        self.events.append(("create", kind, *detail))

    def RTSRoot(self):
        rts = self

        class Root:
            @property
            def targets(self):
                return iter(rts.iscsi.targets + rts.loopback.targets)

            @property
            def storage_objects(self):
                return iter(list(rts.storage))
        return Root()

    def FabricModule(self, name):
        assert name == "iscsi"
        return self.iscsi

    def BlockStorageObject(self, name, dev=None):
        self._create("BlockStorageObject", name, dev)
        return Storage(self, name, dev)

    def Target(self, fabric, wwn, mode="any"):
        # rtslib-fb's normalize_wwn: lowercase first, then refuse '_' and spaces
        wwn = wwn.lower()
        if "_" in wwn or " " in wwn:
            raise FakeRTSLibError(f"WWN not valid as: iqn ({wwn})")
        assert mode == "create"
        if any(t.wwn == wwn for t in fabric.targets):
            raise FakeRTSLibError("This Target already exists in configFS")
        self._create("Target", wwn)
        return Target(self, fabric, wwn)

    def TPG(self, target, tag, mode="any"):
        self._create("TPG", tag)
        return TPG(self, target, tag)

    def NetworkPortal(self, tpg, ip, port=3260, mode="any"):
        self._create("NetworkPortal", ip, port)
        portal = Node(self, (ip, port))
        tpg.network_portals.append(portal)
        return portal

    def LUN(self, tpg, lun, storage_object):
        self._create("LUN", lun, storage_object.name)
        return LUN(self, tpg, lun, storage_object)

    def NodeACL(self, tpg, wwn, mode="any"):
        self._create("NodeACL", wwn)
        return NodeACL(self, tpg, wwn)

    def MappedLUN(self, acl, mapped_lun, tpg_lun):
        self._create("MappedLUN", mapped_lun, tpg_lun.lun)
        mapped = Node(self, mapped_lun)
        acl.mapped_luns.append(mapped)
        return mapped


@pytest.fixture
def rts():
    return FakeRts()


def exported(rts, chap=None):
    """An existing export, made by the driver itself; the record starts after it."""
    LioTarget(rts).create_target(IQN, DEV, INIT, chap)
    rts.events.clear()
    return rts


# ----------------------------------------------------------------- creating
def test_create_builds_one_locked_down_export(rts):
    LioTarget(rts).create_target(IQN, DEV, INIT)
    assert rts.events == [
        ("create", "BlockStorageObject", SO_NAME, DEV),
        ("create", "Target", IQN),
        ("create", "TPG", 1),
        ("set_attribute", "generate_node_acls", "0"),
        ("set_attribute", "authentication", "0"),
        ("create", "NetworkPortal", "0.0.0.0", 3260),
        ("create", "LUN", 0, SO_NAME),
        ("create", "NodeACL", INIT),
        ("create", "MappedLUN", 0, 0),
        ("set", "enable", True),
    ]
    assert LioTarget(rts).list_targets() == [TargetInfo(IQN, DEV, [INIT])]


def test_create_with_chap_sets_the_acl_credentials_and_requires_auth(rts):
    LioTarget(rts).create_target(IQN, DEV, INIT, ChapCredentials("vm1", "pw1"))
    assert ("set_attribute", "authentication", "1") in rts.events
    assert ("set_attribute", "authentication", "0") not in rts.events
    acl_events = rts.events[rts.events.index(("create", "MappedLUN", 0, 0)) + 1:]
    assert acl_events == [("set", "chap_userid", "vm1"), ("set", "chap_password", "pw1"),
                          ("set", "enable", True)]


def test_portal_address_is_configurable(rts):
    LioTarget(rts, portal_ip="10.2.20.250", portal_port=3261).create_target(IQN, DEV, INIT)
    assert ("create", "NetworkPortal", "10.2.20.250", 3261) in rts.events


def test_creating_the_same_export_again_is_a_no_op(rts):
    exported(rts)
    LioTarget(rts).create_target(IQN, DEV, INIT)
    assert rts.events == []


def test_creating_again_with_new_credentials_updates_them(rts):
    exported(rts, ChapCredentials("vm1", "old"))
    LioTarget(rts).create_target(IQN, DEV, INIT, ChapCredentials("vm1", "new"))
    assert rts.events == [("set", "chap_userid", "vm1"), ("set", "chap_password", "new")]


def test_creating_again_with_credentials_turns_auth_on(rts):
    exported(rts)
    LioTarget(rts).create_target(IQN, DEV, INIT, ChapCredentials("vm1", "pw1"))
    assert rts.events == [("set", "chap_userid", "vm1"), ("set", "chap_password", "pw1"),
                          ("set_attribute", "authentication", "1")]


@pytest.mark.parametrize("device,initiator", [
    ("/dev/zvol/tank/other", INIT),
    (DEV, "iqn.1993-08.org.debian:01:intruder"),
])
def test_the_same_name_for_another_export_is_refused(rts, device, initiator):
    exported(rts)
    with pytest.raises(DriverError, match="already exists"):
        LioTarget(rts).create_target(IQN, device, initiator)
    assert rts.events == []


@pytest.mark.parametrize("failing", ["Target", "NetworkPortal", "LUN", "NodeACL", "MappedLUN"])
def test_a_partial_failure_removes_what_was_made(rts, failing):
    rts.fail.add(failing)
    with pytest.raises(DriverError) as err:
        LioTarget(rts).create_target(IQN, DEV, INIT)
    assert f"cannot create {failing}" in str(err.value) and IQN in str(err.value)
    assert rts.iscsi.targets == [] and rts.storage == []
    assert ("delete", "BlockStorageObject", SO_NAME) in rts.events
    if failing != "Target":
        assert ("delete", "Target", IQN) in rts.events


def test_a_storage_object_left_by_an_interrupted_export_is_reused(rts):
    rts.BlockStorageObject(SO_NAME, dev=DEV)
    rts.events.clear()
    LioTarget(rts).create_target(IQN, DEV, INIT)
    assert not any(e[:2] == ("create", "BlockStorageObject") for e in rts.events)
    assert LioTarget(rts).list_targets() == [TargetInfo(IQN, DEV, [INIT])]


def test_a_storage_object_of_the_same_name_for_another_device_is_refused(rts):
    rts.BlockStorageObject(SO_NAME, dev="/dev/sdz")
    rts.events.clear()
    with pytest.raises(DriverError, match="already exists for /dev/sdz"):
        LioTarget(rts).create_target(IQN, DEV, INIT)
    assert rts.events == [] and rts.iscsi.targets == []


# ----------------------------------------------------------------- deleting
def test_delete_removes_the_target_and_its_storage_object(rts):
    exported(rts)
    LioTarget(rts).delete_target(IQN)
    assert ("delete", "Target", IQN) in rts.events
    assert rts.events[-1] == ("delete", "BlockStorageObject", SO_NAME)
    assert rts.iscsi.targets == [] and rts.storage == []


def test_delete_of_a_target_already_gone_is_fine(rts):
    LioTarget(rts).delete_target(IQN)
    assert rts.events == []


def test_delete_cleans_a_leftover_storage_object(rts):
    rts.BlockStorageObject(SO_NAME, dev=DEV)
    rts.events.clear()
    LioTarget(rts).delete_target(IQN)
    assert rts.events == [("delete", "BlockStorageObject", SO_NAME)]


def test_delete_keeps_a_storage_object_another_target_still_uses(rts):
    exported(rts)
    other = rts.Target(rts.iscsi, "iqn.2001-04.com.nas-0-0-shared", mode="create")
    rts.LUN(rts.TPG(other, 1), 0, rts.storage[0])
    rts.events.clear()
    LioTarget(rts).delete_target(IQN)
    assert rts.events[-1] == ("delete", "Target", IQN)
    assert len(rts.storage) == 1


# ------------------------------------------------------------------ listing
def test_list_targets_ignores_other_fabrics(rts):
    exported(rts)
    Target(rts, rts.loopback, "naa.5001405abcdef012")
    assert [t.iqn for t in LioTarget(rts).list_targets()] == [IQN]


def test_rtslib_errors_become_driver_errors(rts):
    def broken():
        raise FakeRTSLibError("configfs is not mounted")
    rts.RTSRoot = broken
    with pytest.raises(DriverError, match="could not list the LIO targets: configfs is not mounted"):
        LioTarget(rts).list_targets()


def test_rtslib_is_imported_only_when_used(monkeypatch, rts):
    monkeypatch.setitem(sys.modules, "rtslib_fb", None)
    driver = LioTarget()  # constructing must not need rtslib-fb
    with pytest.raises(DriverError, match="rtslib-fb"):
        driver.list_targets()
    monkeypatch.setitem(sys.modules, "rtslib_fb", rts)
    assert LioTarget().rts is rts


def test_storage_names_are_safe_configfs_names():
    assert storage_name(IQN) == SO_NAME
    assert storage_name("iqn.2003-01.org.example:nas/vol 1") == "org.example_nas_vol_1"


# ---------------------------------------------- names as the kernel keeps them
def test_storage_names_are_one_per_target_name():
    iqns = [naming.target_iqn("nas-0-0", z) for z in ("x:b", "y:b", "b", "x-b", "Vol1", "vol1")]
    assert len({storage_name(i) for i in iqns}) == len(iqns)


@pytest.mark.parametrize("zvol", ["Vol1", "a_b", "x:b"])
def test_an_export_of_any_zvol_name_is_found_again_and_removed(rts, zvol):
    iqn = naming.target_iqn("nas-0-0", zvol)
    dev = f"/dev/zvol/tank/{zvol}"
    LioTarget(rts).create_target(iqn, dev, INIT)
    assert [t.iqn for t in LioTarget(rts).list_targets()] == [iqn]
    LioTarget(rts).create_target(iqn, dev, INIT)        # asked again: found, not re-made
    assert len(rts.iscsi.targets) == 1
    LioTarget(rts).delete_target(iqn)
    assert rts.iscsi.targets == [] and rts.storage == []


def test_a_target_created_with_capitals_is_found_by_that_name(rts):
    """Earlier releases asked for ``...-Vol1``; LIO made ``...-vol1``: unmap still finds it."""
    old = "iqn.2001-04.com.nas-0-0-Vol1"
    LioTarget(rts).create_target(old, "/dev/zvol/tank/Vol1", INIT)
    assert [t.wwn for t in rts.iscsi.targets] == [old.lower()]
    LioTarget(rts).create_target(old, "/dev/zvol/tank/Vol1", INIT)
    assert len(rts.iscsi.targets) == 1
    LioTarget(rts).delete_target(old)
    assert rts.iscsi.targets == [] and rts.storage == []


def test_a_name_lio_refuses_is_refused_before_anything_is_made(rts):
    with pytest.raises(DriverError, match="may not contain '_'"):
        LioTarget(rts).create_target("iqn.2001-04.com.nas-0-0-a_b", "/dev/zvol/tank/a_b", INIT)
    assert rts.events == [] and rts.storage == []


def test_two_zvols_sharing_a_name_after_the_colon_get_their_own_exports(rts):
    driver = LioTarget(rts)
    for zvol in ("x:b", "y:b"):
        driver.create_target(naming.target_iqn("nas-0-0", zvol), f"/dev/zvol/tank/{zvol}", INIT)
    assert sorted(t.device for t in driver.list_targets()) == ["/dev/zvol/tank/x:b",
                                                               "/dev/zvol/tank/y:b"]
    driver.delete_target(naming.target_iqn("nas-0-0", "x:b"))
    assert [t.device for t in driver.list_targets()] == ["/dev/zvol/tank/y:b"]
    assert [so.udev_path for so in rts.storage] == ["/dev/zvol/tank/y:b"]


def test_a_leftover_backstore_named_by_an_earlier_release_is_cleaned(rts):
    iqn = naming.target_iqn("nas-0-0", "x:b")
    rts.BlockStorageObject(legacy_storage_name(iqn), dev="/dev/zvol/tank/x:b")
    rts.events.clear()
    LioTarget(rts).delete_target(iqn)
    assert rts.events == [("delete", "BlockStorageObject", "b")]


def test_implements_the_protocol(rts):
    assert isinstance(LioTarget(rts), TargetDriver)
