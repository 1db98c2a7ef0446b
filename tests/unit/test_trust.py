"""Who may ask what of a node (imgstorage/trust.py), and handlers that refuse the rest.

The policy is checked as a table first; then a container and a NAS, built on
the simulated kernel with a real mapping, are asked by senders that may not,
and nothing of the zvol (devices, sessions, local copies, rows, the lock)
may change.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from imgstorage import naming, trust
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import zfs as sim_zfs
from imgstorage.errors import ForbiddenError
from imgstorage.messaging import Envelope
from imgstorage.nas import handlers as nas_handlers
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService

from .nas_stub import HOST as NAS_HOST, nas_service, put_row

ADMIN, NAS, OTHER_NAS, HOST, OTHER_HOST = ("admin", "nas-0-0", "nas-0-1", "compute-0-3",
                                           "vm-container-0-14")
POOL, ZVOL = "tank", "vol1"
MIB = 1024 * 1024
SIZE = 64 * MIB
CHAP = ChapCredentials("imgstorage-0123abcd", "s3cret-s3cret-12")
TARGET = naming.target_iqn(NAS, ZVOL)


def cfg(**extra):
    return from_dict({"name": HOST, **extra})


STRICT = cfg(admin_users=[ADMIN], nas_users=[NAS, OTHER_NAS])
OPEN = cfg(nas_users=[NAS])


# -- the policy as a table ------------------------------------------------------
@pytest.mark.parametrize("user,action,has_row,owner,allowed", [
    # anybody may ping
    (None, "ping", False, None, True),
    (OTHER_HOST, "ping", False, None, True),
    # an administrator may ask anything, of anybody's zvol
    (ADMIN, "clean_zvol", True, NAS, True),
    (ADMIN, "clean_zvol", False, None, True),
    (ADMIN, "list_dev", False, None, True),
    # a stranger may ask nothing else
    (OTHER_HOST, "list_dev", False, None, False),
    (OTHER_HOST, "initiator_name", False, None, False),
    (OTHER_HOST, "map_zvol", False, None, False),
    (None, "del_local", False, None, False),
    ("guest", "unmap_zvol", True, NAS, False),
    # a NAS of the container: listings, and its own zvols
    (NAS, "list_dev", False, None, True),
    (NAS, "initiator_name", False, None, True),
    (NAS, "map_zvol", False, None, True),
    (NAS, "map_zvol", True, NAS, True),
    (OTHER_NAS, "map_zvol", True, NAS, False),
    (NAS, "unmap_zvol", True, NAS, True),
    (NAS, "clean_zvol", True, NAS, True),
    (NAS, "send_zvol", True, NAS, True),
    (NAS, "unmap_zvol", True, None, False),
    (NAS, "del_local", True, None, False),
    # ... never another NAS's
    *[(OTHER_NAS, action, True, NAS, False) for action in sorted(trust.ZVOL_ACTIONS)],
    # with no row, what only answers "nothing here"; clean removes by name: refused
    *[(NAS, action, False, None, True) for action in sorted(trust.VM_NO_ROW)],
    (NAS, "clean_zvol", False, None, False),
])
def test_the_container_policy(user, action, has_row, owner, allowed):
    why = trust.vm_refusal(STRICT, user, action, has_row, owner)
    assert (why is None) is allowed, why


def test_an_open_container_takes_anything_from_anybody():
    assert OPEN.strict is False
    for action in sorted(trust.ZVOL_ACTIONS | trust.VM_ANY_NAS | {"map_zvol"}):
        assert trust.vm_refusal(OPEN, "guest", action, True, NAS) is None
    assert trust.vm_map_refusal(OPEN, "guest", NAS) is None
    assert trust.map_as(OPEN, "guest", NAS) == NAS


def test_a_nas_maps_only_in_its_own_name():
    assert trust.vm_map_refusal(STRICT, NAS, None) is None
    assert trust.vm_map_refusal(STRICT, NAS, NAS) is None
    assert "names nas-0-1" in trust.vm_map_refusal(STRICT, NAS, OTHER_NAS)
    assert trust.vm_map_refusal(STRICT, ADMIN, OTHER_NAS) is None
    # the row records the sender, whatever the request left out
    assert trust.map_as(STRICT, NAS, None) == NAS
    assert trust.map_as(STRICT, ADMIN, OTHER_NAS) == OTHER_NAS


def test_a_nas_names_no_target_but_the_zvols_own():
    assert trust.vm_target_refusal(STRICT, NAS, ZVOL, None, True, TARGET) is None
    assert trust.vm_target_refusal(STRICT, NAS, ZVOL, TARGET, True, TARGET) is None
    other = naming.target_iqn(NAS, "vol2")
    assert trust.vm_target_refusal(STRICT, NAS, ZVOL, other, True, TARGET) is not None
    # no row: only the sender's own export of that zvol
    assert trust.vm_target_refusal(STRICT, NAS, ZVOL, TARGET, False, None) is None
    assert trust.vm_target_refusal(STRICT, OTHER_NAS, ZVOL, TARGET, False, None) is not None
    assert trust.vm_target_refusal(STRICT, ADMIN, ZVOL, other, True, TARGET) is None


NAS_STRICT = from_dict({"name": NAS, "admin_users": [ADMIN]})


@pytest.mark.parametrize("action", sorted(nas_handlers.MANAGEMENT | nas_handlers.QUICK
                                          - {"ping"}))
def test_the_nas_takes_management_and_listings_only_from_administrators(action):
    assert trust.nas_refusal(NAS_STRICT, ADMIN, action) is None
    assert trust.nas_refusal(NAS_STRICT, HOST, action) is not None
    assert trust.nas_refusal(NAS_STRICT, None, action) is not None
    assert trust.nas_refusal(from_dict({"name": NAS}), HOST, action) is None


def test_the_nas_takes_a_report_only_from_the_zvols_container():
    assert trust.nas_refusal(NAS_STRICT, HOST, "zvol_synced") is None  # checked on the row
    assert trust.nas_refusal(NAS_STRICT, HOST, "ping") is None
    assert trust.notification_refusal(NAS_STRICT, HOST, HOST) is None
    assert "mapped to compute-0-3" in trust.notification_refusal(NAS_STRICT, OTHER_HOST, HOST)
    assert trust.notification_refusal(NAS_STRICT, HOST, None) is not None
    assert trust.notification_refusal(NAS_STRICT, ADMIN, HOST) is None
    assert trust.notification_refusal(from_dict({"name": NAS}), OTHER_HOST, HOST) is None


def test_a_refusal_is_one_warning_with_who_what_which_zvol_and_why(caplog):
    with caplog.at_level(logging.WARNING, logger="imgstorage.trust"):
        exc = trust.refused(STRICT, OTHER_NAS, "clean_zvol", ZVOL, "not yours")
    assert isinstance(exc, ForbiddenError) and exc.code == "forbidden"
    [record] = caplog.records
    line = record.getMessage()
    assert record.levelno == logging.WARNING
    for part in (OTHER_NAS, "clean_zvol of vol1", HOST, "not yours"):
        assert part in line and part in str(exc)


# -- a container on the simulated kernel ----------------------------------------
@pytest.fixture
def container(tmp_path):
    root = tmp_path / "sim"
    sim_zfs.create_pool(root, NAS, POOL, 1 << 40)
    sim_zfs.create_pool(root, HOST, POOL, 1 << 40)
    nas_cfg = from_dict({"name": NAS, "backend": "sim", "sim_root": str(root),
                         "db": str(tmp_path / "nas.db")})
    nas = node_drivers(nas_cfg)
    nas.zfs.create_zvol(POOL, ZVOL, SIZE)
    disk = nas.zfs.device_path(POOL, ZVOL)
    config = from_dict({"name": HOST, "backend": "sim", "sim_root": str(root),
                        "db": str(tmp_path / "vm.db"), "admin_users": [ADMIN],
                        "nas_users": [NAS, OTHER_NAS]})
    engine = make_engine(config.db)
    create_schema(engine, VmBase)
    service = VmService(config, engine, node_drivers(config))
    nas.target.create_target(TARGET, disk, service.initiator_name(), CHAP)
    return tmp_path, service, vm_handlers.build(service)


def request(action: str, user, **body) -> Envelope:
    return Envelope(action=action, body={"action": action, **body}, message_id=f"m-{action}",
                    reply_to="q", user_id=user, deadline=time.time() + 30)


def map_request(user, **extra) -> Envelope:
    return request("map_zvol", user, zvol=ZVOL, target=TARGET, nas=NAS, sync=True,
                   remotepool=POOL, volsize=SIZE,
                   chap={"userid": CHAP.userid, "password": CHAP.password}, **extra)


def state(tmp_path: Path) -> tuple:
    """The container's rows and every file of the simulated kernel, bytes included."""
    con = sqlite3.connect(tmp_path / "vm.db")
    try:
        rows = sorted(con.execute("SELECT * FROM vm_zvols").fetchall(), key=repr)
    finally:
        con.close()
    files = sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None)
                   for p in (tmp_path / "sim").rglob("*"))
    return rows, files


