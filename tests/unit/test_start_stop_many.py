"""``rocks start/stop host vm`` on several VMs: in parallel, each VM's lines, one summary.

No broker: each worker thread gets its own fake connection (as it gets its
own real one), answering by zvol rather than from an ordered script, since
the VMs are worked on in no fixed order.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Dict, List, Optional, Set

import pytest
from click.testing import CliRunner

from imgstorage.drivers.base import DomainInfo
from imgstorage.errors import RemoteError
from imgstorage.frontend import cli, commands_base, parallel

VMS = ["compute-0-14-0", "compute-0-14-1", "compute-0-14-2", "compute-0-3-0", "compute-0-3-1"]
NAS = "nas-0-0"


def container_of(vm: str) -> str:
    return vm.rsplit("-", 1)[0]


class Broker:
    """What the NAS answers, for every connection the command opens."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections: List["Connection"] = []
        self.sent: List[tuple] = []
        self.refuse: Dict[str, str] = {}        # zvol -> the NAS's error

    def __call__(self, config) -> "Connection":  # used as the RpcClient class
        conn = Connection(self)
        with self.lock:
            self.connections.append(conn)
        return conn

    def answer(self, conn: "Connection", node: str, message: Dict[str, Any]) -> Dict[str, Any]:
        with self.lock:
            self.sent.append((node, message["action"], message["zvol"]))
            conn.threads.add(threading.get_ident())
        assert node == NAS
        error = self.refuse.get(message["zvol"])
        if error:
            raise RemoteError(node, message["action"], error)
        if message["action"] == "map_zvol":
            return {"status": "success", "bdev": f"/dev/mapper/{message['zvol']}-snap"}
        return {"status": "success"}

    def actions(self, action: str) -> Set[str]:
        return {zvol for _, act, zvol in self.sent if act == action}


class Connection:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.threads: Set[int] = set()
        self.closed = False

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.closed = True

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        return self.broker.answer(self, node, message)


