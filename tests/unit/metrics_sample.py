"""Daemons' metrics with something in every family: what the shipped files are checked against.

A NAS service on the simulated kernel (nas_stub) with zvols in the states that
fill each per-zvol family (one local with a recovery point, one copying, one
whose final pull keeps failing, one idle), and a container whose listing has
a device merging; each wrapped in a Daemon as the daemons' main modules do,
and every instrument used once.  The names a scrape carries are derived from
these registries, never from a list kept by hand.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Set, Tuple

from imgstorage.config import from_dict
from imgstorage.daemon import Daemon
from imgstorage.metrics import PHASES, DeviceCollector, Metrics, NasCollector
from imgstorage.nas import handlers as nas_handlers
from imgstorage.vm import handlers as vm_handlers

from .nas_stub import HOST, nas_service, put_row

NOW = time.time()

# What list_dev answers for a container with one merging, one local and one kept
# device and an iSCSI disk of no zvol of its own (the form of VmService.list_dev).
DEVICES: Dict[str, Dict] = {
    "vol-merge": {"zvol": "vol-merge", "device": "vol-merge-snap", "status": "snapshot-merge",
                  "state": "merging", "synced_percent": 42.5, "started": True,
                  "time": NOW - 30},
    "vol-local": {"zvol": "vol-local", "device": "vol-local-snap", "status": "linear",
                  "state": "local", "synced_percent": None},
    "vol-kept": {"zvol": "vol-kept", "device": None, "status": "kept", "state": "kept"},
    "volume0": {"zvol": None, "device": None, "status": "iscsi", "state": "unknown"},
}


class Listing:
    """A container's service as the collector sees it: its listing."""

    def __init__(self, body: Dict[str, Dict]):
        self.body = body

    def list_dev(self) -> Dict[str, Dict]:
        return self.body


@contextmanager
def nas_metrics(root) -> Iterator[Tuple[Metrics, object]]:
    """A NAS's metrics with every family filled; the service behind them."""
    service, _containers = nas_service(root)
    store = service.store
    now = time.time()
    for name in ("vol-local", "vol-copy", "vol-fail", "vol-idle"):
        store.add(name, "tank", 2 << 30)
    put_row(store, "vol-local", state="local", remotehost=HOST, remotepool="tank", sync=True,
            recovery_point=now - 100, state_since=now - 3000)
    store.set_zvol_attrs("vol-local", {"nextsync": int(now + 200),
                                       "last_pull_at": int(now - 100)})
    put_row(store, "vol-copy", state="uploading", remotehost=HOST, remotepool="tank", sync=True,
            recovery_point=now - 20, state_since=now - 20)
    put_row(store, "vol-fail", state="final_pull", remotehost=HOST, remotepool="tank",
            sync=True, recovery_point=now - 900, failures=3, retry_at=now + 8,
            last_error="final NAS<-VM sync: timed out")
    release = threading.Event()
    started = threading.Event()

    def copying(job) -> None:
        job.progress.total = 1000
        job.progress.add(400)
        started.set()
        release.wait(30)

    metrics = service.metrics
    Daemon(service.config, nas_handlers.build(service), quick_actions=nas_handlers.QUICK,
           metrics=metrics)
    metrics.expect_transfers()
    metrics.add_pool("sync", service.sync.jobs.workers, service.sync.jobs.count)
    metrics.register(NasCollector(service))
    service.sync.jobs.start("vol-copy", "upload", copying)
    assert started.wait(10)
    exercise(metrics)
    metrics.transfer_failed("final_pull")
    try:
        yield metrics, service
    finally:
        release.set()
        service.sync.jobs.shutdown()


def vm_metrics(body: Dict[str, Dict] = DEVICES) -> Metrics:
    """A container's metrics over a listing of ``body``."""
    cfg = from_dict({"name": HOST})
    metrics = Metrics(HOST, "vm")
    Daemon(cfg, {action: (lambda env: None) for action in vm_handlers.QUICK},
           quick_actions=vm_handlers.QUICK, metrics=metrics)
    metrics.register(DeviceCollector(Listing(body)))
    metrics.expect_phases("merge")
    exercise(metrics)
    return metrics


def exercise(metrics: Metrics) -> None:
    """Use every instrument a daemon updates as it works."""
    metrics.request("ping", "success", 0.002)
    metrics.request("ping", "busy", 0.5)
    for phase in PHASES:
        metrics.observe_phase(phase, 1.5)
    metrics.reconnected()


def sample_names(*registries) -> Set[str]:
    """Every sample name a scrape of these registries carries (``_bucket``, ``_total``...)."""
    names: Set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
    return names


def family_names(*registries) -> Set[str]:
    """The metric families, named as a scrape's ``# TYPE`` lines name them."""
    names: Set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names
