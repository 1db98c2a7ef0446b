"""A starting daemon waits for its pools: on the simulated ZFS driver, with real threads."""
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from imgstorage import config, poolwait
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers.sim import zfs as simzfs
from imgstorage.nas import models as nas_models
from imgstorage.vm import models as vm_models

REPO = Path(__file__).resolve().parents[2]


def nas_engine(tmp_path, rows):
    engine = make_engine(str(tmp_path / "nas.db"))
    create_schema(engine, nas_models.Base)
    with Session(engine) as s, s.begin():
        for zvol, pool in rows:
            s.add(nas_models.Zvol(zvol=zvol, zpool=pool))
    return engine


def vm_engine(tmp_path, rows):
    engine = make_engine(str(tmp_path / "vm.db"))
    create_schema(engine, vm_models.Base)
    with Session(engine) as s, s.begin():
        for zvol, pool in rows:
            s.add(vm_models.VmZvol(zvol=zvol, nas="nas-0-0", remotepool=pool))
    return engine


def cfg(tmp_path, **keys):
    return config.from_dict({"name": "nas-0-0", "backend": "sim", "sim_root": str(tmp_path),
                             **keys})


class Watched:
    """The simulated driver, telling the test when the waiter found a pool missing."""

    def __init__(self, inner):
        self.inner = inner
        self.found_missing = threading.Event()

    def pool_exists(self, pool):
        there = self.inner.pool_exists(pool)
        if not there:
            self.found_missing.set()
        return there


def test_pools_in_use_names_each_pool_with_its_zvols(tmp_path):
    engine = nas_engine(tmp_path, [("vol-b", "tank"), ("vol-a", "tank"), ("vol-c", "data")])
    assert poolwait.pools_in_use(engine, nas_models.Zvol.zpool) == {
        "tank": ["vol-a", "vol-b"], "data": ["vol-c"]}
    engine = vm_engine(tmp_path, [("vol-a", "local"), ("vol-b", None)])
    assert poolwait.pools_in_use(engine, vm_models.VmZvol.remotepool) == {"local": ["vol-a"]}


def test_no_wait_when_every_pool_is_there(tmp_path, caplog):
    simzfs.create_pool(tmp_path, "nas-0-0", "tank")
    engine = nas_engine(tmp_path, [("vol-a", "tank")])
    zfs = Watched(simzfs.SimZfs(tmp_path, "nas-0-0"))
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        assert poolwait.wait_for_pools(cfg(tmp_path, default_pool="tank"), engine, zfs,
                                       nas_models.Zvol.zpool)
    assert not zfs.found_missing.is_set()
    assert caplog.messages == []


def test_a_pool_imported_later_ends_the_wait(tmp_path, caplog):
    simzfs.create_pool(tmp_path, "nas-0-0", "data")
    engine = nas_engine(tmp_path, [("vol-a", "tank"), ("vol-b", "tank"), ("vol-c", "data")])
    zfs = Watched(simzfs.SimZfs(tmp_path, "nas-0-0"))
    result = {}

    def wait():
        result["ok"] = poolwait.wait_for_pools(cfg(tmp_path), engine, zfs, nas_models.Zvol.zpool,
                                               poll=0.02)
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        waiter = threading.Thread(target=wait)
        waiter.start()
        assert zfs.found_missing.wait(10)
        assert waiter.is_alive()                     # still waiting: the pool is not there
        simzfs.create_pool(tmp_path, "nas-0-0", "tank")
        waiter.join(10)
    assert not waiter.is_alive() and result == {"ok": True}
    assert caplog.messages[0] == ("pool tank is not imported; zvols that need it: vol-a, vol-b; "
                                  "waiting up to 300s for it before serving")
    assert caplog.messages[1].startswith("pool tank is there after ")
    assert len(caplog.messages) == 2