class Hypervisor:
    """Domains per container, safe to use from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: Dict[str, Dict[str, str]] = {}
        self.calls: List[tuple] = []
        self.bug_on: Optional[str] = None       # a VM whose boot raises something unexpected
        self.hold: Dict[str, threading.Event] = {}  # a VM whose boot waits for its event

    def start(self, host: str, vm: str, disk: str, memory_mb: int, cpus: int) -> None:
        if vm in self.hold:
            assert self.hold[vm].wait(10), f"the boot of {vm} was never let go"
        with self.lock:
            self.calls.append(("start", vm))
            if vm == self.bug_on:
                raise RuntimeError("unexpected")
            self.states.setdefault(host, {})[vm] = "running"

    def stop(self, host: str, vm: str) -> None:
        with self.lock:
            self.calls.append(("stop", vm))
            self.states[host][vm] = "shut off"

    def domains(self, host: str) -> List[DomainInfo]:
        with self.lock:
            return [DomainInfo(n, s) for n, s in self.states.get(host, {}).items()]

    def running(self) -> Set[str]:
        return {vm for doms in self.states.values() for vm, s in doms.items() if s == "running"}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    conf = tmp_path / "imgstorage.conf"
    conf.write_text(json.dumps({"frontend_db": str(tmp_path / "frontend.db"), "timeout": 7}))
    monkeypatch.setenv("IMGSTORAGE_CONF", str(conf))
    broker, hyp = Broker(), Hypervisor()
    monkeypatch.setattr(commands_base, "RpcClient", broker)
    monkeypatch.setattr(commands_base, "hypervisor", lambda config: hyp)
    for words in (["add", "host", NAS, "appliance=nas"],
                  ["add", "host", "compute-0-14", "appliance=vm-container"],
                  ["add", "host", "compute-0-3", "appliance=vm-container"],
                  ["set", "host", "attr", "compute-0-14", "img_sync", "true"],
                  ["set", "host", "attr", "compute-0-3", "img_sync", "true"]):
        assert run(*words).exit_code == 0
    for vm in VMS:
        assert run("add", "host", "vm", container_of(vm), "compute").exit_code == 0
        assert run("set", "host", "vm", "nas", vm, f"nas={NAS}", "zpool=tank").exit_code == 0
    broker.sent.clear()
    broker.connections.clear()
    return broker, hyp


def run(*words: str):
    try:
        runner = CliRunner(mix_stderr=False)        # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(cli.cli, list(words))


def mapped(vm: str) -> str:
    return f"{NAS}:{vm}-vol mapped to {container_of(vm)}:/dev/mapper/{vm}-vol-snap"


def stopped(vm: str) -> List[str]:
    return [f"stopped VM {vm} on physical node {container_of(vm)}",
            f"{NAS}:{vm}-vol unmapped from {container_of(vm)}"]


# ------------------------------------------------------------------- start
def test_start_many_prints_each_vm_and_a_summary(cluster):
    broker, hyp = cluster
    res = run("start", "host", "vm", *VMS, "parallel=2")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert res.stderr == ""                         # no terminal: no progress noise
    lines = res.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(mapped(vm) for vm in VMS)
    assert lines[-1] == "started 5 of 5 VMs"
    assert hyp.running() == set(VMS)
    # at most two workers, each with its own connection (opened at its first request),
    # used by that thread only, closed at the end
    assert 1 <= len(broker.connections) <= 2
    assert all(len(c.threads) <= 1 and c.closed for c in broker.connections)


def test_one_failure_does_not_stop_the_others_and_fails_the_command(cluster):
    broker, hyp = cluster
    broker.refuse["compute-0-14-1-vol"] = "ZVol compute-0-14-1-vol is busy"
    res = run("start", "host", "vm", *VMS, "parallel=3")
    assert res.exit_code == 1
    assert sorted(res.stdout.splitlines()) == sorted(mapped(vm) for vm in VMS
                                                     if vm != "compute-0-14-1")
    assert res.stderr.splitlines() == [
        "error - compute-0-14-1: ZVol compute-0-14-1-vol is busy",
        "error - started 4 of 5 VMs, 1 failed: compute-0-14-1"]
    assert hyp.running() == set(VMS) - {"compute-0-14-1"}


def test_failures_are_listed_in_command_line_order(cluster):
    broker, hyp = cluster
    hyp.states["compute-0-3"] = {"compute-0-3-1": "running"}
    broker.refuse["compute-0-14-0-vol"] = "no space left"
    res = run("start", "host", "vm", "compute-0-3-1", "compute-0-14-2", "compute-0-14-0")
    assert res.exit_code == 1
    assert res.stdout.splitlines() == [mapped("compute-0-14-2")]
    errors = res.stderr.splitlines()
    assert sorted(errors[:-1]) == [
        "error - compute-0-14-0: no space left",
        "error - compute-0-3-1: VM compute-0-3-1 is already running on compute-0-3"]
    assert errors[-1] == "error - started 1 of 3 VMs, 2 failed: compute-0-3-1, compute-0-14-0"


def test_a_vm_that_cannot_be_planned_fails_alone(cluster):
    run("set", "host", "attr", "compute-0-3", "vm_container_zpool", "bad pool")
    res = run("start", "host", "vm", *VMS)
    assert res.exit_code == 1
    errors = res.stderr.splitlines()
    assert len(errors) == 3
    assert all(e.startswith("error - compute-0-3-") and "vm_container_zpool" in e
               for e in errors[:2])
    assert errors[-1] == "error - started 3 of 5 VMs, 2 failed: compute-0-3-0, compute-0-3-1"
    assert cluster[0].actions("map_zvol") == {f"{vm}-vol" for vm in VMS[:3]}


def test_a_bug_in_one_vm_is_that_vms_failure(cluster):
    broker, hyp = cluster
    hyp.bug_on = "compute-0-14-2"
    res = run("start", "host", "vm", *VMS)
    assert res.exit_code == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        "error - compute-0-14-2: internal error: RuntimeError: unexpected",
        "error - started 4 of 5 VMs, 1 failed: compute-0-14-2"]
    assert "compute-0-14-2-vol" in broker.actions("unmap_zvol")     # its mapping undone


def test_every_vm_failing_fails_the_command(cluster):
    broker, _ = cluster
    for vm in VMS:
        broker.refuse[f"{vm}-vol"] = "NAS is read-only"
    res = run("start", "host", "vm", *VMS)
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == "error - started 0 of 5 VMs, 5 failed: " + \
        ", ".join(VMS)


# -------------------------------------------------------------------- stop
def test_stop_many_keeps_each_vms_lines_together(cluster):
    broker, hyp = cluster
    for vm in VMS:
        hyp.states.setdefault(container_of(vm), {})[vm] = "running"
    res = run("stop", "host", "vm", *VMS, "parallel=4")
    assert res.exit_code == 0 and res.stderr == ""
    lines = res.stdout.splitlines()
    assert lines[-1] == "stopped 5 of 5 VMs"
    pairs = [lines[i:i + 2] for i in range(0, len(lines) - 1, 2)]
    assert sorted(pairs) == sorted(stopped(vm) for vm in VMS)
    assert hyp.running() == set()
    assert broker.actions("unmap_zvol") == {f"{vm}-vol" for vm in VMS}


def test_stop_many_with_a_failure(cluster):
    broker, hyp = cluster
    for vm in VMS:
        hyp.states.setdefault(container_of(vm), {})[vm] = "running"
    broker.refuse["compute-0-3-0-vol"] = "zvol compute-0-3-0-vol is busy"
    res = run("stop", "host", "vm", *VMS, "terminate=true")
    assert res.exit_code == 1
    assert sorted(res.stdout.splitlines()) == sorted(
        f"{NAS}:{vm}-vol unmapped from {container_of(vm)}" for vm in VMS if vm != "compute-0-3-0")
    assert res.stderr.splitlines() == [
        "error - compute-0-3-0: zvol compute-0-3-0-vol is busy",
        "error - stopped 4 of 5 VMs, 1 failed: compute-0-3-0"]
    assert ("stop", "compute-0-14-0") not in hyp.calls          # terminate: not asked


# ---------------------------------------------------------- bad parameters
@pytest.mark.parametrize("words, message", [
    (["parallel=0"], "invalid parallel 0: must be at least 1"),
    (["parallel=abc"], "invalid parallel 'abc': expected a whole number"),
    (["parallel="], "invalid parallel: a value is required"),
    (["parallel=-2"], "invalid parallel -2: must be at least 1"),
    (["nosuch-0-0"], "unknown host nosuch-0-0"),
    (["nosuch-0-0", "nosuch-0-1"], "unknown host nosuch-0-0; unknown host nosuch-0-1"),
    ([NAS], f"node {NAS} is not a virtual node"),
])
@pytest.mark.parametrize("verb", ["start", "stop"])
def test_bad_input_is_one_line_and_touches_nothing(cluster, verb, words, message):
    broker, hyp = cluster
    res = run(verb, "host", "vm", *VMS, *words)
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == f"error - {message}\n"
    assert broker.sent == [] and broker.connections == []
    assert hyp.calls == []


def test_a_vm_named_twice_is_worked_on_once(cluster):
    _, hyp = cluster
    res = run("start", "host", "vm", VMS[0], VMS[0])
    assert (res.exit_code, res.stdout) == (0, mapped(VMS[0]) + "\n")    # the one-VM output
    assert hyp.calls == [("start", VMS[0])]


def test_on_a_terminal_a_progress_bar_beside_the_lines(cluster, monkeypatch):
    monkeypatch.setattr(parallel, "terminal_wanted", lambda stream=None: True)
    res = run("start", "host", "vm", *VMS)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(mapped(vm) for vm in VMS)
    assert lines[-1] == "started 5 of 5 VMs"
    assert "starting VMs" in res.stderr


def test_no_progress_bar_with_debug_output(cluster, monkeypatch):
    monkeypatch.setattr(parallel, "terminal_wanted", lambda stream=None: True)
    res = run("--debug", "start", "host", "vm", *VMS)
    assert res.exit_code == 0
    assert "starting VMs" not in res.stderr


def test_help_explains_parallel_and_the_summary(cluster):
    for verb, done in (("start", "started"), ("stop", "stopped")):
        out = run(verb, "host", "vm", "--help").stdout
        assert "parallel=N" in out and "default 8" in out
        assert f"counts the VMs {done}" in " ".join(out.split())


def test_ctrl_c_starts_no_more_vms_and_says_how_many_were_not_tried(cluster, monkeypatch):
    _, hyp = cluster
    advance = parallel.Progress.advance
    calls: List[bool] = []

    def interrupted_once(self, ok: bool) -> None:     # Ctrl-C as the first VM is reported
        calls.append(ok)
        advance(self, ok)
        if len(calls) == 1:
            raise KeyboardInterrupt
    # the VMs after the first boot only once the command is draining after the Ctrl-C,
    # so the one worker cannot have raced through them all before it
    gate = threading.Event()
    hyp.hold = {vm: gate for vm in VMS[1:]}
    refresh = parallel.Progress.refresh

    def refreshed(self) -> None:                       # called while waiting for workers
        refresh(self)
        if calls:
            gate.set()
    monkeypatch.setattr(parallel.Progress, "advance", interrupted_once)
    monkeypatch.setattr(parallel.Progress, "refresh", refreshed)
    res = run("start", "host", "vm", *VMS, "parallel=1")
    assert res.exit_code == 130
    errors = [line for line in res.stderr.splitlines() if line]   # click adds a newline
    assert errors[-1] == "error - interrupted"
    started = len(res.stdout.splitlines())
    assert started in (1, 2)          # the second VM, if already taken, is let finish
    assert errors[:-1] == [f"started {started} of 5 VMs, {5 - started} not tried (interrupted)"]
    assert hyp.calls == [("start", vm) for vm in VMS[:started]]
