"""A copy that keeps failing shows its last error and its next retry, in the table and JSON.

The container compute-0-3 advertises a stream address nothing listens on
(``stream_address`` set to another loopback address than the one it binds):
every NAS->VM copy to it is refused, as when a container's storage address is
misconfigured, and the NAS retries it with a growing delay.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from .conftest import ok, registered_cluster
from .sync_helpers import NAS, sync_map, wait_until

BROKEN = "compute-0-3"
ZVOL = "retry-vol"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vhost):
    yield from registered_cluster(tmp_path_factory, vhost, "listing-retry",
                                  node_settings={BROKEN: {"stream_address": "127.0.0.2"}})


def rows(cluster):
    out = ok(cluster.rocks("list", "host", "storagemap", NAS, "output-format=json"))
    return {r["zvol"]: r for r in json.loads(out)}


def test_a_failing_copy_shows_its_error_and_next_retry(cluster):
    ok(cluster.rocks("add", "host", "storagemap", NAS, "tank", "calm-vol", "vm-container-0-14",
                     "1"))
    sync_map(cluster, ZVOL, BROKEN)
    row = wait_until("a second failed copy of retry-vol",
                     lambda: (lambda r: r if (r.get("failures") or 0) >= 2 else None)(
                         rows(cluster)[ZVOL]),
                     timeout=60)
    assert row["state"] == "NAS->VM" and row["host"] == BROKEN
    assert row["error"].startswith("NAS->VM copy: ") and "refused" in row["error"].lower()
    assert isinstance(row["retry_at"], float) and row["retry_at"] > time.time() - 60
    assert re.fullmatch(r"\d+:\d\d:\d\d", row["next-retry"])
    calm = rows(cluster)["calm-vol"]
    assert (calm["error"], calm["failures"], calm["retry_at"]) == (None, 0, None)

    lines = ok(cluster.rocks("list", "host", "storagemap", NAS)).splitlines()
    header = lines[0].split()
    # the manual's columns first; a running attempt may add PROGRESS and RATE
    assert header[:6] == ["ZVOL", "HOST", "ZPOOL", "TARGET", "STATE", "TIME"]
    assert header[-2:] == ["ERROR", "NEXT-RETRY"]
    line = next(x for x in lines if x.startswith(ZVOL + " "))
    assert re.search(r"NAS->VM copy: .*\(x\d+\) +\d+:\d\d:\d\d *$", line), line
    calm_line = next(x for x in lines if x.startswith("calm-vol "))
    assert re.search(r" -+ -+$", calm_line), calm_line

    # the NAS keeps trying: the count grows and the retry moves on
    later = wait_until("another failed copy",
                       lambda: (lambda r: r if r["failures"] > row["failures"] else None)(
                           rows(cluster)[ZVOL]), timeout=60)
    assert later["retry_at"] > row["retry_at"]
    log = cluster.log_path(NAS).read_text()
    assert re.search(r"NAS->VM copy of retry-vol failed .*; retrying in \d+ s", log)
