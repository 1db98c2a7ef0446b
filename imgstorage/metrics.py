"""A daemon's Prometheus metrics: what it did, and where each of its zvols is.

What happened is counted as it happens (requests, failed transfers, broker
reconnections) and timed (requests, the phases of a zvol's life, from the
state transitions: rowstore.StateStore.on_transition).  Where each zvol is
right now is never kept a second time: the collectors read it at scrape time
from the rows the node's own listing is made of (``list_zvols`` on a NAS,
``list_dev`` on a container), so a scrape and a listing cannot disagree.

Each daemon has a registry of its own, not the library's global one: tests
run several daemons' objects in one process.  Labels are bounded: zvol and
host names (bounded by the NAS's pools), actions a node serves, error codes
of errors.py, states and phases; never a message id, an error text, or any
string a caller makes up.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping,
                    Optional, Tuple)

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from .errors import INTERNAL, TOO_LARGE, UNKNOWN_ACTION, ImgStorageError
from .rowstore import StateStore

log = logging.getLogger(__name__)

# A request waits on the kernel or on another node: milliseconds to minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
# A phase lasts from a second (a map) to hours (the copy of a large disk).
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                 3600.0, 7200.0, 21600.0)

#: the phases of a zvol's life that are timed: nas/states.py and vm/states.py name the
#: transitions that end them, nas/handlers.py times the two that are requests
PHASES = ("map", "copy", "merge", "map_to_local", "pull", "final_pull", "unmap")
UNKNOWN = "unknown"                # the action label of a request no handler serves
TRANSFER_KINDS = ("upload", "pull", "final_pull", "release")
# outcomes of requests that never reached a handler
DUPLICATE, EXPIRED = "duplicate", "expired"

# The _created series of every counter and histogram double what a scrape carries
# and no dashboard here reads them.
if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()


def _error_codes() -> FrozenSet[str]:
    """Every code an error reply of ours may carry (errors.py), and nothing else."""
    codes, todo = set(), [ImgStorageError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(codes | {INTERNAL, UNKNOWN_ACTION, TOO_LARGE})


@dataclass
class Pool:
    """A pool of workers: its size, and how many jobs it holds now (running or queued)."""
    name: str
    size: int
    held: Callable[[], int]


class Metrics:
    """One daemon's registry, the instruments its code updates, and its endpoint."""

    def __init__(self, node: str, role: str) -> None:
        self.node, self.role = node, role
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.outcomes = _error_codes() | {"success", DUPLICATE, EXPIRED}
        self.requests = Counter(
            "imgstorage_requests", "Requests this node received, by action and outcome "
            "(success, or the error code of its answer; duplicate: a copy of a request "
            "already run; expired: its caller had stopped waiting).", ["action", "outcome"],
            registry=registry)
        self.request_seconds = Histogram(
            "imgstorage_request_duration_seconds", "Seconds from a request's arrival to its "
            "answer, by action.", ["action"], buckets=REQUEST_BUCKETS, registry=registry)
        self.phase_seconds = Histogram(
            "imgstorage_phase_duration_seconds", "Seconds each phase of a zvol's life took "
            f"({', '.join(PHASES)}), once it ended well.",
            ["phase"], buckets=PHASE_BUCKETS, registry=registry)
        self.transfer_failures = Counter(
            "imgstorage_transfer_failures", "Transfers that failed (each retry that failed "
            "too), by kind: upload (NAS->VM copy), pull, final_pull, release.", ["kind"],
            registry=registry)
        self.reconnections = Counter(
            "imgstorage_broker_reconnections", "Times the daemon connected to the message "
            "broker again after losing it.", registry=registry)
        self.scrape_errors = Counter(
            "imgstorage_scrape_errors", "Scrapes whose zvol figures could not be read (the "
            "log says why); they carried none.", registry=registry)
        self.pools: List[Pool] = []
        self.broker_connected: Callable[[], bool] = lambda: False
        self._server: Optional[Any] = None
        self._thread: Optional[threading.Thread] = None
        registry.register(_NodeCollector(self))

    # -- what the code reports ----------------------------------------------------
    def expect_requests(self, actions: Iterable[str]) -> None:
        """Series at 0 for the actions served, so a rate is defined before the first.

        Their latency histograms appear with their first request instead: at
        seventeen series each, the idle ones would be half of a NAS's scrape.
        """
        for action in actions:
            self.requests.labels(action, "success")

    def request(self, action: str, outcome: str, seconds: Optional[float] = None) -> None:
        """A request answered (``seconds`` after it arrived) or turned away (None)."""
        if outcome not in self.outcomes:
            outcome = "error"
        self.requests.labels(action, outcome).inc()
        if seconds is not None:
            self.request_seconds.labels(action).observe(max(0.0, seconds))

    def expect_phases(self, *phases: str) -> None:
        """Series at 0 for the phases this daemon times, before the first ends."""
        for phase in phases:
            self.phase_seconds.labels(phase)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase_seconds.labels(phase).observe(max(0.0, seconds))

    def time_phases(self, store: StateStore,
                    table: Mapping[Tuple[Enum, Enum], Tuple[str, Optional[str]]]) -> None:
        """Time the phases ``table`` names (states.PHASES) from ``store``'s transitions."""
        phases = {(state.value, event.value): entry for (state, event), entry in table.items()}
        self.expect_phases(*{phase for phase, _column in phases.values()})

        def observe(zvol: str, event: Enum, old: str, row: Any, since: float) -> None:
            entry = phases.get((old, event.value))
            if entry is None or row is None:
                return
            phase, column = entry
            if column is None:
                self.observe_phase(phase, since)
                return
            began = getattr(row, column, None)
            if began is not None:
                self.observe_phase(phase, time.time() - began)
        store.on_transition = observe

    def transfer_failed(self, kind: str) -> None:
        self.transfer_failures.labels(kind if kind in TRANSFER_KINDS else "other").inc()

    def expect_transfers(self) -> None:
        for kind in TRANSFER_KINDS:
            self.transfer_failures.labels(kind)

    def reconnected(self) -> None:
        self.reconnections.inc()

    def add_pool(self, name: str, size: int, held: Callable[[], int]) -> None:
        self.pools.append(Pool(name, size, held))

    def register(self, collector: "ZvolCollector") -> None:
        """A collector of the node's zvols, read at each scrape."""
        collector.errors = self.scrape_errors
        self.registry.register(collector)

    # -- the endpoint -----------------------------------------------------------
    def listen(self, port: Optional[int], bind: str = "127.0.0.1") -> Optional[Tuple[str, int]]:
        """Serve the metrics over HTTP on ``bind``:``port`` (None: no endpoint).

        Called before the daemon does anything else, so a port in use stops it
        with one line before it has recovered or touched a zvol.
        """
        if port is None:
            return None
        try:
            server, thread = prometheus_client.start_http_server(port, addr=bind,
                                                                 registry=self.registry)
        except OSError as exc:
            raise ImgStorageError(f"cannot serve metrics on {bind} port {port} (metrics_port, "
                                  f"metrics_bind): {exc.strerror or exc}") from None
        self._server, self._thread = server, thread
        thread.name = "metrics"
        address = server.server_address
        log.info("serving metrics on http://%s:%d/metrics", bind, address[1])
        return bind, address[1]

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def exposition(self) -> bytes:
        """What a scrape gets, in the text format (tests, benchmarks)."""
        return prometheus_client.generate_latest(self.registry)


