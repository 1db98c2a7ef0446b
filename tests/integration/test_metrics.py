"""Each daemon's metrics endpoint, scraped over HTTP while a sync-mode VM runs its course.

A NAS and two containers, each with ``metrics_port``; one zvol is mapped in
sync mode, copied, merged, pulled twice (the second pull throttled, to be
seen while it runs) and unmapped.  After each step the endpoints must show
it: the phase histograms gain one observation per phase, the recovery point
advances with each pull, and the request counters match the requests sent.
"""
from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, FrozenSet, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..promtool import find_promtool
from .conftest import ok, registered_cluster
from .sync_helpers import (FAST, MIB, NAS, diagnose, nas_row, set_zvolattr, storagemap,
                           sync_map, unmap, wait_until, write)

Scrape = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]
NODES = (NAS, FAST, "compute-0-3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ports() -> Dict[str, int]:
    return {node: free_port() for node in NODES}


@pytest.fixture(scope="module")
def metered(tmp_path_factory, vhost, ports):
    settings = {node: {"metrics_port": port} for node, port in ports.items()}
    yield from registered_cluster(tmp_path_factory, vhost, "metered", node_settings=settings)


def text_of(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def scrape(port: int) -> Scrape:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text_of(port))
            for s in family.samples}


def get(scraped: Scrape, name: str, **labels) -> float:
    """A sample's value; 0 for one the scrape does not carry."""
    return scraped.get((name, frozenset(labels.items())), 0.0)


def present(scraped: Scrape, name: str, **labels) -> bool:
    return (name, frozenset(labels.items())) in scraped


def by_label(scraped: Scrape, name: str, label: str) -> Dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in scraped.items()
            if n == name and label in dict(key)}


def phases(scraped: Scrape) -> Dict[str, float]:
    return by_label(scraped, "imgstorage_phase_duration_seconds_count", "phase")


def requests(scraped: Scrape) -> Dict[Tuple[str, str], float]:
    return {(dict(key)["action"], dict(key)["outcome"]): v for (n, key), v in scraped.items()
            if n == "imgstorage_requests_total"}


def grown(before: Dict, after: Dict) -> Dict:
    """What grew between two scrapes, and by how much."""
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def wait_scrape(port: int, what: str, probe, cluster, zvol: str) -> Scrape:
    """Scrape until ``probe`` accepts what the endpoint serves."""
    last: Dict[str, Scrape] = {}

    def attempt():
        last["scrape"] = scrape(port)
        return last["scrape"] if probe(last["scrape"]) else None
    return wait_until(what, attempt, show=lambda: diagnose(cluster, zvol))


