"""Two threads changing one zvol's state: the second sees what the first wrote.

Seen on a real kernel: a container's merge report (merging -> local) and an
operator's unmap (merging -> unmapping) of the same zvol at the same moment;
the report read the row before the unmap wrote it and put it back to local,
and the unmap then failed with "cannot detached_local a zvol that is local".
"""
from __future__ import annotations

import threading

import pytest

from sqlalchemy import update

from imgstorage.db import create_schema, make_engine
from imgstorage.errors import StateError
from imgstorage.nas.models import Base, Zvol
from imgstorage.nas.states import Event
from imgstorage.nas.store import NasStore
from imgstorage.vm.models import Base as VmBase, VmZvol
from imgstorage.vm.states import Event as VmEvent
from imgstorage.vm.store import VmStore

from .nas_stub import put_row


def hold_row(db, model, zvol: str) -> None:
    """Take the database's write lock, as a transition in flight holds it (a no-op update)."""
    db.execute(update(model).where(model.zvol == zvol).values(state=model.state),
                    execution_options={"synchronize_session": False})


@pytest.fixture
def store(tmp_path):
    engine = make_engine(str(tmp_path / "nas.db"))
    create_schema(engine, Base)
    store = NasStore(engine)
    store.add("vol1", "tank", 1 << 30)
    put_row(store, "vol1", state="merging", remotehost="compute-0-3", sync=True,
            iscsi_target="iqn.2001-04.com.nas-0-0-vol1")
    return store


def test_a_transition_waits_for_one_in_flight_and_sees_its_outcome(store):
    outcome = []
    with store.session() as s, s.begin():
        hold_row(s, Zvol, "vol1")                # the unmap holds the row ...
        row = s.get(Zvol, "vol1")
        row.state, row.prior_state = "unmapping", "merging"

        def report():
            try:
                store.transition("vol1", Event.SYNCED, iscsi_target=None)
                outcome.append("synced")
            except StateError as exc:
                outcome.append(str(exc))

        racer = threading.Thread(target=report)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive() and outcome == []  # ... and the report waits for it
    racer.join(30)
    assert outcome == ["cannot synced a zvol that is unmapping"]
    row = store.get("vol1")
    assert (row.state, row.iscsi_target) == ("unmapping", "iqn.2001-04.com.nas-0-0-vol1")
    assert store.transition("vol1", Event.DETACHED_LOCAL).state == "final_pull"


def test_the_containers_store_claims_its_row_the_same_way(tmp_path):
    engine = make_engine(str(tmp_path / "vm.db"))
    create_schema(engine, VmBase)
    store = VmStore(engine)
    store.add("vol1", nas="nas-0-0", iscsi_target="iqn.x:vol1")
    store.transition("vol1", VmEvent.ATTACHED)
    outcome = []
    with store.session() as s, s.begin():
        hold_row(s, VmZvol, "vol1")
        s.get(VmZvol, "vol1").state = "detaching"
        racer = threading.Thread(target=lambda: outcome.append(
            _try(lambda: store.transition("vol1", VmEvent.DETACH))))
        racer.start()
        racer.join(0.5)
        assert racer.is_alive()
    racer.join(30)
    assert outcome == ["cannot detach a zvol that is detaching"]


def _try(action) -> str:
    try:
        action()
        return "done"
    except StateError as exc:
        return str(exc)
