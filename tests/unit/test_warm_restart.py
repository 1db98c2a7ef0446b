"""Warm restarts, NAS and container together in one process (no broker).

The NAS service's requests reach the container's real handlers, and the
container's notifications the NAS's, through a bridge that stands in for the
broker; streams cross real TCP sockets on 127.0.0.1 as on the simulated
cluster.  The schedulers are ticked by the test, so every step is seen.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Callable, Dict, List

import pytest

from imgstorage import naming, syncsnaps
from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.drivers.base import HOLD_TAG, KEPT_TAG
from imgstorage.drivers.sim import blockdev, zfs as sim_zfs
from imgstorage.errors import ImgStorageError, RemoteError
from imgstorage.messaging import Envelope
from imgstorage.nas import handlers as nas_handlers
from imgstorage.nas.models import Base as NasBase
from imgstorage.nas.service import NasService
from imgstorage.nas.store import NasStore
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService

NAS, POOL, ZVOL = "nas-0-0", "tank", "vm-1-vol"
HOSTS = ("compute-0-3", "vm-container-0-14")
MIB = 1 << 20
BLOCK = 128 * 1024


def envelope(message: Dict, user: str = "guest") -> Envelope:
    body = json.loads(json.dumps(message))           # what crosses the wire, nothing more
    return Envelope(action=body["action"], body=body, message_id=uuid.uuid4().hex,
                    reply_to="q", user_id=user, deadline=time.time() + 30)


class Bridge:
    """The broker between the NAS and its containers, as the services' senders see it."""

    def __init__(self) -> None:
        self.nodes: Dict[str, Dict[str, Callable]] = {}
        self.sent: List[Dict] = []

    def __call__(self) -> "Bridge":                  # the NAS's rpc_factory
        return self

    def __enter__(self) -> "Bridge":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def request(self, node: str, message: Dict, timeout: float) -> Dict:
        self.sent.append(dict(message, node=node))
        try:
            return self.nodes[node][message["action"]](envelope(message))
        except ImgStorageError as exc:
            raise RemoteError(node, message["action"], str(exc), exc.code) from None

    def notify(self, node: str, message: Dict, timeout=None) -> None:
        self.nodes[node][message["action"]](envelope(message))


def wait_for(what: str, condition: Callable[[], object], timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.02)


class Cluster:
    def __init__(self, tmp_path, pool_size: int = 1 << 40):
        self.root = tmp_path / "sim"
        sim_zfs.create_pool(self.root, NAS, POOL, 1 << 40)
        self.bridge = Bridge()
        cfg = from_dict({"name": NAS, "backend": "sim", "sim_root": str(self.root),
                         "db": str(tmp_path / "nas.db")})
        engine = make_engine(cfg.db)
        create_schema(engine, NasBase)
        store = NasStore(engine)
        store.ensure_defaults()
        self.nas = NasService(cfg, store, node_drivers(cfg), rpc_factory=self.bridge)
        self.bridge.nodes[NAS] = nas_handlers.build(self.nas)
        self.vms: Dict[str, VmService] = {}
        for host in HOSTS:
            sim_zfs.create_pool(self.root, host, POOL, pool_size)
            vcfg = from_dict({"name": host, "backend": "sim", "sim_root": str(self.root),
                              "db": str(tmp_path / f"{host}.db"),
                              "stream_address": "127.0.0.1"})
            vengine = make_engine(vcfg.db)
            create_schema(vengine, VmBase)
            vm = VmService(vcfg, vengine, node_drivers(vcfg), notify=self.bridge.notify)
            self.vms[host] = vm
            self.bridge.nodes[host] = vm_handlers.build(vm)

    # -- the NAS's disk ---------------------------------------------------------
    def nas_dev(self, zvol: str = ZVOL):
        return blockdev.open_device(self.root, NAS, f"/dev/zvol/{POOL}/{zvol}")

    def vm_dev(self, host: str, zvol: str = ZVOL):
        return blockdev.open_device(self.root, host, f"/dev/mapper/{zvol}-snap")

    def state(self, zvol: str = ZVOL) -> str:
        return self.nas.store.get(zvol).state

    # -- the schedulers ---------------------------------------------------------
    def settle(self, zvol: str, *states: str) -> None:
        """Tick both sides until the NAS has ``zvol`` in one of ``states``, no job running."""
        def done() -> bool:
            self.nas.sync.tick()
            for vm in self.vms.values():
                vm.sync.tick()
            job = self.nas.sync.jobs.get(zvol)
            if job is not None:
                job.done.wait(10)
                return False
            row = self.nas.store.get(zvol)
            assert row is None or row.failures == 0 or row.state in states, row.last_error
            return row is not None and row.state in states
        wait_for(f"{zvol} in {states}", done)

    def start(self, host: str, zvol: str = ZVOL, keep: bool = True) -> None:
        self.nas.map_zvol(zvol, POOL, host, 1, POOL, True, 30, keep_local=keep)
        self.settle(zvol, "local")

    def stop(self, zvol: str = ZVOL) -> None:
        self.nas.unmap_zvol(zvol, 30)
        self.settle(zvol, "unmapped")


