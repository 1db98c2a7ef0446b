"""A broker node dies while maps, unmaps and a sync copy are in flight: nothing is lost.

A three-node RabbitMQ cluster (scripts/broker-cluster) carries a simulated
imgstorage cluster whose node queues are quorum queues.  The first broker, the
one every node connects to and the one that leads the queues, is stopped while
requests are on their way: every request is answered or fails with one clear
line, none runs twice, the daemons move to a surviving broker by themselves,
the copy completes byte for byte, and a request the broker confirmed before
it died is still delivered after.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import subprocess
import uuid
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from imgstorage.config import from_dict
from imgstorage.errors import ImgStorageError
from imgstorage.messaging import RpcClient, connect, declare_node_queues
from imgstorage.simcluster import SimCluster

from .conftest import register
from .sync_helpers import (FAST, MIB, NAS, POOL, SLOW, SLOW_MERGE_RATE, do_writes, nas_state,
                           phase_writes, prepare_zvol, read, set_zvolattr, storagemap, sync_map,
                           unmap, unmap_and_check, wait_local, wait_until)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "broker-cluster"
BASE = 2 * MIB


def broker_cluster(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def brokers():
    """The three brokers' URLs (a vhost of this module's own), removed at the end."""
    try:
        urls = broker_cluster("up").strip().splitlines()[-1].split(",")
        vhost = f"imgstorage-cluster-{uuid.uuid4().hex[:8]}"
        broker_cluster("ctl", "add_vhost", vhost)
        broker_cluster("ctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield [url.rsplit("/", 1)[0] + "/" + quote(vhost, safe="") for url in urls]
    finally:
        broker_cluster("down")


@pytest.fixture(scope="module")
def quorum_cluster(tmp_path_factory, brokers):
    c = SimCluster(tmp_path_factory.mktemp("brokercluster"), ",".join(brokers),
                   node_env={SLOW: {"IMGSTORAGE_SIM_MERGE_RATE": str(SLOW_MERGE_RATE)}})
    kinds = declare_node_queues(frontend_config(c), c.nas + c.containers, quorum=True)
    assert set(kinds.values()) == {"quorum"}, kinds
    assert c.make_pools() == c.nas + c.containers
    try:
        c.start()
        register(c)
        yield c
    finally:
        c.stop_all()


def frontend_config(c):
    return from_dict(json.loads(c.config_path("frontend").read_text()))


def log_of(c, node: str) -> str:
    return c.log_path(node).read_text(errors="replace")


def test_a_broker_node_dies_while_requests_are_in_flight(quorum_cluster):
    c = quorum_cluster
    cfg = frontend_config(c)
    zvol = "clustersync"
    image, tail = prepare_zvol(c, zvol, SLOW, BASE, seed=7)
    # a copy of about 20 s, so that it runs while the broker node goes away
    set_zvolattr(c, zvol, "uploadspeed", 110000)
    dev = sync_map(c, zvol, SLOW)

    # a request nobody consumes yet, confirmed by the broker that is about to die
    declare_node_queues(cfg, ["ghost-0-1"], quorum=True)
    with RpcClient(cfg) as rpc:
        rpc.notify("ghost-0-1", {"action": "ping", "marker": "before"}, timeout=300)
        assert rpc.broker == "127.0.0.1:5701"

    # requests keep flowing, through this process and through the CLI, while node 1 stops
    stopping = subprocess.Popen([str(SCRIPT), "stop-node", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    churn = Churn(cfg)
    churn.start()
    cli_runs = []
    try:
        while stopping.poll() is None or len(cli_runs) < 2:
            name = f"cli{len(cli_runs)}"
            mapped = c.rocks("add", "host", "storagemap", NAS, POOL, name, FAST, "1", "timeout=60")
            unmapped = c.rocks("remove", "host", "storagemap", NAS, name)
            cli_runs.append((name, mapped, unmapped))
        assert stopping.wait(120) == 0, stopping.stderr.read()
        # a little longer, so that requests also start and end on the survivors
        wait_until("requests after the stop", lambda: churn.count() >= churn.at_stop() + 4,
                   timeout=60)
    finally:
        churn.stop()

    # every request is answered, or fails with one clear line, within its timeout
    for name, *procs in cli_runs:
        for proc in procs:
            err = proc.stderr.decode()
            assert "Traceback" not in err, err
            if proc.returncode != 0:
                assert len(err.strip().splitlines()) == 1, err
    assert all("\n" not in text for _name, _what, text in churn.failures), churn.failures
    # the broker died under a request, which was sent again and answered
    assert churn.resent(), "no request was in flight when the broker node stopped"
    assert len(churn.answered) >= 4, churn.failures

    # the daemons found a surviving broker by themselves
    for node in c.nas + c.containers:
        wait_until(f"{node} reconnected", lambda: re.search(
            r"reconnected to the message broker at 127\.0\.0\.1:570[23]", log_of(c, node)),
            timeout=60, show=lambda: c.tail(node))

    # none ran twice: each request's handler ran once, by the NAS's log
    nas_log = log_of(c, NAS)
    names = [name for name, *_ in cli_runs] + churn.names
    for name in names:
        for action in ("map_zvol", "unmap_zvol"):
            runs = re.findall(rf": {action} of {name} from \S+ answered", nas_log)
            assert len(runs) <= 1, (action, name, runs)
    # what was answered happened
    rows = wait_until("every zvol settled", lambda: (lambda m: m if all(
        m.get(n, {}).get("state", "unmapped") in ("mapped", "unmapped") for n in names) else None)(
        storagemap(c)), timeout=90, show=lambda: storagemap(c))
    for name, action in churn.answered:
        if action == "unmap_zvol":
            assert rows.get(name, {}).get("state", "unmapped") == "unmapped", rows.get(name)

    # the copy completes, with every byte written while the broker node was gone
    do_writes(c, SLOW, dev, image, phase_writes(__import__("random").Random(8), 4))
    wait_local(c, SLOW, zvol)
    assert read(c, SLOW, dev, 0, len(image.bytes())) == image.bytes()
    unmap_and_check(c, SLOW, zvol, image, tail)
    assert nas_state(c, zvol) == "unmapped"

    # the request confirmed before the broker died is delivered by a surviving one
    conn = connect(cfg)
    try:
        ch = conn.channel()
        method, _props, body = ch.basic_get("ghost-0-1", auto_ack=True)
        assert method is not None and json.loads(body)["marker"] == "before"
    finally:
        conn.close()

    for name in names:
        if rows.get(name, {}).get("state") == "mapped":
            unmap(c, name)


class Churn:
    """Maps and unmaps, one after the other, from a thread of this process.

    Its calls go through RpcClient, so a broker dying under one shows up
    here: the call must send the same request again through a survivor.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.names: list = []
        self.answered: list = []
        self.failures: list = []
        self._stop = threading.Event()
        self._stopped_at: Optional[int] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.records: list = []
        self._handler = _Collect(self.records)

    def start(self) -> None:
        logging.getLogger("imgstorage.messaging").addHandler(self._handler)
        logging.getLogger("imgstorage.messaging").setLevel(logging.INFO)
        self._thread.start()

    def _run(self) -> None:
        with RpcClient(self.cfg) as rpc:
            i = 0
            while not self._stop.is_set():
                name = f"churn{i}"
                i += 1
                self.names.append(name)
                for message in ({"action": "map_zvol", "zvol": name, "zpool": POOL,
                                 "remotehost": FAST, "size": 1},
                                {"action": "unmap_zvol", "zvol": name}):
                    try:
                        rpc.request(NAS, message, timeout=60)
                        self.answered.append((name, message["action"]))
                    except ImgStorageError as exc:
                        self.failures.append((name, message["action"], str(exc)))

    def count(self) -> int:
        return len(self.answered) + len(self.failures)

    def at_stop(self) -> int:
        if self._stopped_at is None:
            self._stopped_at = self.count()
        return self._stopped_at

    def resent(self) -> bool:
        return any("again through" in text for text in self.records)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        logging.getLogger("imgstorage.messaging").removeHandler(self._handler)


class _Collect(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())