def test_the_container_waits_for_its_local_and_default_pools(tmp_path, caplog):
    engine = vm_engine(tmp_path, [("vol-a", "local")])
    zfs = Watched(simzfs.SimZfs(tmp_path, "vm-container-0-14"))
    conf = cfg(tmp_path, name="vm-container-0-14", default_pool="scratch")
    done = threading.Event()

    def wait():
        poolwait.wait_for_pools(conf, engine, zfs, vm_models.VmZvol.remotepool, poll=0.02)
        done.set()
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        threading.Thread(target=wait, daemon=True).start()
        assert zfs.found_missing.wait(10)
        simzfs.create_pool(tmp_path, "vm-container-0-14", "local")
        zfs.found_missing.clear()
        assert zfs.found_missing.wait(10)            # looked again: "scratch" is still missing
        assert not done.is_set()
        simzfs.create_pool(tmp_path, "vm-container-0-14", "scratch")
        assert done.wait(10)
    waiting = [m for m in caplog.messages if "waiting up to" in m]
    assert waiting == [
        "pool local is not imported; zvols that need it: vol-a; waiting up to 300s for it "
        "before serving",
        "pool scratch is not imported; zvols that need it: no zvol yet (default_pool); waiting "
        "up to 300s for it before serving"]


class Clock:
    """Time that moves 25 seconds at every look."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 25.0
        return self.now


def test_reminders_then_serving_anyway_after_pool_wait(tmp_path, caplog):
    engine = nas_engine(tmp_path, [("vol-a", "tank")])
    zfs = Watched(simzfs.SimZfs(tmp_path, "nas-0-0"))
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        assert not poolwait.wait_for_pools(cfg(tmp_path, pool_wait=200), engine, zfs,
                                           nas_models.Zvol.zpool, clock=Clock(), poll=0)
    reminders = [m for m in caplog.messages if m.startswith("still waiting")]
    assert reminders and len(reminders) <= 200 // 60
    assert all("pool tank (it is not imported)" in m and m.endswith("vol-a") for m in reminders)
    assert caplog.records[-1].levelno == logging.ERROR
    assert caplog.messages[-1].startswith("pool tank is not imported after ")
    assert caplog.messages[-1].endswith("serving anyway; requests on its zvols (vol-a) fail "
                                        "until it is imported")


def test_pool_wait_zero_does_not_wait(tmp_path, caplog):
    engine = nas_engine(tmp_path, [("vol-a", "tank")])
    zfs = Watched(simzfs.SimZfs(tmp_path, "nas-0-0"))
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        assert not poolwait.wait_for_pools(cfg(tmp_path, pool_wait=0), engine, zfs,
                                           nas_models.Zvol.zpool, stop=stop)
    assert len(caplog.messages) == 1 and "serving anyway" in caplog.messages[0]


def test_a_pool_that_cannot_be_listed_is_waited_for_with_the_reason(tmp_path, caplog):
    from imgstorage.errors import CommandError
    engine = nas_engine(tmp_path, [("vol-a", "tank")])

    class Broken:
        def pool_exists(self, pool):
            raise CommandError(["zpool", "list"], 1, "The ZFS modules are not loaded.", "")
    stop = threading.Event()
    stop.set()                                       # stopped by its owner: no wait at all
    with caplog.at_level(logging.INFO, logger="imgstorage.poolwait"):
        assert not poolwait.wait_for_pools(cfg(tmp_path), engine, Broken(),
                                           nas_models.Zvol.zpool, stop=stop)
    assert "pool tank cannot be listed:" in caplog.messages[0]
    assert "The ZFS modules are not loaded." in caplog.messages[0]


WAITER = """
import logging, sys
from imgstorage import config, poolwait
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers.sim.zfs import SimZfs
from imgstorage.nas.models import Base, Zvol
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
engine = make_engine(sys.argv[2])
create_schema(engine, Base)
cfg = config.from_dict({"name": "nas-0-0", "backend": "sim", "sim_root": sys.argv[1],
                        "default_pool": "tank", "pool_wait": 3600})
poolwait.wait_for_pools(cfg, engine, SimZfs(sys.argv[1], "nas-0-0"), Zvol.zpool)
print("went on", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_wait_at_once(tmp_path, signum):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", WAITER, str(tmp_path), str(tmp_path / "n.db")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "pool tank is not imported" in first, first
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == ""                                 # it did not go on to serve
    assert f"received signal {int(signum)} while waiting for pool(s) tank; stopping" in err
