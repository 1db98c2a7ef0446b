"""What the NAS makes of its containers' answers: a wrong one, a lost one, a late one.

The containers are scripted replies (tests/unit/nas_stub.py); the store, the
state table and the simulated target registry are the real ones.
"""
from __future__ import annotations

import time

import pytest

from imgstorage import naming
from imgstorage.errors import ImgStorageError, RpcTimeout, StateError
from imgstorage.nas.states import RUNNING_FROM_COPY, State

from .nas_stub import HOST, NAS, POOL, nas_service, success, put_row

INITIATOR = "iqn.2005-03.org.open-iscsi:" + HOST


@pytest.fixture
def nas(tmp_path):
    service, containers = nas_service(tmp_path)
    (tmp_path / "sim" / HOST).mkdir(parents=True, exist_ok=True)     # the container exists
    return service, containers


def put(service, zvol: str, state: State, target: bool = False) -> str:
    """A zvol in ``state`` on ``HOST``; with ``target`` the NAS exports it."""
    service.drivers.zfs.create_zvol(POOL, zvol, naming.GIB)
    service.store.add(zvol, POOL, naming.GIB)
    iqn = naming.target_iqn(NAS, zvol)
    if target:
        service.drivers.target.create_target(iqn, service.drivers.zfs.device_path(POOL, zvol),
                                             INITIATOR)
    put_row(service.store, zvol, state=state.value, remotehost=HOST, remotepool=POOL,
            sync=state is not State.MAPPED, iscsi_target=iqn if target else None,
            bdev="/dev/sdb")
    return iqn


def targets(service):
    return [t.iqn for t in service.drivers.target.list_targets()]


# -------------------------------------------------- unmap: "I have no copy"
@pytest.mark.parametrize("state", sorted(RUNNING_FROM_COPY, key=lambda s: s.value))
def test_no_copy_from_a_container_that_must_hold_one_changes_nothing(nas, state):
    service, containers = nas
    zvol = f"vol-{state.value}"
    iqn = put(service, zvol, state, target=state is State.MERGING)   # merging keeps its target
    containers.answers["unmap_zvol"] = success(local=False)
    before = targets(service)
    with pytest.raises(StateError) as err:
        service.unmap_zvol(zvol, 5)
    text = str(err.value)
    assert HOST in text and state.value in text and "\n" not in text
    row = service.store.get(zvol)
    assert row.state == state.value
    assert row.last_error == text
    assert (row.remotehost, row.remotepool, row.bdev) == (HOST, POOL, "/dev/sdb")
    assert row.iscsi_target == (iqn if state is State.MERGING else None)
    assert targets(service) == before
    # and a later, truthful answer unmaps it as usual
    containers.answers["unmap_zvol"] = success(local=True)
    assert service.unmap_zvol(zvol, 5) == {"syncing": True}
    assert service.store.get(zvol).state == State.FINAL_PULL.value
    assert targets(service) == []


@pytest.mark.parametrize("state", [State.MAPPED, State.UPLOADING])
def test_no_copy_is_the_normal_answer_where_the_writes_are_on_the_nas(nas, state):
    """Direct iSCSI, and a copy that never completed (the container flushed into the NAS)."""
    service, containers = nas
    zvol = f"vol-{state.value}"
    put(service, zvol, state, target=True)
    containers.answers["unmap_zvol"] = success(local=False)
    assert service.unmap_zvol(zvol, 5) == {}
    row = service.store.get(zvol)
    assert (row.state, row.remotehost, row.iscsi_target, row.last_error) == (
        State.UNMAPPED.value, None, None, None)
    assert targets(service) == []


# ------------------------------------------------- releasing the copy
def test_a_lost_release_answer_is_asked_again_and_then_unmapped(nas):
    service, containers = nas
    zvol = "vol-release"
    put(service, zvol, State.RELEASING)

    def lost(message):
        raise RpcTimeout(HOST, 30)
    containers.answers["del_local"] = lost
    service.sync._release(service.store.get(zvol))
    row = service.store.get(zvol)
    assert row.state == State.RELEASING.value and row.remotehost == HOST
    assert row.retry_at > time.time()
    assert row.last_error.startswith(f"release of {HOST}'s copy: "), row.last_error
    # the scheduler leaves it alone until its retry time, then asks again
    service.sync.tick(now=row.retry_at - 0.5)
    assert service.sync.jobs.get(zvol) is None and containers.actions() == ["del_local"]
    containers.answers["del_local"] = success(zvol=zvol)      # nothing left there: success
    service.sync.tick(now=row.retry_at + 0.5)
    deadline = time.monotonic() + 10
    while service.store.get(zvol).state != State.UNMAPPED.value:
        assert time.monotonic() < deadline, service.store.get(zvol)
        time.sleep(0.02)
    row = service.store.get(zvol)
    assert containers.actions() == ["del_local", "del_local"]
    assert (row.state, row.remotehost, row.remotepool, row.bdev, row.last_error) == (
        State.UNMAPPED.value, None, None, None, None)


