"""What kind of failure a container's answer says it was (its code), on the simulated kernel.

The daemon turns a handler's ImgStorageError into an error reply with the
exception's code (imgstorage/daemon.py); these tests drive the container's
handlers directly and check the error each one raises for the NAS to test.
"""
from __future__ import annotations

import sqlite3
import time

import pytest

from imgstorage import naming, protocol
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.base import ChapCredentials
from imgstorage.drivers.sim import zfs as sim_zfs
from imgstorage.errors import ImgStorageError, NotResumableError, StateError
from imgstorage.messaging import Envelope
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService

NAS, HOST, POOL, ZVOL = "nas-0-0", "compute-0-3", "tank", "vol1"
SIZE = 64 * 1024 * 1024
CHAP = ChapCredentials("imgstorage-0123abcd", "s3cret-s3cret-12")
TARGET = naming.target_iqn(NAS, ZVOL)


@pytest.fixture
def container(tmp_path):
    """A container with ZVOL mapped in sync mode (its copy not yet arrived)."""
    root = tmp_path / "sim"
    sim_zfs.create_pool(root, NAS, POOL, 1 << 40)
    sim_zfs.create_pool(root, HOST, POOL, 1 << 40)
    nas = node_drivers(from_dict({"name": NAS, "backend": "sim", "sim_root": str(root),
                                  "db": str(tmp_path / "nas.db")}))
    nas.zfs.create_zvol(POOL, ZVOL, SIZE)
    cfg = from_dict({"name": HOST, "backend": "sim", "sim_root": str(root),
                     "db": str(tmp_path / "vm.db")})
    engine = make_engine(cfg.db)
    create_schema(engine, VmBase)
    service = VmService(cfg, engine, node_drivers(cfg))
    nas.target.create_target(TARGET, nas.zfs.device_path(POOL, ZVOL), service.initiator_name(),
                             CHAP)
    service.map_zvol(ZVOL, TARGET, NAS, True, POOL, CHAP, 10, volsize=SIZE)
    return service, vm_handlers.build(service), tmp_path / "vm.db"


def request(action: str, **fields) -> Envelope:
    return Envelope(action=action, body=dict(fields, action=action), message_id="m1",
                    reply_to="q", user_id="guest", deadline=time.time() + 30)


def answer(handler, env: Envelope) -> dict:
    """The reply the daemon sends for what the handler raised."""
    with pytest.raises(ImgStorageError) as err:
        handler(env)
    return protocol.error(env.action, str(err.value), err.value.code)


def test_a_pull_before_the_copy_arrived_is_a_state_error(container):
    _service, handlers, _db = container
    reply = answer(handlers["send_zvol"], request("send_zvol", zvol=ZVOL, snap="s1"))
    assert protocol.error_code(reply) == StateError.code


def test_a_resume_token_zfs_refuses_is_answered_not_resumable(container):
    service, handlers, db = container
    con = sqlite3.connect(db)
    with con:                           # the copy arrived and took over: the VM runs from it
        con.execute("UPDATE vm_zvols SET state = 'local' WHERE zvol = ?", (ZVOL,))
    con.close()
    token = "1-0badc0de-" + "A" * 40
    reply = answer(handlers["send_zvol"], request("send_zvol", zvol=ZVOL, resume_token=token))
    assert protocol.error_code(reply) == NotResumableError.code
    assert reply["error"].startswith("cannot resume send")
    assert service.row(ZVOL).state == "local"