ATTACKS = {
    "clean_zvol": {"zvol": ZVOL},
    "del_local": {"zvol": ZVOL},
    "send_zvol": {"zvol": ZVOL, "snap": "imgstorage-attack", "base": None},
    "recv_zvol": {"zvol": ZVOL, "restart": True},
    "sync_zvol": {"zvol": ZVOL},
    "unmap_zvol": {"zvol": ZVOL, "target": TARGET},
    "map_zvol": None,
}


class Held:
    """The zvol's lock held for the test's length: a refusal must not wait for it."""

    def __init__(self, service: VmService):
        self.release = threading.Event()
        self.holding = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(service,), daemon=True)

    def _run(self, service: VmService) -> None:
        with service.zvol_lock(ZVOL, raise_busy=False):
            self.holding.set()
            self.release.wait(30)

    def __enter__(self):
        self.thread.start()
        assert self.holding.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)
        return False


@pytest.mark.parametrize("sender", [OTHER_NAS, OTHER_HOST, None])
@pytest.mark.parametrize("action", sorted(ATTACKS))
def test_a_container_refuses_a_non_owner_and_changes_nothing(container, action, sender, caplog):
    tmp_path, service, handlers = container
    reply = handlers["map_zvol"](map_request(NAS))
    assert reply["status"] == "success" and service.row(ZVOL).nas_node == NAS
    before = state(tmp_path)
    env = (map_request(sender) if action == "map_zvol"
           else request(action, sender, **ATTACKS[action]))
    caplog.clear()
    with Held(service), caplog.at_level(logging.WARNING):
        with pytest.raises(ForbiddenError):
            handlers[action](env)
    assert state(tmp_path) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and action in warnings[0] and ZVOL in warnings[0], warnings


