"""The NAS's listing: every zvol with its attributes and lock, from one query."""
from __future__ import annotations

from typing import List

import pytest
from sqlalchemy import event

from .nas_stub import nas_service, put_row


@pytest.fixture
def nas(tmp_path):
    service, _containers = nas_service(tmp_path)
    store = service.store
    for name in ("vol-a", "vol-b", "vol-c", "vol-d"):
        store.add(name, "tank", 3 << 30)
    put_row(store, "vol-b", state="local", remotehost="compute-0-3", remotepool="tank",
            sync=True, failures=2, last_error="pull: timed out", retry_at=1234.5,
            recovery_point=1700000000.0)
    store.set_zvol_attrs("vol-b", {"nextsync": 5000, "frequency": 600})
    store.lock("vol-c", "unmap_zvol", "m1", "admin")
    return service


def statements(service, fn) -> List[str]:
    """Every statement SQLite itself ran during ``fn`` (the listing uses the driver's
    cursor, which SQLAlchemy's events do not see)."""
    seen: List[str] = []
    engine = service.store.engine
    engine.dispose()                          # new connections, each traced

    def trace(dbapi_conn, _record) -> None:
        dbapi_conn.set_trace_callback(seen.append)
    event.listen(engine, "connect", trace)
    try:
        fn()
    finally:
        event.remove(engine, "connect", trace)
        engine.dispose()
    return seen


def test_each_row_holds_what_it_has_and_nothing_else(nas):
    rows = {r["zvol"]: r for r in nas.list_zvols()}
    assert list(rows) == ["vol-a", "vol-b", "vol-c", "vol-d"]
    assert rows["vol-a"] == {"zvol": "vol-a", "zpool": "tank", "state": "unmapped",
                             "lifecycle": "unmapped", "size": 3}
    b = rows["vol-b"]
    assert (b["state"], b["lifecycle"], b["sync"], b["remotehost"]) == \
        ("mapped", "local", True, "compute-0-3")
    assert (b["nextsync"], b["frequency"]) == (5000, 600)
    assert (b["error"], b["failures"], b["retry_at"]) == ("pull: timed out", 2, 1234.5)
    assert "lock" not in b and "time" not in b
    assert b["recovery_point"] == 1700000000.0
    assert rows["vol-c"]["lock"]["action"] == "unmap_zvol"
    assert all("recovery_point" not in rows[z] for z in ("vol-a", "vol-c", "vol-d"))


def test_a_recovery_point_shows_only_while_the_container_holds_writes_the_nas_lacks(nas):
    """After the final pull arrived (``releasing``) or on a direct mapping, a stale
    recovery point would claim a risk that is not there."""
    for state, shown in (("uploading", True), ("merging", True), ("pulling", True),
                         ("final_pull", True), ("releasing", False), ("mapped", False)):
        put_row(nas.store, "vol-d", state=state, sync=state != "mapped",
                recovery_point=1700000000.0)
        row = {r["zvol"]: r for r in nas.list_zvols()}["vol-d"]
        assert ("recovery_point" in row) is shown, state


def test_a_listing_is_one_query_whatever_the_number_of_zvols(nas):
    for n in range(30):
        nas.store.add(f"more-{n:02d}", "tank", 1 << 30)
    assert len([s for s in statements(nas, nas.list_zvols) if s.lstrip().upper()
                .startswith("SELECT")]) == 1


def test_pages_start_after_a_name_and_stop_at_a_limit(nas):
    assert [r["zvol"] for r in nas.list_zvols(after="vol-a", limit=2)] == ["vol-b", "vol-c"]
    assert [r["zvol"] for r in nas.list_zvols(after="vol-c")] == ["vol-d"]
    assert nas.list_zvols(after="vol-d") == []
