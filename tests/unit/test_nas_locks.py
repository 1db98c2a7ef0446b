"""A NAS's zvol lock table holds only the requests running now.

Any administrator (or, without admin_users, anyone) can name any zvol; a
lock row is taken for the request and goes with it, so names of zvols that
do not exist leave nothing behind.
"""
from __future__ import annotations

import time

import pytest

from imgstorage.errors import ImgStorageError, NotFoundError
from imgstorage.messaging import Envelope
from imgstorage.nas import handlers as nas_handlers

from .nas_stub import POOL, nas_service


@pytest.fixture
def nas(tmp_path):
    service, _ = nas_service(tmp_path)
    return service, nas_handlers.build(service)


def request(action: str, **body) -> Envelope:
    return Envelope(action=action, body={"action": action, **body}, message_id=f"m-{action}",
                    reply_to="q", user_id="admin", deadline=time.time() + 10)


def test_requests_for_zvols_that_do_not_exist_leave_no_lock(nas):
    service, handlers = nas
    for n in range(50):
        zvol = f"nothing-{n}"
        for action, body in (("unmap_zvol", {}), ("del_zvol", {"zpool": POOL}),
                             ("set_zvol_attrs", {"attrs": {"frequency": 60}})):
            with pytest.raises(NotFoundError):
                handlers[action](request(action, zvol=zvol, **body))
    assert service.store.locks() == []


def test_a_thousand_names_leave_the_lock_table_empty(nas):
    service, _ = nas
    for n in range(1_000):      # each is a real SQLite commit: a thousand make the point
        try:
            with service.store.locked(f"name-{n}", "unmap_zvol", None, "admin"):
                if n % 2:
                    raise ImgStorageError("refused")
        except ImgStorageError:
            pass
    assert service.store.locks() == []
    assert service.store.get("name-1") is None