def test_the_owner_is_heard_and_an_administrator_too(container):
    tmp_path, service, handlers = container
    handlers["map_zvol"](map_request(NAS))
    assert handlers["list_dev"](request("list_dev", OTHER_NAS))["body"][ZVOL]["state"] == \
        "snapshot"
    with pytest.raises(ForbiddenError):
        handlers["list_dev"](request("list_dev", OTHER_HOST))
    there = handlers["recv_zvol"](request("recv_zvol", NAS, zvol=ZVOL))
    assert there["status"] == "success" and there["state"] == "snapshot"
    out = handlers["clean_zvol"](request("clean_zvol", ADMIN, zvol=ZVOL))
    assert f"destroyed {POOL}/{ZVOL}" in out["done"]
    assert service.row(ZVOL) is None


def kept_here(service: VmService) -> None:
    """A copy kept after the VM stopped, as NAS's final pull and its keep request left it."""
    from imgstorage.vm.states import Event
    zfs = service.drivers.zfs
    zfs.create_zvol(POOL, ZVOL, SIZE)
    zfs.snapshot(POOL, ZVOL, "IMG-STORAGE-1")
    service.store.add(ZVOL, nas=NAS, nas_node=NAS, iscsi_target=TARGET, sync=True,
                      remotepool=POOL)
    for event in (Event.SNAPSHOTTED, Event.MERGE, Event.MERGED, Event.SWITCHED, Event.RELEASE):
        service.store.transition(ZVOL, event)
    service.store.transition(ZVOL, Event.KEEP, kept_snapshot="IMG-STORAGE-1", iscsi_target=None)


