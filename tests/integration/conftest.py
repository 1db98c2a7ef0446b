"""Integration fixtures: the real broker (a fresh vhost per cluster) and real daemon processes."""
from __future__ import annotations

import json
import os
import uuid

import pytest

from imgstorage.config import from_dict
from imgstorage.messaging import RpcClient
from imgstorage.simcluster import SimCluster, broker_url, broker_vhost


@pytest.fixture(scope="module")
def vhost():
    with broker_vhost(f"imgstorage-test-{os.getpid()}-{uuid.uuid4().hex[:8]}") as name:
        yield name


def _cluster(tmp_path_factory, vhost, name: str = "cluster", strict: bool = False, **kw):
    cluster = SimCluster(tmp_path_factory.mktemp(name), broker_url(vhost), **kw)
    if strict:
        register(cluster)
        cluster.sync_identities()
    assert cluster.make_pools() == cluster.nas + cluster.containers
    cluster.start()
    return cluster


def register(cluster) -> None:
    """The nodes registered on the frontend, as an operator would."""
    for args in (["add", "host", "nas-0-0", "appliance=nas"],
                 ["add", "host", "vm-container-0-14", "appliance=vm-container"],
                 ["add", "host", "compute-0-3", "appliance=vm-container"],
                 ["set", "host", "attr", "nas-0-0", "img_zpools", "tank"]):
        ok(cluster.rocks(*args))


def registered_cluster(tmp_path_factory, vhost, name: str, **kw):
    """A fixture body: a started, registered cluster of its own, stopped afterwards."""
    c = _cluster(tmp_path_factory, vhost, name, **kw)
    try:
        if not kw.get("strict"):
            register(c)
        yield c
    finally:
        c.stop_all()


def strict_cluster(tmp_path_factory, vhost, name: str, **kw):
    """A fixture body: a cluster set up as README.rst says, in strict mode: registered,
    each node its own broker user with the narrowest permissions (``rocks sync host
    imgstorage``) and its configuration from ``rocks report host imgstorage``; the
    operator's commands run as the administrator ("guest", the vhost's user).

    Broker users are broker-wide and named after the nodes, so one module at a
    time may use this (test_callers.py)."""
    yield from registered_cluster(tmp_path_factory, vhost, name, strict=True, **kw)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, vhost):
    """A NAS (nas-0-0, pool tank) and two VM containers running, nothing registered."""
    c = _cluster(tmp_path_factory, vhost)
    yield c
    c.stop_all()


@pytest.fixture(scope="module")
def cluster(daemons):
    """The same nodes, registered on the frontend as an operator would."""
    register(daemons)
    return daemons


@pytest.fixture
def rpc(daemons):
    cfg = from_dict(json.loads(daemons.config_path("frontend").read_text()))
    with RpcClient(cfg) as client:
        yield client


def ok(proc) -> str:
    """The stdout of a command that must have succeeded."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.decode() == ""
    return proc.stdout.decode()


def fails(proc, text: str) -> str:
    """The one error line of a command that must have failed with ``text``."""
    err = proc.stderr.decode()
    assert proc.returncode != 0, (proc.stdout, err)
    assert text in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err