def test_the_endpoints_follow_a_sync_vm_through_its_life(metered, ports):
    c, zvol, host = metered, "metered", FAST
    nas_port, vm_port = ports[NAS], ports[host]
    nas0, vm0 = scrape(nas_port), scrape(vm_port)
    assert get(nas0, "imgstorage_node_info", node=NAS, role="nas") == 1
    assert get(vm0, "imgstorage_node_info", node=host, role="vm") == 1
    assert get(nas0, "imgstorage_broker_connected") == 1
    assert not present(nas0, "imgstorage_zvol_state", zvol=zvol, state="unmapped", host="")
    sent = {"map_zvol": 0, "set_zvol_attrs": 0, "list_zvols": 0, "unmap_zvol": 0}

    # -- map: copy, merge, and the VM runs from the container's copy
    mapped_at = time.time()
    dev = sync_map(c, zvol, host)
    sent["map_zvol"] += 1
    # (a phase is observed once its transition is committed, a moment after a scrape
    # may already see the state it led to: waited for together)
    local = wait_scrape(nas_port, f"{zvol} local on the NAS", lambda s: get(
        s, "imgstorage_zvol_state", zvol=zvol, state="local", host=host) == 1 and
        phases(s).get("map_to_local", 0) > phases(nas0).get("map_to_local", 0), c, zvol)
    assert grown(phases(nas0), phases(local)) == {"map": 1, "copy": 1, "map_to_local": 1}
    vm_local = wait_scrape(vm_port, "the merge timed on the container", lambda s: phases(
        s).get("merge", 0) == phases(vm0).get("merge", 0) + 1, c, zvol)
    assert grown(phases(vm0), phases(vm_local)) == {"merge": 1}
    assert get(vm_local, "imgstorage_device_state", zvol=zvol, state="local",
               status="linear") == 1
    assert get(vm_local, "imgstorage_devices", status="linear") >= 1
    point0 = get(local, "imgstorage_zvol_recovery_point_timestamp_seconds", zvol=zvol)
    assert mapped_at - 1 <= point0 <= time.time()        # the map's answer: nothing written
    assert point0 == nas_row(c, zvol)["recovery_point"]   # what the NAS itself records
    assert get(local, "imgstorage_zvol_sync_frequency_seconds", zvol=zvol) == 300
    assert get(local, "imgstorage_zvol_recovery_point_age_seconds", zvol=zvol) >= 0
    assert get(local, "imgstorage_zvol_size_bytes", zvol=zvol) == 1 << 30

    # -- two periodic pulls, asked for now; each brings the recovery point forward
    points = [point0]
    pulled_at = [get(local, "imgstorage_zvol_last_pull_timestamp_seconds", zvol=zvol)]
    before = local
    rng = random.Random(13)
    for n in (1, 2):
        # a snapshot's name and a pull's record hold whole seconds: the next pull must
        # start in a later one
        wait_until("the last pull's second to pass",
                   lambda: time.time() >= math.floor(max(points[-1], pulled_at[-1])) + 1)
        if n == 2:
            # about 4 s at 500 kB/s: time to watch the transfer's figures move
            write(c, host, dev, 0, rng.randbytes(2 * MIB))
            set_zvolattr(c, zvol, "downloadspeed", 500000)
            sent["set_zvol_attrs"] += 1
        set_zvolattr(c, zvol, "nextsync", int(time.time()))
        sent["set_zvol_attrs"] += 1
        if n == 2:
            running = wait_scrape(nas_port, "the pull's bytes on the NAS", lambda s: get(
                s, "imgstorage_zvol_transfer_bytes", zvol=zvol, kind="pull") > 0, c, zvol)
            assert get(running, "imgstorage_zvol_state", zvol=zvol, state="pulling",
                       host=host) == 1
            assert get(running, "imgstorage_zvol_transfer_estimated_bytes", zvol=zvol,
                       kind="pull") >= 2 * MIB
            first = get(running, "imgstorage_zvol_transfer_bytes", zvol=zvol, kind="pull")
            wait_scrape(nas_port, "the pull's bytes to grow", lambda s: get(
                s, "imgstorage_zvol_transfer_bytes", zvol=zvol, kind="pull") > first or
                not present(s, "imgstorage_zvol_transfer_bytes", zvol=zvol, kind="pull"),
                c, zvol)
        # the last pull's time is recorded just after the transition back to local
        after = wait_scrape(nas_port, f"pull {n} of {zvol}", lambda s: phases(s)["pull"] ==
                            phases(before)["pull"] + 1 and get(
                                s, "imgstorage_zvol_state", zvol=zvol, state="local",
                                host=host) == 1 and get(
                                s, "imgstorage_zvol_last_pull_timestamp_seconds",
                                zvol=zvol) > pulled_at[-1], c, zvol)
        assert grown(phases(before), phases(after)) == {"pull": 1}
        point = get(after, "imgstorage_zvol_recovery_point_timestamp_seconds", zvol=zvol)
        assert point > points[-1], (n, points, point)
        assert point == nas_row(c, zvol)["recovery_point"]
        pulled = get(after, "imgstorage_zvol_last_pull_timestamp_seconds", zvol=zvol)
        assert pulled > pulled_at[-1], (n, pulled_at, pulled)
        assert not present(after, "imgstorage_zvol_transfer_bytes", zvol=zvol, kind="pull")
        points.append(point)
        pulled_at.append(pulled)
        before = after

    # -- one listing, counted like any request
    assert storagemap(c)[zvol]["state"] == "mapped"
    sent["list_zvols"] += 1

    # -- unmap: the answer, then the final pull brings the disk home
    unmap(c, zvol)
    sent["unmap_zvol"] += 1
    home = wait_scrape(nas_port, f"{zvol} home", lambda s: get(
        s, "imgstorage_zvol_state", zvol=zvol, state="unmapped", host="") == 1, c, zvol)
    assert grown(phases(before), phases(home)) == {"unmap": 1, "final_pull": 1}
    assert not present(home, "imgstorage_zvol_recovery_point_timestamp_seconds", zvol=zvol)
    assert not present(home, "imgstorage_zvol_recovery_point_age_seconds", zvol=zvol)
    assert get(home, "imgstorage_zvol_consecutive_failures", zvol=zvol) == 0
    assert grown(phases(nas0), phases(home)) == {"map": 1, "copy": 1, "map_to_local": 1,
                                                 "pull": 2, "unmap": 1, "final_pull": 1}
    assert all(get(home, "imgstorage_transfer_failures_total", kind=k) == 0
               for k in ("upload", "pull", "final_pull", "release"))

    # -- every request the NAS got: the operator's, and the container's merge report
    nas_requests = grown(requests(nas0), requests(home))
    expected = {(action, "success"): n for action, n in sent.items()}
    expected[("zvol_synced", "success")] = 1
    assert nas_requests == expected
    # the container's: the NAS's requests for this zvol (and its merge checks)
    # (a request is counted once its handler returned, a moment after its effect shows)
    vm_home = wait_scrape(vm_port, "the container's copy destroyed", lambda s: not present(
        s, "imgstorage_device_state", zvol=zvol, state="local", status="linear") and grown(
        requests(vm0), requests(s)).get(("del_local", "success"), 0) == 1, c, zvol)
    vm_requests = grown(requests(vm0), requests(vm_home))
    assert all(outcome == "success" for _action, outcome in vm_requests), vm_requests
    counted = {action: n for (action, _outcome), n in vm_requests.items()}
    assert counted.pop("recv_zvol") >= 1 and counted.pop("list_dev", 0) >= 0
    assert counted == {"initiator_name": 1, "map_zvol": 1, "sync_zvol": 1, "send_zvol": 3,
                       "unmap_zvol": 1, "del_local": 1}
    # the other container was never asked anything about it
    other = scrape(ports["compute-0-3"])
    assert sum(requests(other).values()) == sum(
        v for (action, _o), v in requests(other).items() if action == "ping")