def test_a_kept_copy_is_its_nas_alone_but_any_nas_may_map_over_it(container):
    tmp_path, service, handlers = container
    kept_here(service)
    before = state(tmp_path)
    for action, body in (("del_local", {}), ("recv_zvol", {"restart": True}), ("clean_zvol", {}),
                         ("send_zvol", {"snap": "s"})):
        with pytest.raises(ForbiddenError):
            handlers[action](request(action, OTHER_NAS, zvol=ZVOL, **body))
    assert state(tmp_path) == before
    # the other NAS maps the zvol (say the VM's disk moved there): the kept copy goes
    other = naming.target_iqn(OTHER_NAS, ZVOL)
    sim_zfs.create_pool(tmp_path / "sim", OTHER_NAS, POOL, 1 << 40)
    there = node_drivers(from_dict({"name": OTHER_NAS, "backend": "sim",
                                    "sim_root": str(tmp_path / "sim"),
                                    "db": str(tmp_path / "other.db")}))
    there.zfs.create_zvol(POOL, ZVOL, SIZE)
    there.target.create_target(other, there.zfs.device_path(POOL, ZVOL),
                               service.initiator_name(), CHAP)
    reply = handlers["map_zvol"](request(
        "map_zvol", OTHER_NAS, zvol=ZVOL, target=other, nas=OTHER_NAS, sync=False,
        chap={"userid": CHAP.userid, "password": CHAP.password}))
    assert reply["status"] == "success"
    row = service.row(ZVOL)
    assert (row.state, row.nas_node) == ("attached", OTHER_NAS)
    assert service.drivers.zfs.get_zvol(POOL, ZVOL) is None


def test_a_nas_mapping_in_another_nas_name_is_refused_and_the_row_records_the_sender(container):
    tmp_path, service, handlers = container
    before = state(tmp_path)
    with pytest.raises(ForbiddenError, match="names nas-0-1"):
        handlers["map_zvol"](map_request(NAS, nas_node=OTHER_NAS))
    assert state(tmp_path) == before
    handlers["map_zvol"](map_request(NAS))
    assert service.row(ZVOL).nas_node == NAS


def test_an_owner_cannot_log_out_of_another_zvols_target(container):
    tmp_path, service, handlers = container
    handlers["map_zvol"](map_request(NAS))
    before = state(tmp_path)
    for action in ("unmap_zvol", "clean_zvol"):
        with pytest.raises(ForbiddenError, match="not the zvol's target"):
            handlers[action](request(action, NAS, zvol=ZVOL,
                                     target=naming.target_iqn(NAS, "vol2")))
    # with no row: another NAS may not name this NAS's export either
    with pytest.raises(ForbiddenError):
        handlers["unmap_zvol"](request("unmap_zvol", OTHER_NAS, zvol="vol9", target=TARGET))
    assert state(tmp_path) == before


def test_a_nas_retrying_an_unmap_of_a_zvol_that_is_gone_hears_nothing_is_here(container):
    _tmp_path, service, handlers = container
    reply = handlers["unmap_zvol"](request("unmap_zvol", NAS, zvol="vol9",
                                           target=naming.target_iqn(NAS, "vol9")))
    assert reply["status"] == "success" and reply["local"] is False
    assert handlers["del_local"](request("del_local", NAS, zvol="vol9"))["status"] == "success"
    with pytest.raises(ForbiddenError):
        handlers["clean_zvol"](request("clean_zvol", NAS, zvol="vol9"))


