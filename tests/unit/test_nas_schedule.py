"""When the NAS pulls a zvol back: the scheduler with an injected clock, no broker, no kernel."""
import sqlite3
import time

import pytest

from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.nas.models import Base
from imgstorage.nas.service import NasService
from imgstorage.nas.store import NasStore

from .nas_stub import put_row

ZVOL = "vm-1-vol"


@pytest.fixture
def nas(tmp_path):
    cfg = from_dict({"name": "nas-0-0", "backend": "sim", "sim_root": str(tmp_path / "sim"),
                     "db": str(tmp_path / "nas.db")})
    engine = make_engine(cfg.db)
    create_schema(engine, Base)
    store = NasStore(engine)
    store.ensure_defaults()
    service = NasService(cfg, store, node_drivers(cfg))
    store.add(ZVOL, "tank", 1 << 30)
    put_row(store, ZVOL, state="local", remotehost="compute-0-3", sync=True)
    started = []
    # the scheduler's decision is what is tested: record the pulls instead of running them
    service.sync.jobs.start = lambda zvol, kind, work: started.append((zvol, kind))
    return service, started


def test_a_lowered_zvol_frequency_counts_from_the_last_pull(nas):
    service, started = nas
    store, sync = service.store, service.sync
    store.set_zvol_attrs(ZVOL, sync.pulled(ZVOL, now=1000))
    assert store.zvol_attrs(ZVOL).nextsync == 1300            # the default frequency, 300 s
    store.set_zvol_attrs(ZVOL, {"frequency": 60})
    sync.tick(now=1059)
    assert started == []
    assert store.zvol_attrs(ZVOL).nextsync == 1060            # shown as due at the new time
    sync.tick(now=1060)
    assert started == [(ZVOL, "pull")]


def test_a_lowered_nas_frequency_counts_from_the_last_pull(nas):
    service, started = nas
    store, sync = service.store, service.sync
    store.set_zvol_attrs(ZVOL, sync.pulled(ZVOL, now=1000))
    store.set_attrs({"frequency": "20"})
    sync.tick(now=1019)
    assert started == []
    sync.tick(now=1020)
    assert started == [(ZVOL, "pull")]


def test_a_raised_frequency_keeps_the_pull_already_due(nas):
    service, started = nas
    store, sync = service.store, service.sync
    store.set_zvol_attrs(ZVOL, sync.pulled(ZVOL, now=1000))
    store.set_zvol_attrs(ZVOL, {"frequency": 3600})
    sync.tick(now=1299)
    assert started == [] and store.zvol_attrs(ZVOL).nextsync == 1300
    sync.tick(now=1300)
    assert started == [(ZVOL, "pull")]


def test_without_a_recorded_pull_nextsync_alone_decides(nas):
    # a zvol handed over by an older release: no last_pull_at yet
    service, started = nas
    store, sync = service.store, service.sync
    store.set_zvol_attrs(ZVOL, {"nextsync": 1300, "frequency": 10})
    assert store.zvol_attrs(ZVOL).last_pull_at is None
    sync.tick(now=1299)
    assert started == []
    sync.tick(now=1300)
    assert started == [(ZVOL, "pull")]


def test_an_unscheduled_zvol_gets_a_nextsync_and_no_pull(nas):
    service, started = nas
    service.sync.tick(now=5000)
    assert started == [] and service.store.zvol_attrs(ZVOL).nextsync == 5300


def test_the_hand_over_to_local_is_the_first_recorded_pull(nas):
    service, _ = nas
    put_row(service.store, ZVOL, state="merging")
    before = int(time.time())
    service.zvol_synced(ZVOL, True, None)
    attrs = service.store.zvol_attrs(ZVOL)
    assert before <= attrs.last_pull_at <= int(time.time())
    assert attrs.nextsync == attrs.last_pull_at + 300
    assert service.store.get(ZVOL).state == "local"


def test_an_older_database_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE nas_zvol_attrs (zvol VARCHAR(200) PRIMARY KEY, "
                   "frequency INTEGER, nextsync INTEGER, uploadspeed INTEGER, "
                   "downloadspeed INTEGER)")
        db.execute("INSERT INTO nas_zvol_attrs (zvol, nextsync) VALUES ('old-vol', 1234)")
    create_schema(make_engine(str(path)), Base)
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT nextsync, last_pull_at, pull_frequency "
                         "FROM nas_zvol_attrs").fetchone()
    assert row == (1234, None, None)


def test_a_nextsync_set_by_hand_stands_until_the_frequency_changes(nas):
    service, started = nas
    store, sync = service.store, service.sync
    store.set_zvol_attrs(ZVOL, {"frequency": 2})
    store.set_zvol_attrs(ZVOL, sync.pulled(ZVOL, now=1000))
    store.set_zvol_attrs(ZVOL, {"nextsync": 5000})           # the operator holds pulls off
    sync.tick(now=1003)
    assert started == [] and store.zvol_attrs(ZVOL).nextsync == 5000
    store.set_zvol_attrs(ZVOL, {"frequency": 1})
    sync.tick(now=1003)
    assert started == [(ZVOL, "pull")]
    attrs = store.zvol_attrs(ZVOL)
    assert (attrs.nextsync, attrs.pull_frequency) == (1001, 1)