def test_a_releasing_zvol_is_neither_mapped_nor_unmapped_but_can_be_cleaned(nas):
    service, containers = nas
    zvol = "vol-busy"
    put(service, zvol, State.RELEASING)
    with pytest.raises(StateError, match="still being synced home"):
        service.map_zvol(zvol, POOL, HOST, 1, POOL, True, 5)
    with pytest.raises(StateError, match="already being synced home"):
        service.unmap_zvol(zvol, 5)
    assert containers.requests == []
    assert service.clean_zvol(zvol, force=False)["was"] == State.RELEASING.value
    assert service.store.get(zvol).state == State.UNMAPPED.value


# ------------------------------------------------------ a map that timed out
def test_a_map_whose_answer_never_came_asks_the_container_to_let_go(nas):
    service, containers = nas
    zvol = "vol-late"
    containers.answers["initiator_name"] = success(initiator=INITIATOR)

    def late(message):
        raise RpcTimeout(HOST, 3)
    containers.answers["map_zvol"] = late
    containers.answers["unmap_zvol"] = success(local=False)
    with pytest.raises(RpcTimeout):
        service.map_zvol(zvol, POOL, HOST, 1, None, False, 3)
    assert containers.actions() == ["initiator_name", "map_zvol", "unmap_zvol"]
    release = containers.requests[-1][1]
    assert release == {"action": "unmap_zvol", "zvol": zvol,
                       "target": naming.target_iqn(NAS, zvol)}
    row = service.store.get(zvol)
    assert (row.state, row.remotehost, row.iscsi_target) == (State.UNMAPPED.value, None, None)
    assert targets(service) == []


def test_a_map_the_container_refused_is_not_released_there(nas):
    """A refusal means the container undid its own part, or never began: a release could
    only harm what it holds of another mapping."""
    service, containers = nas
    zvol = "vol-refused"
    containers.answers["initiator_name"] = success(initiator=INITIATOR)
    containers.answers["map_zvol"] = lambda m: {"action": "map_zvol", "status": "error",
                                                "error": f"zvol {zvol} is already local"}
    with pytest.raises(Exception, match="already local"):
        service.map_zvol(zvol, POOL, HOST, 1, None, False, 3)
    assert containers.actions() == ["initiator_name", "map_zvol"]
    assert service.store.get(zvol).state == State.UNMAPPED.value


# ------------------------------------- map of a zvol already mapped (direct)
def test_an_already_mapped_direct_zvol_is_answered_with_the_containers_disk_now(nas):
    """A container that rebooted logged in again; its disk may have another name."""
    service, containers = nas
    iqn = put(service, "vol-d", State.MAPPED, target=True)
    put_row(service.store, "vol-d", sync=False, chap_user="imgstorage-0123abcd",
            chap_secret="s3cret-s3cret-12")
    containers.answers["map_zvol"] = success(bdev="/dev/sdc")
    assert service.map_zvol("vol-d", POOL, HOST, 1, None, False, 5) == {"bdev": "/dev/sdc",
                                                                        "target": iqn}
    assert service.store.get("vol-d").bdev == "/dev/sdc"
    (_node, message), = containers.requests
    assert message["chap"] == {"userid": "imgstorage-0123abcd", "password": "s3cret-s3cret-12"}
    assert (message["target"], message["sync"]) == (iqn, False)


def test_an_already_mapped_direct_zvol_whose_container_cannot_confirm_is_an_error(nas):
    service, containers = nas
    put(service, "vol-e", State.MAPPED, target=True)
    put_row(service.store, "vol-e", sync=False)
    containers.answers["map_zvol"] = lambda m: {"action": "map_zvol", "status": "error",
                                                "error": "zvol vol-e is already broken"}
    with pytest.raises(ImgStorageError, match="could not confirm its device") as err:
        service.map_zvol("vol-e", POOL, HOST, 1, None, False, 5)
    assert "\n" not in str(err.value)
    row = service.store.get("vol-e")
    assert (row.state, row.bdev) == ("mapped", "/dev/sdb")
