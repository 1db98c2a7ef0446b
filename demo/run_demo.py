#!/usr/bin/env python3
"""The imgstorage demo: a NAS and two VM containers on the simulated kernel.

Starts the three daemons as real processes against the local RabbitMQ broker
(in their own vhost), then replays the operator's sessions of the manual with
the real commands, printing each command and what it printed.  The bytes a VM
writes are real: at the end they are read back from the NAS's zvol.

Run it through scripts/demo, which installs what it needs first.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

from imgstorage.simcluster import SimCluster, broker_url, broker_vhost

ROOT = Path(__file__).resolve().parent.parent


class Demo:
    def __init__(self, cluster: SimCluster):
        self.c = cluster
        self.failures = 0

    def say(self, text: str) -> None:
        print(f"\n=== {text}")

    def shell(self, tool: str, *args: str, expect_ok: bool = True, input: bytes = None) -> str:
        shown = {"rocks": "rocks", "sim": "imgstorage-sim"}[tool]
        print(f"# {shown} {' '.join(_quote(a) for a in args)}")
        proc = self.c.run(tool, *args, input=input)
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if out.strip():
            print(out.rstrip("\n"))
        if err.strip():
            print(err.rstrip("\n"))
        if (proc.returncode == 0) != expect_ok:
            self.failures += 1
            print(f"!!! unexpected exit status {proc.returncode}")
        return out

    def rocks(self, *args: str, expect_ok: bool = True) -> str:
        return self.shell("rocks", *args, expect_ok=expect_ok)

    def scrape(self, node: str, *prefixes: str) -> None:
        """What Prometheus reads from ``node``'s metrics endpoint: the lines of interest."""
        url = f"http://127.0.0.1:{self.c.node_settings[node]['metrics_port']}/metrics"
        print(f"# curl -s {url} | grep -E '^({'|'.join(prefixes)})'")
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                text = answer.read().decode()
        except OSError as exc:
            self.failures += 1
            print(f"!!! no answer from {url}: {exc}")
            return
        for line in text.splitlines():
            if line.startswith(prefixes):
                print(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote(arg: str) -> str:
    return f'"{arg}"' if (" " in arg or not arg) else arg


def wait_state(demo: Demo, zvol: str, states, timeout: float = 120.0) -> str:
    """Poll the storagemap (quietly) until ``zvol`` reaches one of ``states``."""
    import json
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        proc = demo.c.rocks("list", "host", "storagemap", "nas-0-0", "output-format=json")
        if proc.returncode == 0:
            rows = {r["zvol"]: r for r in json.loads(proc.stdout)}
            state = rows.get(zvol, {}).get("state", "gone")
            if state in states:
                return state
        time.sleep(0.5)
    demo.failures += 1
    print(f"!!! {zvol} did not reach {states} within {timeout:g} s (it is {state})")
    return state


def wait_dev(demo: Demo, host: str, zvol: str, status: str, timeout: float = 120.0) -> None:
    import json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = demo.c.rocks("list", "host", "storagedev", host, "output-format=json")
        if proc.returncode == 0 and any(d.get("zvol") == zvol and d.get("status") == status
                                        for d in json.loads(proc.stdout)):
            return
        time.sleep(0.5)
    demo.failures += 1
    print(f"!!! {zvol} on {host} never reached {status}")


def check_bytes(demo: Demo, zvol: str, offset: int, payload: bytes) -> None:
    back = demo.shell("sim", "read", "--host", "nas-0-0", f"/dev/zvol/tank/{zvol}",
                      "--offset", str(offset), "--length", str(len(payload)))
    if back.encode() != payload:
        demo.failures += 1
        print("!!! the NAS does not hold what the VM wrote")
    else:
        print("(the NAS holds exactly the bytes the VM wrote)")


def run(demo: Demo) -> None:
    d = demo
    d.say("The cluster: one NAS with pool 'tank', two VM containers with local pools")
    d.rocks("add", "host", "nas-0-0", "appliance=nas")
    d.rocks("add", "host", "vm-container-0-14", "appliance=vm-container")
    d.rocks("add", "host", "compute-0-3", "appliance=vm-container")
    d.rocks("set", "host", "attr", "nas-0-0", "img_zpools", "value=tank")
    d.rocks("list", "host")
    d.shell("sim", "zfs", "list", "--host", "nas-0-0")

    d.say("Enable a remote virtual disk for a VM (direct iSCSI mode: img_sync is false)")
    d.rocks("add", "host", "vm", "vm-container-0-14", "compute", "disksize=36")
    d.rocks("add", "host", "vm", "vm-container-0-14", "compute", "disksize=10")
    d.rocks("set", "host", "vm", "nas", "compute-0-14-0", "nas=nas-0-0", "zpool=tank")
    d.rocks("set", "host", "vm", "nas", "compute-0-14-1", "nas=nas-0-0")
    d.rocks("list", "host", "vm", "nas")
    out = d.rocks("start", "host", "vm", "compute-0-14-1")
    bdev = out.strip().rsplit(":", 1)[-1] if "mapped to" in out else "/dev/sdb"
    d.rocks("list", "host", "vm")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    d.rocks("list", "host", "storagedev", "vm-container-0-14")
    payload = f"written by compute-0-14-1 at {time.strftime('%H:%M:%S')}\n".encode()
    d.shell("sim", "write", "--host", "vm-container-0-14", bdev, "--offset", "1048576",
            input=payload)
    d.rocks("stop", "host", "vm", "compute-0-14-1")
    check_bytes(d, "compute-0-14-1-vol", 1048576, payload)

    d.say("VM boot workflow with image sync (img_sync true on the container)")
    d.rocks("set", "host", "attr", "vm-container-0-14", "img_sync", "true")
    d.rocks("start", "host", "vm", "compute-0-14-0")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    d.rocks("list", "host", "storagedev", "vm-container-0-14")
    early = b"written while the VM ran on the NAS disk\n"
    d.shell("sim", "write", "--host", "vm-container-0-14", "/dev/mapper/compute-0-14-0-vol-snap",
            "--offset", "4096", input=early)
    wait_dev(d, "vm-container-0-14", "compute-0-14-0-vol", "linear")
    print("(the copy arrived, the temp writes were merged, the VM now runs from its local copy)")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    d.rocks("list", "host", "storagedev", "vm-container-0-14")
    d.shell("sim", "zfs", "list", "--host", "vm-container-0-14")
    d.say("What Prometheus scrapes meanwhile (metrics_port): the zvol's state, its recovery "
          "point, the phases timed so far")
    d.scrape("nas-0-0", "imgstorage_zvol_state{", "imgstorage_zvol_recovery_point",
             "imgstorage_zvol_sync_frequency", "imgstorage_phase_duration_seconds_count")
    d.scrape("vm-container-0-14", "imgstorage_devices", "imgstorage_phase_duration_seconds_count")
    late = b"written after the switch to the local copy\n"
    d.shell("sim", "write", "--host", "vm-container-0-14", "/dev/mapper/compute-0-14-0-vol-snap",
            "--offset", "8192", input=late)
    d.rocks("stop", "host", "vm", "compute-0-14-0")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    wait_state(d, "compute-0-14-0-vol", {"unmapped"})
    d.rocks("list", "host", "storagemap", "nas-0-0")
    check_bytes(d, "compute-0-14-0-vol", 4096, early)
    check_bytes(d, "compute-0-14-0-vol", 8192, late)
    d.shell("sim", "zfs", "list", "--host", "vm-container-0-14")

    d.say("Manual storage maps")
    d.rocks("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "compute-0-3", "10",
            "img_sync=true", "remotepool=tank")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    wait_state(d, "vol1", {"mapped"})
    wait_dev(d, "compute-0-3", "vol1", "linear")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    d.rocks("list", "host", "storagedev", "compute-0-3")
    d.rocks("add", "host", "storagemap", "nas-0-0", "tank", "vol1", "vm-container-0-14", "10",
            expect_ok=False)
    d.rocks("remove", "host", "storageimg", "nas-0-0", "tank", "vol1", expect_ok=False)
    d.rocks("remove", "host", "storagemap", "nas-0-0", "vol1")
    d.rocks("list", "host", "storagemap", "nas-0-0")
    wait_state(d, "vol1", {"unmapped"})
    d.rocks("list", "host", "storagemap", "nas-0-0")
    d.rocks("remove", "host", "storageimg", "nas-0-0", "tank", "vol1")
    d.rocks("list", "host", "storagemap", "nas-0-0")

    d.say("Attributes")
    d.rocks("set", "host", "storageattr", "nas-0-0", "uploadspeed", "50000000")
    d.rocks("list", "host", "storageattr", "nas-0-0")
    d.rocks("set", "host", "zvolattr", "nas-0-0", "compute-0-14-1-vol", "frequency", "600")
    d.rocks("list", "host", "zvolattr", "nas-0-0", "compute-0-14-1-vol")

    d.say("Bad input gets one clear line and changes nothing")
    d.rocks("add", "host", "storagemap", "nas-0-0", "tank", "../etc", "compute-0-3", "10",
            expect_ok=False)
    d.rocks("add", "host", "storagemap", "nas-0-0", "tank", "vol2", "compute-0-3", "-5",
            expect_ok=False)
    d.rocks("add", "host", "storagemap", "nas-0-0", "tank", "vol2", "no-such-host", "5",
            expect_ok=False)
    d.rocks("add", "host", "storagemap", "nas-0-0", "nopool", "vol2", "compute-0-3", "5",
            expect_ok=False)
    d.rocks("list", "host", "storagemap", "nas-0-9", expect_ok=False)
    d.rocks("list", "host", "storagemap", "nas-0-0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "demo-run"),
                        help="where configurations, databases, logs and simulated disks go")
    parser.add_argument("--vhost", default="imgstorage-demo", help="broker virtual host to use")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    print(f"imgstorage demo: work folder {workdir} (logs in {workdir / 'log'}), "
          f"broker vhost {args.vhost}")
    with broker_vhost(args.vhost):
        nodes = ("nas-0-0", "vm-container-0-14", "compute-0-3")
        cluster = SimCluster(workdir, broker_url(args.vhost), node_settings={
            node: {"metrics_port": free_port()} for node in nodes})
        cluster.make_pools()
        cluster.start()
        demo = Demo(cluster)
        try:
            run(demo)
        finally:
            cluster.stop_all()
    if demo.failures:
        print(f"\ndemo finished with {demo.failures} unexpected result(s); see {workdir / 'log'}")
        return 1
    print("\ndemo finished: every command behaved as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