def test_promtool_finds_nothing_to_say_about_what_each_daemon_serves(metered, ports):
    promtool = find_promtool()
    assert promtool, ("promtool not found: `scripts/bootstrap --test` (which scripts/test runs) "
                      "takes it out of Debian's prometheus package into the virtualenv")
    for node, port in ports.items():
        proc = subprocess.run([promtool, "check", "metrics"], input=text_of(port).encode(),
                              capture_output=True, timeout=120)
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            node, proc.stdout.decode() + proc.stderr.decode())


def test_a_second_daemon_on_a_taken_port_says_so_in_one_line(metered, ports):
    """The NAS's port is taken (by the running NAS): a daemon configured with it does not
    start, and says why in one line."""
    settings = dict(metered.node_settings.get(FAST, {}), metrics_port=ports[NAS])
    conf = metered.workdir / "etc" / "taken.conf"
    cfg = json.loads(metered.config_path(FAST).read_text())
    cfg.update(settings, name="vm-container-0-99", db=str(metered.workdir / "db" / "taken.db"),
               log_file=str(metered.workdir / "log" / "taken.log"))
    conf.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-c",
                           "from imgstorage.vm.main import main; main()", "--config", str(conf)],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert f"cannot serve metrics on 127.0.0.1 port {ports[NAS]}" in err, err
    assert not (metered.workdir / "db" / "taken.db").exists()
    ok(metered.rocks("list", "host", "storagemap", NAS))       # the NAS serves on