def _gauge(name: str, doc: str, labels: Tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _NodeCollector:
    """The node itself: who it is, its worker pools, its broker connection."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> List[Metric]:
        return []           # nothing read until a scrape asks

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        info = _gauge("imgstorage_node_info", "The node's name and role (nas or vm); always 1.",
                      ("node", "role"))
        info.add_metric([m.node, m.role], 1)
        yield info
        size = _gauge("imgstorage_worker_pool_size", "Workers of each pool.", ("pool",))
        busy = _gauge("imgstorage_worker_pool_busy", "Workers of each pool at work now.",
                      ("pool",))
        queued = _gauge("imgstorage_worker_pool_queued", "Jobs of each pool waiting for a "
                        "worker.", ("pool",))
        for pool in m.pools:
            held = pool.held()
            size.add_metric([pool.name], pool.size)
            busy.add_metric([pool.name], min(held, pool.size))
            queued.add_metric([pool.name], max(0, held - pool.size))
        yield from (size, busy, queued)
        connected = _gauge("imgstorage_broker_connected", "1 while the daemon consumes its "
                           "queue on a message broker, else 0.")
        connected.add_metric([], 1 if m.broker_connected() else 0)
        yield connected


class ZvolCollector:
    """Figures of the node's zvols, made at each scrape from its listing."""

    errors: Optional[Counter] = None

    def describe(self) -> List[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            families = self.families(time.time())
        except Exception as exc:  # a scrape must answer; the log keeps why it had no zvols
            log.warning("metrics: could not read the zvols: %s", exc,
                        exc_info=not isinstance(exc, ImgStorageError))
            if self.errors is not None:
                self.errors.inc()
            return
        yield from families

    def families(self, now: float) -> List[Metric]:
        raise NotImplementedError


class NasCollector(ZvolCollector):
    """A NAS's zvols: state, transfers, pulls, recovery point, failures."""

    def __init__(self, service: Any) -> None:     # nas.service.NasService
        self.service = service

    def families(self, now: float) -> List[Metric]:
        rows = self.service.list_zvols(detail=True)
        defaults = self.service.store.attrs()
        zvol = ("zvol",)
        state = _gauge("imgstorage_zvol_state", "1 for each zvol, labelled with its state "
                       "(the life-cycle state of imgstorage/nas/states.py) and the host it "
                       "is mapped to.", ("zvol", "state", "host"))
        since = _gauge("imgstorage_zvol_state_since_timestamp_seconds", "When the zvol "
                       "entered its state (epoch seconds).", ("zvol", "state"))
        size = _gauge("imgstorage_zvol_size_bytes", "The zvol's size.", zvol)
        done = _gauge("imgstorage_zvol_transfer_bytes", "Bytes the running transfer has "
                      "moved, by kind (upload, pull, final_pull).", ("zvol", "kind"))
        total = _gauge("imgstorage_zvol_transfer_estimated_bytes", "The running transfer's "
                       "estimated stream size.", ("zvol", "kind"))
        rate = _gauge("imgstorage_zvol_transfer_rate_bytes_per_second", "The running "
                      "transfer's speed over the last seconds.", ("zvol", "kind"))
        pulled = _gauge("imgstorage_zvol_last_pull_timestamp_seconds", "When the last pull "
                        "from the container arrived, or the container's copy took over "
                        "(epoch seconds).", zvol)
        point = _gauge("imgstorage_zvol_recovery_point_timestamp_seconds", "While a container "
                       "holds writes the NAS lacks: every write before this moment is on the "
                       "NAS (epoch seconds).", zvol)
        age = _gauge("imgstorage_zvol_recovery_point_age_seconds", "How old the recovery point "
                     "is: the writes of these last seconds exist only on the container.", zvol)
        frequency = _gauge("imgstorage_zvol_sync_frequency_seconds", "Seconds between "
                           "periodic pulls of a zvol that runs from a container's copy (its "
                           "own frequency, else the NAS's, else 300).", zvol)
        nextsync = _gauge("imgstorage_zvol_next_sync_timestamp_seconds", "When the next "
                          "periodic pull is due (epoch seconds).", zvol)
        failures = _gauge("imgstorage_zvol_consecutive_failures", "Times in a row the zvol's "
                          "transfer failed (0 once one succeeds).", zvol)
        retry = _gauge("imgstorage_zvol_retry_timestamp_seconds", "When a failed transfer is "
                       "tried again (epoch seconds).", zvol)
        for row in rows:
            name, lifecycle = row["zvol"], row["lifecycle"]
            state.add_metric([name, lifecycle, row.get("remotehost", "")], 1)
            if row.get("since") is not None:
                since.add_metric([name, lifecycle], row["since"])
            if row.get("size_bytes") is not None:
                size.add_metric([name], row["size_bytes"])
            transfer = row.get("transfer")
            if transfer:
                labels = [name, transfer["kind"]]
                done.add_metric(labels, transfer["done"])
                if transfer["total"] is not None:
                    total.add_metric(labels, transfer["total"])
                rate.add_metric(labels, row.get("rate", 0.0))
            if row.get("last_pull_at") is not None:
                pulled.add_metric([name], row["last_pull_at"])
            if row.get("recovery_point") is not None:
                point.add_metric([name], row["recovery_point"])
                age.add_metric([name], max(0.0, now - row["recovery_point"]))
                own = row.get("frequency")
                frequency.add_metric([name], own if own else self.service.sync.frequency(
                    name, attrs=None, defaults=defaults))
            if lifecycle in ("local", "pulling") and row.get("nextsync") is not None:
                nextsync.add_metric([name], row["nextsync"])
            if row.get("remotehost") or row.get("failures"):     # idle zvols: none to say
                failures.add_metric([name], row.get("failures", 0))
            if row.get("retry_at") is not None:
                retry.add_metric([name], row["retry_at"])
        return [state, since, size, done, total, rate, pulled, point, age, frequency,
                nextsync, failures, retry]


class DeviceCollector(ZvolCollector):
    """A container's devices: how many by status, their states, how far each merge is."""

    def __init__(self, service: Any) -> None:     # vm.service.VmService (its list_dev)
        self.service = service

    def families(self, now: float) -> List[Metric]:
        body: Dict[str, Dict[str, Any]] = self.service.list_dev()
        count = _gauge("imgstorage_devices", "Devices by status: snapshot (running on the NAS "
                       "disk while the copy comes), snapshot-merge, linear (local), iscsi "
                       "(direct), kept, broken.", ("status",))
        state = _gauge("imgstorage_device_state", "1 for each zvol here, labelled with its "
                       "state (imgstorage/vm/states.py) and its device's status.",
                       ("zvol", "state", "status"))
        merge = _gauge("imgstorage_device_merge_progress_ratio", "How much of the merge of "
                       "the VM's writes into the local copy is done, 0 to 1.", ("zvol",))
        statuses: Dict[str, int] = {}
        for entry in body.values():
            status = str(entry.get("status") or UNKNOWN)
            statuses[status] = statuses.get(status, 0) + 1
            if not entry.get("zvol"):
                continue            # an iSCSI disk of no zvol of ours: counted only
            state.add_metric([entry["zvol"], str(entry.get("state") or UNKNOWN), status], 1)
            if entry.get("synced_percent") is not None:
                merge.add_metric([entry["zvol"]], entry["synced_percent"] / 100.0)
        for status, n in sorted(statuses.items()):
            count.add_metric([status], n)
        return [count, state, merge]


__all__ = ["Metrics", "NasCollector", "DeviceCollector", "PHASES", "PHASE_BUCKETS",
           "REQUEST_BUCKETS"]