def test_a_zvol_mapped_by_another_nas_while_a_request_waited_is_not_the_senders(container):
    tmp_path, service, handlers = container
    result = {}
    asking = threading.Event()
    take = service.zvol_lock

    def zvol_lock(*args, **kw):
        asking.set()
        return take(*args, **kw)

    with Held(service):
        service.zvol_lock = zvol_lock
        def ask():
            try:
                handlers["unmap_zvol"](request("unmap_zvol", OTHER_NAS, zvol=ZVOL))
            except ForbiddenError as exc:
                result["refused"] = str(exc)
        asker = threading.Thread(target=ask)
        asker.start()
        # no row yet: the request is admitted and waits for the zvol
        assert asking.wait(10) and service.row(ZVOL) is None
        service.map_zvol(ZVOL, TARGET, NAS, True, POOL, CHAP, 10, volsize=SIZE, nas_node=NAS)
        before = state(tmp_path)
    asker.join(15)
    assert "mapped here by nas-0-0" in result["refused"]
    assert state(tmp_path) == before


# -- a NAS ---------------------------------------------------------------------------
@pytest.fixture
def nas(tmp_path):
    service, containers = nas_service(tmp_path)
    service.config.admin_users = [ADMIN]
    service.store.add(ZVOL, POOL, SIZE)
    put_row(service.store, ZVOL, state="merging", remotehost=NAS_HOST, sync=True,
            iscsi_target=TARGET)
    return tmp_path, service, containers, nas_handlers.build(service)


def nas_state(tmp_path: Path) -> list:
    con = sqlite3.connect(tmp_path / "nas.db")
    try:
        return [sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr)
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                        "ORDER BY name")]
    finally:
        con.close()


def test_a_report_from_another_container_is_dropped(nas, caplog):
    tmp_path, service, _containers, handlers = nas
    before = nas_state(tmp_path)
    for sender in (HOST, None, NAS):
        with caplog.at_level(logging.WARNING):
            assert handlers["zvol_synced"](request("zvol_synced", sender, zvol=ZVOL,
                                                   status="success")) is None
        assert nas_state(tmp_path) == before
    assert any("zvol_synced of vol1" in r.getMessage() and HOST in r.getMessage()
               for r in caplog.records)
    # from the zvol's own container the same report is taken
    handlers["zvol_synced"](request("zvol_synced", NAS_HOST, zvol=ZVOL, status="success"))
    assert service.store.get(ZVOL).state == "local"


@pytest.mark.parametrize("action,body", [
    ("unmap_zvol", {"zvol": ZVOL}), ("del_zvol", {"zvol": ZVOL, "zpool": POOL}),
    ("clean_zvol", {"zvol": ZVOL, "force": True}), ("list_zvols", {}),
    ("get_zvol_attrs", {"zvol": ZVOL}), ("get_attrs", {}),
    ("set_attrs", {"attrs": {"frequency": 5}}), ("del_attrs", {"attrs": ["frequency"]}),
    ("set_zvol_attrs", {"zvol": ZVOL, "attrs": {"frequency": 5}}),
    ("map_zvol", {"zvol": "vol2", "zpool": POOL, "remotehost": NAS_HOST, "size": 1}),
])
def test_a_nas_refuses_management_from_a_container(nas, action, body):
    tmp_path, _service, containers, handlers = nas
    before = nas_state(tmp_path)
    with pytest.raises(ForbiddenError, match=f"may not ask {NAS} for {action}"):
        handlers[action](request(action, NAS_HOST, **body))
    assert nas_state(tmp_path) == before and containers.requests == []
    assert handlers["ping"](request("ping", NAS_HOST))["status"] == "success"


@pytest.mark.parametrize("role", ["nas", "vm"])
def test_a_node_says_at_start_whom_it_listens_to(role, caplog):
    with caplog.at_level(logging.INFO, logger="imgstorage.trust"):
        trust.announce(OPEN, role)
        trust.announce(STRICT, role)
    open_line, strict_line = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert open_line[0] == logging.WARNING and "any broker user" in open_line[1]
    assert strict_line[0] == logging.INFO and "strict mode" in strict_line[1]
    assert ADMIN in strict_line[1]
    assert (NAS in strict_line[1]) is (role == "vm")
