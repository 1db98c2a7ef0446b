"""A node coming up: a NAS whose pool is imported after its daemon started, and a
simulated cluster whose configurations leave the stream addresses to their defaults.

The configurations here carry no ``stream_address``/``stream_bind``, as an
operator's written from README.rst's example would not: on the simulated kernel
the streams must still find each other (loopback).
"""
from __future__ import annotations

import signal
import threading

import pytest

from imgstorage.simcluster import SimCluster, broker_url

from .conftest import ok, register
from .sync_helpers import (NAS, POOL, _query, nas_row, set_zvolattr, sync_map, wait_local,
                           wait_until)

HOST = "vm-container-0-14"
WAITING = "pool tank is not imported; zvols that need it: no zvol yet (default_pool)"


@pytest.fixture(scope="module")
def late_pool(tmp_path_factory, vhost):
    """The container up with its pool; the NAS's pool not created yet, its daemon not started."""
    no_stream_keys = {"stream_address": None, "stream_bind": None}
    c = SimCluster(tmp_path_factory.mktemp("boot"), broker_url(vhost), containers=(HOST,),
                   node_settings={NAS: no_stream_keys, HOST: no_stream_keys})
    try:
        assert ok(c.sim("zpool", "create", "--host", HOST, POOL)) == ""
        c.start([HOST])
        register(c)
        yield c
    finally:
        c.stop_all()


def log_of(c, node: str) -> str:
    path = c.log_path(node)
    return path.read_text(errors="replace") if path.exists() else ""


def start_in_background(c, node: str) -> dict:
    """``c.start`` returns once the node answers; here it runs beside the test."""
    outcome: dict = {}

    def run() -> None:
        try:
            c.start([node], wait=120)
            outcome["ready"] = True
        except Exception as exc:  # reported by the test that joins
            outcome["error"] = exc
    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def test_a_nas_started_before_its_pool_waits_then_serves(late_pool):
    c = late_pool
    # stopped while it waits: it goes at once, having touched nothing
    first = start_in_background(c, NAS)
    wait_until("the NAS saying it waits for its pool", lambda: WAITING in log_of(c, NAS),
               show=lambda: c.tail(NAS))
    waiting = c.procs[NAS]
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(10) == 0
    first["thread"].join(30)
    assert "exited with status 0" in str(first.get("error")), first
    assert "received signal 15 while waiting for pool(s) tank; stopping" in log_of(c, NAS)
    assert "starting (backend" not in log_of(c, NAS)

    # started again, it waits until the administrator creates the pool, then serves
    second = start_in_background(c, NAS)
    wait_until("the NAS waiting again", lambda: log_of(c, NAS).count(WAITING) == 2,
               show=lambda: c.tail(NAS))
    assert second["thread"].is_alive()
    assert ok(c.sim("zpool", "create", "--host", NAS, POOL)) == ""
    second["thread"].join(120)
    assert second.get("ready") is True, second.get("error")
    assert "pool tank is there after" in log_of(c, NAS)

    out = ok(c.rocks("add", "host", "storagemap", NAS, POOL, "boot-vol", HOST, "1"))
    assert out.splitlines()[0] == f"mapping  {NAS} : {POOL} / boot-vol  on  {HOST}"
    assert out.splitlines()[1].startswith("/dev/sd")


def test_streams_on_loopback_and_a_lowered_frequency_at_once(late_pool):
    c = late_pool
    if NAS not in c.procs:                      # when run alone
        ok(c.sim("zpool", "create", "--host", NAS, POOL))
        c.start([NAS])
    zvol = "boot-sync-vol"
    sync_map(c, zvol, HOST)
    wait_local(c, HOST, zvol)                   # the copy travelled over 127.0.0.1

    def attrs():
        return _query(c.db_path(NAS), "SELECT * FROM nas_zvol_attrs WHERE zvol = ?", (zvol,))
    handed_over = attrs()
    assert handed_over["last_pull_at"] and handed_over["nextsync"] == (
        handed_over["last_pull_at"] + 300)
    before = nas_row(c, zvol)["last_snapshot"]
    # 300 s was the frequency when the copy took over; 2 s counts from then, now
    set_zvolattr(c, zvol, "frequency", 2)
    wait_until("a periodic pull with the lowered frequency",
               lambda: nas_row(c, zvol)["last_snapshot"] != before
               and attrs()["last_pull_at"] > handed_over["last_pull_at"],
               timeout=30, show=lambda: (nas_row(c, zvol), attrs(), c.tail(NAS)))
