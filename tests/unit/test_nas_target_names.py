"""Target names on the NAS: any zvol name maps, is found again and unmaps cleanly.

The simulated target is as strict as LIO about names (lowercase, no ``_``),
so a target name LIO would change or refuse fails here as on a real NAS.
"""
from __future__ import annotations

import pytest

from imgstorage import naming
from imgstorage.errors import DriverError, StateError
from imgstorage.nas.states import State

from .nas_stub import HOST, NAS, POOL, nas_service, put_row, success

INITIATOR = "iqn.2005-03.org.open-iscsi:" + HOST


@pytest.fixture
def nas(tmp_path):
    service, containers = nas_service(tmp_path)
    (tmp_path / "sim" / HOST).mkdir(parents=True, exist_ok=True)
    containers.answers["initiator_name"] = success(initiator=INITIATOR)
    containers.answers["map_zvol"] = success(bdev="/dev/sdb")
    containers.answers["unmap_zvol"] = success(local=False)
    return service, containers


def targets(service):
    return sorted(t.iqn for t in service.drivers.target.list_targets())


@pytest.mark.parametrize("bad", ["iqn.2001-04.com.nas-0-0-Vol1", "iqn.2001-04.com.nas-0-0-a_b"])
def test_the_simulated_target_refuses_names_lio_would_not_keep(nas, bad):
    service, _ = nas
    service.drivers.zfs.create_zvol(POOL, "v", naming.GIB)
    with pytest.raises(DriverError, match="lowercase and refuses '_'"):
        service.drivers.target.create_target(bad, service.drivers.zfs.device_path(POOL, "v"),
                                             INITIATOR)
    assert targets(service) == []


def test_zvols_of_any_name_map_and_unmap_without_leaving_an_export(nas):
    service, _ = nas
    zvols = ["Vol1", "vol1", "a_b", "a-b", "x:b", "y:b"]
    for zvol in zvols:
        out = service.map_zvol(zvol, POOL, HOST, 1, None, False, 5)
        assert out["target"] == naming.target_iqn(NAS, zvol)
    assert targets(service) == sorted(naming.target_iqn(NAS, z) for z in zvols)
    for zvol in zvols:
        service.unmap_zvol(zvol, 5)
        assert service.store.get(zvol).state == State.UNMAPPED.value
    assert targets(service) == []


def test_a_target_name_held_by_another_zvol_is_refused_and_nothing_changes(nas):
    service, containers = nas
    service.drivers.zfs.create_zvol(POOL, "other", naming.GIB)
    service.store.add("other", POOL, naming.GIB)
    put_row(service.store, "other", state=State.MAPPED.value, remotehost=HOST,
            iscsi_target=naming.target_iqn(NAS, "vol2").upper())
    with pytest.raises(StateError, match="cannot map vol2: its iSCSI target name is in use "
                                         "by zvol other"):
        service.map_zvol("vol2", POOL, HOST, 1, None, False, 5)
    assert service.store.get("vol2") is None
    assert service.drivers.zfs.get_zvol(POOL, "vol2") is None
    assert containers.requests == []