def copy_lines(caplog, zvol: str = ZVOL) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if re.match(rf"NAS->VM copy of {zvol} (to \S+ started|done)", r.getMessage())]


def sent_bytes(caplog, zvol: str = ZVOL) -> int:
    done = [line for line in copy_lines(caplog, zvol) if " done: " in line]
    return int(re.search(r"done: (\d+) bytes", done[-1]).group(1))


@pytest.fixture
def c(tmp_path):
    return Cluster(tmp_path)


def first_run(c: Cluster, host: str, rng_seed: int = 1) -> bytes:
    """A cold start with 4 MiB of data on the NAS, some writes by the VM, a stop."""
    c.nas.drivers.zfs.create_zvol(POOL, ZVOL, naming.GIB)
    c.nas.store.add(ZVOL, POOL, naming.GIB)
    c.nas_dev().write(0, bytes(range(256)) * (4 * MIB // 256))
    c.start(host)
    c.vm_dev(host).write(MIB, b"V" * 8192)
    c.stop()
    return c.nas_dev().read(0, 8 * MIB)


def test_a_restart_on_the_same_container_sends_only_what_changed(c, caplog):
    host = HOSTS[0]
    caplog.set_level(logging.INFO)
    first_run(c, host)
    vm = c.vms[host]
    kept = vm.row(ZVOL)
    assert kept.state == "kept"
    [record] = c.nas.store.kept(ZVOL)
    assert (record.host, record.snapshot) == (host, kept.kept_snapshot)
    assert c.nas.drivers.zfs.holds(POOL, ZVOL, record.snapshot) == [HOLD_TAG, KEPT_TAG]
    full = sent_bytes(caplog)

    # the VM ran on the NAS meanwhile (direct iSCSI elsewhere, say): one block changed
    c.nas_dev().write(6 * MIB, b"N" * BLOCK)
    caplog.clear()
    c.start(host)
    started = copy_lines(caplog)[0]
    assert f"incremental from {record.snapshot}" in started, started
    assert sent_bytes(caplog) < 2 * BLOCK < full
    assert vm.row(ZVOL).kept_snapshot is None
    assert c.nas.store.kept(ZVOL) == []                  # the copy is live again
    assert c.nas.drivers.zfs.holds(POOL, ZVOL, record.snapshot) == []
    # the VM sees the NAS's disk as it is now, byte for byte
    assert c.vm_dev(host).read(0, 8 * MIB) == c.nas_dev().read(0, 8 * MIB)
    assert c.vm_dev(host).read(6 * MIB, 4) == b"NNNN"
    c.vm_dev(host).write(2 * MIB, b"W" * 4096)
    c.stop()
    assert c.nas_dev().read(2 * MIB, 4096) == b"W" * 4096
    # kept again, as of the new final pull; the old snapshot is nobody's base now
    [again] = c.nas.store.kept(ZVOL)
    assert again.snapshot == vm.row(ZVOL).kept_snapshot != record.snapshot


def test_the_default_destroys_the_copy_as_before(c, caplog):
    host = HOSTS[0]
    c.nas.drivers.zfs.create_zvol(POOL, ZVOL, naming.GIB)
    c.nas.store.add(ZVOL, POOL, naming.GIB)
    c.start(host, keep=False)
    c.stop()
    assert c.vms[host].row(ZVOL) is None
    assert c.vms[host].drivers.zfs.get_zvol(POOL, ZVOL) is None
    assert c.nas.store.kept() == []
    dels = [m for m in c.bridge.sent if m["action"] == "del_local"]
    assert dels == [{"action": "del_local", "zvol": ZVOL, "node": host}]   # no keep field
    maps = [m for m in c.bridge.sent if m["action"] == "recv_zvol"]
    assert all(set(m) <= {"action", "zvol", "stream", "node"} for m in maps), maps


def test_a_restart_elsewhere_and_back_still_sends_only_the_changes(c, caplog):
    a, b = HOSTS
    caplog.set_level(logging.INFO)
    first_run(c, a)
    base_a = c.vms[a].row(ZVOL).kept_snapshot
    c.start(b)                                           # b has nothing: a full copy
    assert "full" in copy_lines(caplog)[-2]
    c.vm_dev(b).write(3 * MIB, b"B" * BLOCK)
    c.stop()
    assert {k.host for k in c.nas.store.kept(ZVOL)} == {a, b}
    # more pulls came and went on the NAS: a's base is still held, still there
    assert base_a in c.nas.drivers.zfs.list_snapshots(POOL, ZVOL)
    caplog.clear()
    c.start(a)
    assert f"incremental from {base_a}" in copy_lines(caplog)[0]
    assert sent_bytes(caplog) < 3 * BLOCK
    assert c.vm_dev(a).read(3 * MIB, BLOCK) == b"B" * BLOCK
    assert c.vm_dev(a).read(0, 8 * MIB) == c.nas_dev().read(0, 8 * MIB)
    c.stop()


@pytest.mark.parametrize("side", ["nas", "container"])
def test_no_shared_snapshot_means_the_kept_copy_goes_and_a_full_copy_runs(c, caplog, side):
    host = HOSTS[0]
    caplog.set_level(logging.INFO)
    first_run(c, host)
    snap = c.vms[host].row(ZVOL).kept_snapshot
    zfs = c.nas.drivers.zfs if side == "nas" else c.vms[host].drivers.zfs
    for tag in zfs.holds(POOL, ZVOL, snap):
        zfs.release(POOL, ZVOL, snap, tag)
    zfs.destroy_snapshot(POOL, ZVOL, snap)               # an administrator's stray destroy
    c.nas_dev().write(5 * MIB, b"X" * 4096)
    caplog.clear()
    c.start(host)
    assert "full" in copy_lines(caplog)[0]
    assert c.vm_dev(host).read(0, 8 * MIB) == c.nas_dev().read(0, 8 * MIB)
    assert c.nas.store.kept(ZVOL) == []
    c.stop()


def test_a_guid_that_differs_means_a_full_copy(c, caplog):
    host = HOSTS[0]
    caplog.set_level(logging.INFO)
    first_run(c, host)
    zfs = c.vms[host].drivers.zfs
    snap = c.vms[host].row(ZVOL).kept_snapshot
    zfs.release(POOL, ZVOL, snap, HOLD_TAG)
    zfs.destroy_snapshot(POOL, ZVOL, snap)
    zfs.snapshot(POOL, ZVOL, snap)                       # the same name, another snapshot
    caplog.clear()
    c.start(host)
    assert any("guid" in r.getMessage() and "full copy" in r.getMessage()
               for r in caplog.records)
    assert "full" in copy_lines(caplog)[0]
    assert c.vm_dev(host).read(0, 8 * MIB) == c.nas_dev().read(0, 8 * MIB)
    c.stop()


def test_removing_the_zvol_destroys_the_kept_copies(c):
    a, b = HOSTS
    first_run(c, a)
    c.start(b)
    c.stop()
    c.nas.del_zvol(ZVOL, POOL)
    for host in HOSTS:
        assert c.vms[host].row(ZVOL) is None
        assert c.vms[host].drivers.zfs.get_zvol(POOL, ZVOL) is None
    assert c.nas.store.get(ZVOL) is None and c.nas.store.kept() == []
    assert c.nas.drivers.zfs.get_zvol(POOL, ZVOL) is None


def test_a_copy_evicted_for_room_is_reported_and_let_go(tmp_path):
    c = Cluster(tmp_path, pool_size=naming.GIB + naming.GIB // 2)
    host = HOSTS[0]
    first_run(c, host)
    snap = c.nas.store.kept(ZVOL)[0].snapshot
    c.nas.drivers.zfs.create_zvol(POOL, "other", naming.GIB)
    c.nas.store.add("other", POOL, naming.GIB)
    c.nas.map_zvol("other", POOL, host, 1, POOL, True, 30)       # needs the kept copy's room
    assert c.vms[host].row(ZVOL) is None
    assert c.nas.store.kept() == []
    assert KEPT_TAG not in c.nas.drivers.zfs.holds(POOL, ZVOL, snap)


def test_a_report_of_another_containers_copy_is_refused_in_strict_mode(tmp_path, caplog):
    c = Cluster(tmp_path)
    first_run(c, HOSTS[0])
    c.nas.config = c.nas.config.__class__(**{**c.nas.config.__dict__,
                                              "admin_users": ["admin"]})
    handlers = nas_handlers.build(c.nas)
    snap = c.nas.store.kept(ZVOL)[0].snapshot
    message = {"action": "kept_dropped", "zvol": ZVOL, "host": HOSTS[0], "snapshot": snap}
    handlers["kept_dropped"](envelope(message, user=HOSTS[1]))
    assert len(c.nas.store.kept()) == 1
    handlers["kept_dropped"](envelope(dict(message, snapshot="IMG-STORAGE-other"),
                                      user=HOSTS[0]))
    assert len(c.nas.store.kept()) == 1                 # not the copy it keeps now
    handlers["kept_dropped"](envelope(message, user=HOSTS[0]))
    assert c.nas.store.kept() == []


def test_a_nas_restart_forgets_records_whose_snapshot_is_gone(c):
    first_run(c, HOSTS[0])
    snap = c.nas.store.kept(ZVOL)[0].snapshot
    zfs = c.nas.drivers.zfs
    c.nas.recover()
    assert len(c.nas.store.kept()) == 1 and KEPT_TAG in zfs.holds(POOL, ZVOL, snap)
    syncsnaps.let_go(zfs, POOL, ZVOL)
    zfs.destroy_snapshot(POOL, ZVOL, snap)
    c.nas.recover()
    assert c.nas.store.kept() == []
