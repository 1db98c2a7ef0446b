"""What the NAS makes of its containers' answers: a wrong one, a lost one, a late one.

The containers are scripted replies (tests/unit/nas_stub.py); the store, the
state table and the simulated target registry are the real ones.
"""
from __future__ import annotations

import time

import pytest

from imgstorage import naming, protocol
from imgstorage.errors import (ImgStorageError, NotResumableError, RemoteError, RpcTimeout,
                               StateError)
from imgstorage.nas.jobs import Job
from imgstorage.nas.states import RUNNING_FROM_COPY, State
from imgstorage.nas.sync import BUSY_RETRY, not_resumable

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


# ------------------------------------------- the container's kind of failure (its code)
def refuse(text: str, code: str):
    return lambda message: protocol.error(message["action"], text, code)


def test_a_container_state_refusal_of_a_map_reaches_the_caller_as_a_state_error(nas):
    service, containers = nas
    containers.answers["initiator_name"] = success(initiator=INITIATOR)
    containers.answers["map_zvol"] = refuse(f"{POOL}/vol-left already exists on {HOST}", "state")
    with pytest.raises(RemoteError) as err:
        service.map_zvol("vol-left", POOL, HOST, 1, POOL, True, 5)
    assert err.value.code == "state"
    assert str(err.value) == ("Error attaching iSCSI target to compute node: "
                              f"{POOL}/vol-left already exists on {HOST}")
    # it undid its own part: it is not asked to let go, and nothing stays here
    assert containers.actions() == ["initiator_name", "map_zvol"]
    assert service.store.get("vol-left").state == State.UNMAPPED.value
    assert targets(service) == []


def test_a_busy_container_fails_an_unmap_as_busy_and_changes_nothing(nas):
    service, containers = nas
    iqn = put(service, "vol-held", State.MAPPED, target=True)
    containers.answers["unmap_zvol"] = refuse("vol-held is busy (map_zvol)", "busy")
    with pytest.raises(RemoteError) as err:
        service.unmap_zvol("vol-held", 5)
    assert err.value.code == "busy"
    assert "vol-held is busy" in str(err.value)
    assert service.store.get("vol-held").state == State.MAPPED.value
    assert targets(service) == [iqn]


class NoStream:
    """A transport that records what it was asked to move and moves nothing."""

    def __init__(self) -> None:
        self.uploads = []

    def upload(self, row, open_source, job, rate, base=None) -> None:
        self.uploads.append(row.zvol)


def test_a_busy_container_is_asked_again_soon_without_counting_a_failure(nas):
    service, containers = nas
    put(service, "vol-copy", State.UPLOADING, target=True)
    service.transport = NoStream()
    containers.answers["recv_zvol"] = refuse("vol-copy is busy (unmap_zvol)", "busy")
    before = time.time()
    service.sync._upload(Job("vol-copy", "upload"))
    row = service.store.get("vol-copy")
    assert (row.state, row.failures or 0, row.last_error) == (State.UPLOADING.value, 0, None)
    assert before < row.retry_at <= time.time() + BUSY_RETRY
    # any other refusal counts and backs off
    containers.answers["recv_zvol"] = refuse("vol-copy is detaching", "state")
    service.sync._upload(Job("vol-copy", "upload"))
    row = service.store.get("vol-copy")
    assert row.failures == 1 and row.last_error == "NAS->VM copy: vol-copy is detaching"
    assert service.transport.uploads == []


def test_a_resume_token_zfs_refuses_starts_the_copy_over(nas):
    service, containers = nas
    put(service, "vol-token", State.UPLOADING, target=True)
    service.transport = NoStream()
    containers.answers["recv_zvol"] = success(state="snapshot", resume_token="1-abc-12-789c",
                                              snapshots=[])
    containers.answers["sync_zvol"] = success(merging=True)
    service.sync._upload(Job("vol-token", "upload"))
    assert containers.actions() == ["recv_zvol", "recv_zvol", "sync_zvol"]
    assert containers.requests[1][1] == {"action": "recv_zvol", "zvol": "vol-token",
                                         "restart": True}
    assert service.transport.uploads == ["vol-token"]
    assert service.store.get("vol-token").state == State.MERGING.value


def test_not_resumable_is_known_by_its_code_not_its_words():
    assert not_resumable(NotResumableError("cannot resume send: resume token is corrupt"))
    assert not_resumable(RemoteError(HOST, "send_zvol", "the snapshot went away",
                                     "not_resumable"))
    assert not not_resumable(RemoteError(HOST, "send_zvol", "cannot resume send: x", "driver"))
    assert not not_resumable(ValueError("cannot resume send"))


# ------------------------------------------- a merge report ahead of the copy's record
def test_a_merge_report_that_comes_before_the_copys_record_is_kept_for_it(nas):
    """An empty temp-write store merges at once: the container's report can overtake the
    answer to sync_zvol, and must not wait for the periodic merge check."""
    service, containers = nas
    iqn = put(service, "vol-quick", State.UPLOADING, target=True)
    snap = "IMG-STORAGE-20261124T000000-000001"
    service.drivers.zfs.snapshot(POOL, "vol-quick", snap)

    def sync_zvol(message):
        service.zvol_synced("vol-quick", True, None)       # arrives before the answer
        return {"action": "sync_zvol", "status": "success"}
    containers.answers["sync_zvol"] = sync_zvol
    service.sync._hand_over(service.store.get("vol-quick"), snap, "snapshot")
    row = service.store.get("vol-quick")
    assert (row.state, row.iscsi_target) == (State.LOCAL.value, None)
    assert iqn not in targets(service)
    assert service.sync.early_reports == set()


def test_a_report_of_an_earlier_mapping_is_forgotten_by_the_next_map(nas):
    service, containers = nas
    put(service, "vol-old", State.UPLOADING)
    service.zvol_synced("vol-old", True, None)
    assert service.sync.early_reports == {"vol-old"}
    put_row(service.store, "vol-old", state=State.UNMAPPED.value, iscsi_target=None)
    containers.answers["initiator_name"] = success(initiator=INITIATOR)
    containers.answers["map_zvol"] = success(bdev="/dev/mapper/vol-old-snap")
    service.map_zvol("vol-old", POOL, HOST, 1, POOL, True, 5)
    assert service.sync.early_reports == set()
