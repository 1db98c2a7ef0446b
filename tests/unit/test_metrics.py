"""A daemon's metrics: what is counted and timed, what a scrape reads, the endpoint."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from imgstorage import config, naming
from imgstorage.daemon import Daemon
from imgstorage.db import create_schema, make_engine
from imgstorage.errors import ConfigError, ImgStorageError
from imgstorage.messaging import Envelope
from imgstorage.metrics import PHASES, Metrics, NasCollector
from imgstorage.nas import handlers as nas_handlers
from imgstorage.nas.states import Event, State
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.states import Event as VmEvent
from imgstorage.vm.store import VmStore

from .metrics_sample import DEVICES, nas_metrics, vm_metrics
from .nas_stub import HOST, NAS, POOL, nas_service, put_row, success


def value(metrics: Metrics, name: str, **labels) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def env(action: str, message_id: str = "m1", received: float = None, **body) -> Envelope:
    return Envelope(action=action, body={"action": action, **body}, message_id=message_id,
                    reply_to="q", user_id="guest", deadline=None,
                    received=time.time() if received is None else received)


class Responder:
    def reply(self, message):
        self.message = message

    def done(self):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ configuration
def test_the_endpoint_is_off_unless_a_port_is_set_and_listens_on_loopback():
    cfg = config.from_dict({"name": NAS})
    assert (cfg.metrics_port, cfg.metrics_bind) == (None, "127.0.0.1")
    cfg = config.from_dict({"name": NAS, "metrics_port": 9417, "metrics_bind": "10.1.2.3"})
    assert (cfg.metrics_port, cfg.metrics_bind) == (9417, "10.1.2.3")


@pytest.mark.parametrize("key, bad", [("metrics_port", 0), ("metrics_port", 70000),
                                      ("metrics_port", "http"), ("metrics_port", True),
                                      ("metrics_bind", "not an address!")])
def test_a_bad_metrics_key_is_one_line_naming_it(key, bad):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"name": NAS, key: bad})
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------ requests
def daemon(**handlers) -> Daemon:
    cfg = config.from_dict({"name": NAS, "admin_users": ["guest"]})
    return Daemon(cfg, handlers, quick_actions={"list_zvols"}, restricted={"map_zvol"})


def test_requests_are_counted_by_action_and_outcome_and_timed():
    def failing(e):
        raise naming.ValidationError("no such thing")
    d = daemon(map_zvol=lambda e: {"action": "zvol_mapped", "status": "success"},
               list_zvols=lambda e: {"action": "zvol_list", "status": "success"},
               del_zvol=failing, zvol_synced=lambda e: None)
    m = d.metrics
    assert m.registry.get_sample_value("imgstorage_requests_total",
                                       {"action": "del_zvol", "outcome": "success"}) == 0
    d.dispatch(env("map_zvol", received=time.time() - 3), Responder(), None)
    d.dispatch(env("map_zvol"), Responder(), None)                 # a copy: run once
    d.dispatch(env("list_zvols", "m2"), Responder(), None)
    d.dispatch(env("del_zvol", "m3"), Responder(), None)
    d.dispatch(env("zvol_synced", "m4"), Responder(), None)       # a notification
    d.work_pool.shutdown(wait=True)
    d.quick_pool.shutdown(wait=True)
    assert value(m, "imgstorage_requests_total", action="map_zvol", outcome="success") == 1
    assert value(m, "imgstorage_requests_total", action="map_zvol", outcome="duplicate") == 1
    assert value(m, "imgstorage_requests_total", action="list_zvols", outcome="success") == 1
    assert value(m, "imgstorage_requests_total", action="del_zvol", outcome="invalid") == 1
    assert value(m, "imgstorage_requests_total", action="zvol_synced", outcome="success") == 1
    assert value(m, "imgstorage_request_duration_seconds_count", action="map_zvol") == 1
    assert value(m, "imgstorage_request_duration_seconds_sum", action="map_zvol") >= 3
    assert value(m, "imgstorage_request_duration_seconds_bucket", action="map_zvol",
                 le="2.5") == 0


def test_what_callers_make_up_never_becomes_a_label():
    d = daemon(map_zvol=lambda e: {"action": "zvol_mapped", "status": "error",
                                   "error": "x", "code": "made-up-by-a-container"})
    m = d.metrics
    for n in range(3):
        d.dispatch(env(f"action-{n}", f"u{n}"), Responder(), None)
    d.dispatch(None, Responder(), "not JSON")
    d.dispatch(env("map_zvol", "m9"), Responder(), None)
    d.work_pool.shutdown(wait=True)
    assert value(m, "imgstorage_requests_total", action="unknown",
                 outcome="unknown_action") == 3
    assert value(m, "imgstorage_requests_total", action="unknown", outcome="invalid") == 1
    assert value(m, "imgstorage_requests_total", action="map_zvol", outcome="error") == 1
    labels = {tuple(sorted(s.labels.items())) for f in m.registry.collect()
              for s in f.samples if s.name == "imgstorage_requests_total"}
    assert not any("action-" in str(x) or "made-up" in str(x) for x in labels), labels


def test_a_refused_and_an_expired_request_are_counted_apart():
    d = daemon(map_zvol=lambda e: {"action": "zvol_mapped", "status": "success"})
    m = d.metrics
    stranger = env("map_zvol", "m5")
    stranger.user_id = "vm-container-0-14"
    d.dispatch(stranger, Responder(), None)
    late = env("map_zvol", "m6")
    late.deadline = time.time() - 1
    d.dispatch(late, Responder(), None)
    assert value(m, "imgstorage_requests_total", action="map_zvol", outcome="forbidden") == 1
    assert value(m, "imgstorage_requests_total", action="map_zvol", outcome="expired") == 1


def test_worker_pools_and_broker_reconnections():
    d = daemon(map_zvol=lambda e: None)
    m = d.metrics
    assert value(m, "imgstorage_worker_pool_size", pool="work") == 64
    assert value(m, "imgstorage_worker_pool_size", pool="quick") == 16
    d._inflight["work"] = 70                    # six more than workers: they wait
    assert value(m, "imgstorage_worker_pool_busy", pool="work") == 64
    assert value(m, "imgstorage_worker_pool_queued", pool="work") == 6
    d._inflight["work"] = 0
    assert value(m, "imgstorage_broker_connected") == 0
    d._connected()                              # the first connection is no reconnection
    assert value(m, "imgstorage_broker_reconnections_total") == 0
    d._connected()
    d._connected()
    assert value(m, "imgstorage_broker_reconnections_total") == 2


# ------------------------------------------------------------ phases
def test_phases_are_timed_from_the_transitions_that_end_them(tmp_path):
    service, _containers = nas_service(tmp_path)
    store, m = service.store, service.metrics
    store.add("vol", POOL, naming.GIB)
    store.transition("vol", Event.MAP, remotehost=HOST)
    store.transition("vol", Event.ATTACHED_SYNC, recovery_point=time.time() - 50)
    put_row(store, "vol", state_since=time.time() - 7)
    store.transition("vol", Event.UPLOADED)
    store.transition("vol", Event.SYNCED)
    store.transition("vol", Event.PULL)
    put_row(store, "vol", state_since=time.time() - 3)
    store.transition("vol", Event.PULLED)
    store.transition("vol", Event.PULL)
    store.transition("vol", Event.FAILED)              # a failed pull is no pull
    store.transition("vol", Event.UNMAP)
    store.transition("vol", Event.DETACHED_LOCAL)
    put_row(store, "vol", state_since=time.time() - 11)
    store.transition("vol", Event.PULLED)
    store.transition("vol", Event.RELEASED)
    count = {p: value(m, "imgstorage_phase_duration_seconds_count", phase=p) for p in PHASES}
    assert count == {"copy": 1, "map_to_local": 1, "pull": 1, "final_pull": 1,
                     "map": 0, "unmap": 0, "merge": 0}
    took = {p: value(m, "imgstorage_phase_duration_seconds_sum", phase=p)
            for p in ("copy", "map_to_local", "pull", "final_pull")}
    for phase, seconds in (("copy", 7), ("map_to_local", 50), ("pull", 3), ("final_pull", 11)):
        assert seconds <= took[phase] < seconds + 30, (phase, took)


def test_a_container_times_its_merge(tmp_path):
    engine = make_engine(str(tmp_path / "vm.db"))
    create_schema(engine, VmBase)
    store = VmStore(engine)
    m = Metrics(HOST, "vm")
    from imgstorage.vm.states import PHASES as VM_PHASES
    m.time_phases(store, VM_PHASES)
    assert value(m, "imgstorage_phase_duration_seconds_count", phase="merge") == 0
    store.add("vol", nas=NAS, sync=True, remotepool=POOL)
    store.transition("vol", VmEvent.SNAPSHOTTED)
    store.transition("vol", VmEvent.MERGE)
    store.update("vol", merge_started=time.time())
    from imgstorage.vm.models import VmZvol
    with store.session() as s, s.begin():
        s.get(VmZvol, "vol").state_since = time.time() - 5
    store.transition("vol", VmEvent.MERGED)
    assert value(m, "imgstorage_phase_duration_seconds_count", phase="merge") == 1
    assert 5 <= value(m, "imgstorage_phase_duration_seconds_sum", phase="merge") < 35


def test_a_broken_observer_fails_no_transition(tmp_path):
    service, _containers = nas_service(tmp_path)
    store = service.store
    store.add("vol", POOL, naming.GIB)

    def broken(*args):
        raise RuntimeError("a bug in a measurement")
    store.on_transition = broken
    assert store.transition("vol", Event.MAP).state == State.MAPPING.value


def test_every_phase_is_timed_by_some_daemon(tmp_path):
    service, _containers = nas_service(tmp_path)
    from imgstorage.vm.states import PHASES as VM_PHASES
    from imgstorage.nas.states import PHASES as NAS_PHASES
    timed = {phase for phase, _column in list(NAS_PHASES.values()) + list(VM_PHASES.values())}
    timed |= {"map", "unmap"}                  # by the NAS's request handlers
    assert timed == set(PHASES)
    # a NAS shows its phases at 0 before the first ends, a container its merge
    nas_phases = {s.labels["phase"] for f in service.metrics.registry.collect()
                  for s in f.samples if s.name == "imgstorage_phase_duration_seconds_count"}
    assert nas_phases == set(PHASES) - {"merge"}


def test_the_nas_times_a_map_and_an_unmap_from_request_to_answer(tmp_path):
    service, containers = nas_service(tmp_path)
    (tmp_path / "sim" / HOST).mkdir(parents=True, exist_ok=True)
    service.drivers.zfs.create_zvol(POOL, "vol", naming.GIB)
    service.store.add("vol", POOL, naming.GIB)
    put_row(service.store, "vol", state=State.MAPPED.value, remotehost=HOST, bdev="/dev/sdb")
    containers.answers["unmap_zvol"] = success(local=False)
    handlers = nas_handlers.build(service)
    handlers["unmap_zvol"](env("unmap_zvol", zvol="vol", received=time.time() - 4))
    m = service.metrics
    assert value(m, "imgstorage_phase_duration_seconds_count", phase="unmap") == 1
    assert 4 <= value(m, "imgstorage_phase_duration_seconds_sum", phase="unmap") < 34
    assert value(m, "imgstorage_phase_duration_seconds_count", phase="map") == 0


# ------------------------------------------------------------ transfer failures
def test_failed_transfers_are_counted_by_kind(tmp_path):
    service, containers = nas_service(tmp_path)
    service.store.add("vol", POOL, naming.GIB)
    put_row(service.store, "vol", state=State.UPLOADING.value, remotehost=HOST,
            remotepool=POOL, sync=True)
    m = service.metrics
    m.expect_transfers()
    for _attempt in range(2):       # nobody answers recv_zvol: the copy fails
        job = service.sync.jobs.start("vol", "upload", service.sync._upload)
        assert job.done.wait(30)
    assert value(m, "imgstorage_transfer_failures_total", kind="upload") == 2
    assert value(m, "imgstorage_transfer_failures_total", kind="pull") == 0
    assert service.store.get("vol").failures == 2
    containers.answers["recv_zvol"] = lambda msg: {"action": "recv_zvol", "status": "error",
                                                   "error": "busy", "code": "busy"}
    job = service.sync.jobs.start("vol", "upload", service.sync._upload)
    assert job.done.wait(30)
    assert value(m, "imgstorage_transfer_failures_total", kind="upload") == 2   # busy: no failure
    service.sync.jobs.shutdown()


# ------------------------------------------------------------ what a scrape reads
def test_a_nas_scrape_reads_each_zvol_as_its_listing_shows_it(tmp_path):
    with nas_metrics(tmp_path) as (m, service):
        now = time.time()
        listing = {r["zvol"]: r for r in service.list_zvols()}
        for zvol, row in listing.items():
            assert value(m, "imgstorage_zvol_state", zvol=zvol, state=row["lifecycle"],
                         host=row.get("remotehost", "")) == 1
        assert value(m, "imgstorage_zvol_size_bytes", zvol="vol-idle") == 2 << 30
        assert value(m, "imgstorage_zvol_state_since_timestamp_seconds", zvol="vol-local",
                     state="local") == service.store.get("vol-local").state_since
        # the recovery point, its age, and the frequency it is measured against
        point = listing["vol-local"]["recovery_point"]
        assert value(m, "imgstorage_zvol_recovery_point_timestamp_seconds",
                     zvol="vol-local") == point
        assert 100 <= value(m, "imgstorage_zvol_recovery_point_age_seconds",
                            zvol="vol-local") < 160
        assert value(m, "imgstorage_zvol_sync_frequency_seconds", zvol="vol-local") == 300
        assert value(m, "imgstorage_zvol_last_pull_timestamp_seconds", zvol="vol-local") == \
            int(point)
        assert value(m, "imgstorage_zvol_next_sync_timestamp_seconds", zvol="vol-local") > now
        for absent in ("vol-idle",):
            assert m.registry.get_sample_value(
                "imgstorage_zvol_recovery_point_timestamp_seconds", {"zvol": absent}) is None
        # the running copy
        assert value(m, "imgstorage_zvol_transfer_bytes", zvol="vol-copy", kind="upload") == 400
        assert value(m, "imgstorage_zvol_transfer_estimated_bytes", zvol="vol-copy",
                     kind="upload") == 1000
        assert m.registry.get_sample_value("imgstorage_zvol_transfer_rate_bytes_per_second",
                                           {"zvol": "vol-copy", "kind": "upload"}) is not None
        assert value(m, "imgstorage_worker_pool_busy", pool="sync") == 1
        # failures
        assert value(m, "imgstorage_zvol_consecutive_failures", zvol="vol-fail") == 3
        assert value(m, "imgstorage_zvol_consecutive_failures", zvol="vol-local") == 0
        assert value(m, "imgstorage_zvol_retry_timestamp_seconds", zvol="vol-fail") == \
            service.store.get("vol-fail").retry_at
        # a zvol's own frequency, then the NAS's, win over the default
        service.store.set_zvol_attrs("vol-local", {"frequency": 60})
        assert value(m, "imgstorage_zvol_sync_frequency_seconds", zvol="vol-local") == 60
        service.store.set_attrs({"frequency": "900"})
        assert value(m, "imgstorage_zvol_sync_frequency_seconds", zvol="vol-fail") == 900
        # read at scrape time: a change shows at the next scrape, nothing to keep in step
        service.store.transition("vol-local", Event.UNMAP)
        assert value(m, "imgstorage_zvol_state", zvol="vol-local", state="unmapping",
                     host=HOST) == 1
        assert m.registry.get_sample_value("imgstorage_zvol_state", {
            "zvol": "vol-local", "state": "local", "host": HOST}) is None


def test_a_scrape_whose_zvols_cannot_be_read_still_answers(tmp_path):
    service, _containers = nas_service(tmp_path)
    m = service.metrics
    m.register(NasCollector(service))
    service.store.engine.dispose()
    (tmp_path / "nas.db").unlink()
    (tmp_path / "nas.db").mkdir()                     # no database to read any more
    text = m.exposition().decode()
    assert "imgstorage_node_info" in text and "imgstorage_zvol_state{" not in text
    assert value(m, "imgstorage_scrape_errors_total") == 1


def test_a_container_scrape_reads_its_devices_as_list_dev_shows_them():
    m = vm_metrics()
    assert value(m, "imgstorage_devices", status="snapshot-merge") == 1
    assert value(m, "imgstorage_devices", status="iscsi") == 1     # an iSCSI disk of no zvol
    assert sum(value(m, "imgstorage_devices", status=s) for s in
               ("snapshot-merge", "linear", "kept", "iscsi")) == len(DEVICES)
    assert value(m, "imgstorage_device_state", zvol="vol-merge", state="merging",
                 status="snapshot-merge") == 1
    assert value(m, "imgstorage_device_merge_progress_ratio", zvol="vol-merge") == 0.425
    assert m.registry.get_sample_value("imgstorage_device_merge_progress_ratio",
                                       {"zvol": "vol-local"}) is None


# ------------------------------------------------------------ the endpoint
def test_the_endpoint_serves_the_registry_and_a_taken_port_is_one_line():
    m = Metrics(NAS, "nas")
    port = free_port()
    assert m.listen(port) == ("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert f'imgstorage_node_info{{node="{NAS}",role="nas"}} 1.0' in text
        other = Metrics(NAS, "nas")
        with pytest.raises(ImgStorageError) as err:
            other.listen(port)
        text = str(err.value)
        assert f"port {port}" in text and "metrics_port" in text and "\n" not in text
    finally:
        m.close()
    assert Metrics(NAS, "nas").listen(None) is None


def test_a_daemon_whose_metrics_port_is_taken_does_not_start(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    (tmp_path / "sim").mkdir()
    conf = tmp_path / "nas.conf"
    conf.write_text(json.dumps({"name": NAS, "backend": "sim", "sim_root": str(tmp_path / "sim"),
                                "db": str(tmp_path / "nas.db"), "metrics_port": port,
                                "log_file": str(tmp_path / "nas.log")}))
    try:
        proc = subprocess.run([sys.executable, "-c",
                               "from imgstorage.nas.main import main; main()",
                               "--config", str(conf)], capture_output=True, timeout=120)
    finally:
        taken.close()
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"img-storage-nas: cannot serve metrics on 127.0.0.1 port {port}" in err, err
    assert not (tmp_path / "nas.db").exists()       # nothing was opened, let alone recovered
