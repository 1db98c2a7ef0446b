"""A whole imgstorage cluster on one machine, on the simulated kernel.

Writes one configuration per node, makes the NAS's pool, starts each daemon
as a real process against the real broker, and runs operator commands with
the frontend's configuration.  The demo and the integration tests use it;
an administrator can use it to try imgstorage before touching real disks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence
from urllib.parse import quote

from .config import from_dict
from .errors import ImgStorageError
from .messaging import RpcClient
from .nas.client import NasClient
from .runner import Runner
from .vm.client import VmClient

PYTHON = sys.executable
ENTRY = {
    "nas": "from imgstorage.nas.main import main; main()",
    "vm": "from imgstorage.vm.main import main; main()",
    "rocks": "from imgstorage.frontend.cli import main; main()",
    "sim": "from imgstorage.drivers.sim.cli import main; main()",
}


@contextmanager
def broker_vhost(name: str, user: str = "guest", runner: Optional[Runner] = None) -> Iterator[str]:
    """A fresh virtual host on the local broker for ``user``, deleted afterwards."""
    runner = runner or Runner()
    runner.run(["rabbitmqctl", "-q", "add_vhost", name], check=False)
    runner.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, user, ".*", ".*", ".*"])
    try:
        yield name
    finally:
        runner.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False)


def broker_url(vhost: str, user: str = "guest", password: str = "guest",
               host: str = "127.0.0.1", port: int = 5672) -> str:
    return f"amqp://{user}:{password}@{host}:{port}/{quote(vhost, safe='')}"


class SimCluster:
    """Nodes of one simulated cluster: configs, processes, and the operator's shell."""

    def __init__(self, workdir: Path, broker: str, nas: Sequence[str] = ("nas-0-0",),
                 containers: Sequence[str] = ("vm-container-0-14", "compute-0-3"),
                 pool: str = "tank", node_settings: Optional[Dict[str, dict]] = None,
                 node_env: Optional[Dict[str, Dict[str, str]]] = None, debug: bool = True):
        self.workdir = Path(workdir)
        self.broker = broker
        self.nas = list(nas)
        self.containers = list(containers)
        self.pool = pool
        self.node_settings = node_settings or {}
        self.node_env = node_env or {}     # e.g. a slower simulated merge on one container
        self.debug = debug
        self.sim_root = self.workdir / "sim"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sim_root.mkdir(exist_ok=True)
        for folder in ("db", "log"):         # the registry may be used before any daemon runs
            (self.workdir / folder).mkdir(exist_ok=True)
        for node in self.nas + self.containers:
            self.write_config(node)
        self.write_config("frontend")

    # -- configuration --------------------------------------------------------
    def config_path(self, node: str) -> Path:
        return self.workdir / "etc" / f"{node}.conf"

    def log_path(self, node: str) -> Path:
        return self.workdir / "log" / f"{node}.log"

    def db_path(self, node: str) -> Path:
        return self.workdir / "db" / f"{node}.db"

    def write_config(self, node: str) -> Path:
        cfg = {"name": node, "broker_url": self.broker, "backend": "sim",
               "sim_root": str(self.sim_root), "db": str(self.db_path(node)),
               "frontend_db": str(self.workdir / "db" / "frontend.db"),
               "log_file": str(self.log_path(node)), "img_sync_workers": 4,
               "stream_address": "127.0.0.1", "stream_bind": "127.0.0.1",
               "default_pool": self.pool}
        cfg.update(self.node_settings.get(node, {}))
        from_dict(cfg)  # a typo in a test's settings should fail here, loudly
        path = self.config_path(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # broker passwords
        os.fchmod(fd, 0o600)                # a config an earlier run wrote wider
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(cfg, indent=2) + "\n")
        return path

    def sync_identities(self, nodes: Optional[Sequence[str]] = None) -> None:
        """Give each node its own broker user, as the README tells an operator to.

        ``rocks sync host imgstorage`` makes the users, permissions and queues;
        each node's broker URL, ``admin_users`` and ``nas_users`` then come from
        ``rocks report host imgstorage``, the simulated kernel's settings stay.
        The nodes must be registered on the frontend, and started afterwards.
        """
        nodes = list(nodes) if nodes else self.nas + self.containers
        proc = self.rocks("sync", "host", "imgstorage", *nodes)
        if proc.returncode != 0:
            raise ImgStorageError("rocks sync host imgstorage failed: "
                                  + proc.stderr.decode(errors="replace").strip())
        for node in nodes:
            proc = self.rocks("report", "host", "imgstorage", node)
            if proc.returncode != 0:
                raise ImgStorageError(f"rocks report host imgstorage {node} failed: "
                                      + proc.stderr.decode(errors="replace").strip())
            report = json.loads(proc.stdout)
            settings = self.node_settings.setdefault(node, {})
            for key in ("broker_url", "admin_users", "nas_users"):
                if key in report:
                    settings[key] = report[key]
            self.write_config(node)

    def env(self, node: str = "frontend") -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.node_env.get(node, {}))
        env["IMGSTORAGE_CONF"] = str(self.config_path(node))
        return env

    # -- processes -------------------------------------------------------------
    def role(self, node: str) -> str:
        return "nas" if node in self.nas else "vm"

    def start(self, nodes: Optional[Sequence[str]] = None, wait: float = 30.0) -> None:
        nodes = list(nodes) if nodes else self.nas + self.containers
        for node in nodes:
            if node in self.procs and self.procs[node].poll() is None:
                continue
            self.log_path(node).parent.mkdir(parents=True, exist_ok=True)
            argv = [PYTHON, "-c", ENTRY[self.role(node)]] + (["--debug"] if self.debug else [])
            out = open(self.workdir / "log" / f"{node}.out", "ab")
            self.procs[node] = subprocess.Popen(argv, env=self.env(node), stdout=out,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
            out.close()
        for node in nodes:
            self.wait_ready(node, wait)

    def wait_ready(self, node: str, timeout: float = 30.0) -> None:
        """Until the node answers a ping (its queue exists and it consumes)."""
        deadline = time.monotonic() + timeout
        last: Exception = ImgStorageError("no answer")
        cfg = from_dict(json.loads(self.config_path("frontend").read_text()))
        while time.monotonic() < deadline:
            proc = self.procs.get(node)
            if proc is not None and proc.poll() is not None:
                raise ImgStorageError(f"{node} exited with status {proc.returncode}; see "
                                      f"{self.log_path(node)}: {self.tail(node)}")
            try:
                with RpcClient(cfg) as rpc:
                    client = NasClient if self.role(node) == "nas" else VmClient
                    client(rpc, node).ping(timeout=2)
                return
            except ImgStorageError as exc:
                last = exc
                time.sleep(0.1)
        raise ImgStorageError(f"{node} did not become ready within {timeout:g} s: {last}")

    def tail(self, node: str, lines: int = 5) -> str:
        text = ""
        for path in (self.log_path(node), self.workdir / "log" / f"{node}.out"):
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, node: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Optional[int]:
        proc = self.procs.pop(node, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)

    def stop_all(self) -> None:
        for node in list(self.procs):
            self.stop(node)

    # -- the operator's shell --------------------------------------------------
    def run(self, tool: str, *args: str, input: Optional[bytes] = None, node: str = "frontend",
            timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-c", ENTRY[tool], *args], env=self.env(node),
                              input=input, capture_output=True, timeout=timeout)

    def rocks(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.run("rocks", *args, timeout=timeout)

    def sim(self, *args: str, input: Optional[bytes] = None) -> subprocess.CompletedProcess:
        """imgstorage-sim as run on the node named by ``--host`` (its environment, e.g. a
        slower simulated merge, applies: looking at a device advances its merge)."""
        node = "frontend"
        if "--host" in args:
            host = args[list(args).index("--host") + 1]
            if host in self.nas + self.containers:
                node = host
        return self.run("sim", *args, input=input, node=node)

    def make_pools(self) -> List[str]:
        """The pool on every node: the NAS's store, and each container's local pool."""
        made = []
        for node in self.nas + self.containers:
            proc = self.sim("zpool", "create", "--host", node, self.pool)
            if proc.returncode == 0:
                made.append(node)
        return made
