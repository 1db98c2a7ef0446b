"""A two-guest imgstorage cluster on real kernels: a NAS and a VM container under QEMU.

Each guest boots Debian's stock kernel from the cached image (see
build_image.py) with a fresh sparse disk for its zpool, and gets two NICs:

* qemu's user network, through which it reaches the host's RabbitMQ at
  10.0.2.2:5672 and through which the runner reaches the guest's test agent
  (a port forward bound to 127.0.0.1 only);
* the cluster's own wire, a ``-netdev socket`` pair on 127.0.0.1 between the
  two qemu processes: iSCSI and the zfs streams travel there and nowhere else.

The frontend stays on the host: ``rocks`` with a frontend configuration, as
an operator would run it.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
PYTHON = sys.executable
ROCKS = "from imgstorage.frontend.cli import main; main()"

NAS = "nas-0-0"
CONTAINER = "vm-container-0-14"
POOL = "tank"
NODES = {NAS: ("nas", "10.77.0.1", 1), CONTAINER: ("vm", "10.77.0.2", 2)}
DAEMON = {"nas": "img-storage-nas", "vm": "img-storage-vm"}
TRACE = os.environ.get("IMGSTORAGE_KERNEL_TRACE") == "1"   # each guest call and its time


class GuestError(Exception):
    pass


def _die_with_parent() -> None:
    """In the qemu child: be killed when the runner dies, however it dies."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, without connecting to it.

    A connection would be taken by qemu's socket netdev as its peer.
    """
    want = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


class Guest:
    def __init__(self, name: str, workdir: Path, image: Path, *, accel: str, smp: int,
                 memory: int):
        self.name = name
        self.role, self.ip, self.index = NODES[name]
        self.workdir = workdir
        self.image = image
        self.accel = accel
        self.smp = smp
        self.memory = memory
        self.agent_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.console = workdir / f"{name}.console.log"
        self.pool_disk = workdir / f"{name}.pool.img"

    def argv(self, payload: Path, wire: str) -> List[str]:
        i = self.index
        if self.accel == "kvm":
            accel = ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
        else:
            accel = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        cmdline = (f"root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.show_status=0 "
                   f"imgstorage.name={self.name} imgstorage.ip={self.ip} "
                   f"imgstorage.role={self.role}")
        return ["qemu-system-x86_64", *accel, "-smp", str(self.smp), "-m", str(self.memory),
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
                "-append", cmdline,
                "-drive", f"file={self.image / 'root.ext4'},format=raw,if=virtio,snapshot=on",
                "-drive", f"file={self.pool_disk},format=raw,if=virtio,cache=unsafe",
                "-virtfs", f"local,path={payload},mount_tag=payload,security_model=none,"
                           "readonly=on,id=payload",
                "-netdev", f"user,id=user,net=10.0.2.0/24,"
                           f"hostfwd=tcp:127.0.0.1:{self.agent_port}-10.0.2.15:7000",
                "-device", f"virtio-net-pci,netdev=user,mac=52:54:00:00:00:{i:02x}",
                "-netdev", f"socket,id=wire,{wire}",
                "-device", f"virtio-net-pci,netdev=wire,mac=52:54:00:00:01:{i:02x}",
                "-serial", f"file:{self.console}"]

    def start(self, payload: Path, wire: str, pool_size: int) -> None:
        with open(self.pool_disk, "wb") as fh:
            fh.truncate(pool_size)
        out = open(self.workdir / f"{self.name}.qemu.log", "wb")
        self.proc = subprocess.Popen(self.argv(payload, wire), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        out.close()

    # -- the agent ------------------------------------------------------------
    def call(self, op: str, timeout: float = 300.0, **args) -> Dict:
        if self.proc is not None and self.proc.poll() is not None:
            raise GuestError(f"{self.name}: qemu exited with status {self.proc.returncode}; "
                             f"see {self.console}")
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.agent_port), timeout=timeout) as s:
            s.sendall(request)
            data = b""
            while not data.endswith(b"\n"):
                piece = s.recv(1 << 20)
                if not piece:
                    break
                data += piece
        if not data:
            raise ConnectionError(f"{self.name}: the agent closed without answering")
        if TRACE:
            took = time.monotonic() - started
            what = " ".join(args.get("argv") or [str(args.get("path", ""))])
            print(f"[trace] {took:6.2f}s {self.name} {op} {what[:120]}", file=sys.stderr,
                  flush=True)
        reply = json.loads(data)
        if not reply.get("ok"):
            raise GuestError(f"{self.name}: {op} failed: {reply.get('error')}")
        return reply

    def wait_agent(self, timeout: float) -> Dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("ping", timeout=10)
            except (OSError, ValueError, ConnectionError):
                if time.monotonic() >= deadline:
                    raise GuestError(f"{self.name}: the guest did not come up within "
                                     f"{timeout:g} s; see {self.console}") from None
                if self.proc.poll() is not None:
                    raise GuestError(f"{self.name}: qemu exited with status "
                                     f"{self.proc.returncode}; see {self.console}") from None
                time.sleep(1)

    def sh(self, *argv: str, check: bool = True, timeout: float = 120.0, input=None) -> str:
        r = self.call("run", argv=list(argv), timeout=timeout, input=input)
        if check and r["rc"] != 0:
            raise GuestError(f"{self.name}: `{' '.join(argv)}` exited {r['rc']}: "
                             f"{(r['stderr'] or r['stdout']).strip()[-800:]}")
        return r["stdout"]

    def result(self, *argv: str, timeout: float = 120.0) -> Dict:
        return self.call("run", argv=list(argv), timeout=timeout)

    def write(self, path: str, writes: List[Dict]) -> Dict:
        return self.call("write", path=path, writes=writes)

    def summary(self, path: str, offset: int = 0, length: Optional[int] = None) -> Dict:
        return self.call("summary", path=path, offset=offset, length=length)

    def read(self, path: str, offset: int, length: int) -> bytes:
        return base64.b64decode(self.call("read", path=path, offset=offset,
                                          length=length)["data"])

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.call("run", argv=["systemctl", "poweroff", "--no-block"], timeout=10)
        except (OSError, ValueError, GuestError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class KernelCluster:
    """The two guests, the broker's vhost, and the frontend's configuration on the host."""

    def __init__(self, workdir: Path, image: Path, *, accel: str = "tcg", smp: int = 1,
                 memory: int = 1536, pool_size: int = 8 << 30, timeout: float = 180.0):
        self.workdir = Path(workdir)
        self.image = image
        self.pool_size = pool_size
        self.timeout = timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.payload = self.workdir / "payload"
        self.vhost = f"imgstorage-kernel-{os.getpid()}-{secrets.token_hex(4)}"
        self.user = f"imgstorage-kernel-{secrets.token_hex(4)}"
        self.password = secrets.token_hex(16)   # a leading "-" would read as an option
        self.guests = {n: Guest(n, self.workdir, image, accel=accel, smp=smp, memory=memory)
                       for n in (NAS, CONTAINER)}
        self.frontend_conf = self.workdir / "frontend.conf"
        self.recording = False       # --record: keep the real tools' output as fixtures

    def rec(self, guest: "Guest", name: str, *argv: str, note: Optional[str] = None) -> None:
        """Record ``argv``'s output in ``guest`` as tests/fixtures/<name>.txt (with --record)."""
        if self.recording:
            from record import record
            record(guest, name, argv, note)

    def run(self, guest: "Guest", name: str, *argv: str, note: Optional[str] = None) -> Dict:
        """Run ``argv`` in ``guest`` in every run, recording it as ``rec`` does with --record:
        for the commands whose effect the scenario goes on to check."""
        if self.recording:
            from record import record
            return record(guest, name, argv, note)
        return guest.result(*argv)

    @property
    def nas(self) -> Guest:
        return self.guests[NAS]

    @property
    def container(self) -> Guest:
        return self.guests[CONTAINER]

    # -- set up -------------------------------------------------------------
    def broker_url(self, host: str) -> str:
        return (f"amqp://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
                f"@{host}:5672/{quote(self.vhost, safe='')}")

    def _rabbitmqctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True)

    def setup_broker(self) -> None:
        self._rabbitmqctl("add_vhost", self.vhost)
        self._rabbitmqctl("add_user", self.user, self.password)
        self._rabbitmqctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def teardown_broker(self) -> None:
        self._rabbitmqctl("delete_vhost", self.vhost, check=False)
        self._rabbitmqctl("delete_user", self.user, check=False)

    def node_config(self, name: str) -> Dict:
        role, ip, _ = NODES[name]
        return {"name": name, "broker_url": self.broker_url("10.0.2.2"), "backend": "real",
                "db": f"/var/lib/imgstorage/{role}.db", "default_pool": POOL,
                "log_file": f"/var/log/imgstorage/{DAEMON[role]}.log", "transport": "tcp",
                "target": "lio", "stream_address": ip, "stream_bind": ip,
                "img_sync_workers": 4, "timeout": self.timeout}

    def write_payload(self) -> None:
        if self.payload.exists():
            shutil.rmtree(self.payload)
        (self.payload / "conf").mkdir(parents=True)
        for name in ("guest-boot.sh", "agent.py"):
            shutil.copy2(HERE / "guest" / name, self.payload / name)
        (self.payload / "hosts").write_text(
            "".join(f"{ip} {name}\n" for name, (_, ip, _) in NODES.items()))
        for name in NODES:
            (self.payload / "conf" / f"{name}.json").write_text(
                json.dumps(self.node_config(name), indent=2) + "\n")
        wheels = self.payload / "wheels"
        wheels.mkdir()
        # The project as a wheel, freshly built from this checkout.
        subprocess.run([PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--disable-pip-version-check",
                        "--wheel-dir", str(wheels), str(PROJECT)], check=True,
                       cwd=self.workdir, capture_output=True)
        frontend = {"name": "frontend", "broker_url": self.broker_url("127.0.0.1"),
                    "backend": "real", "frontend_db": str(self.workdir / "frontend.db"),
                    "timeout": self.timeout}
        self.frontend_conf.write_text(json.dumps(frontend, indent=2) + "\n")

    def boot(self, timeout: float = 600.0) -> float:
        """Start both guests; returns the seconds until both agents answered."""
        started = time.monotonic()
        wire = free_port()
        self.nas.start(self.payload, f"listen=127.0.0.1:{wire}", self.pool_size)
        deadline = time.monotonic() + 30
        while not listening(wire):
            if self.nas.proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"{NAS}: qemu did not open the cluster wire; see "
                                 f"{self.workdir / (NAS + '.qemu.log')}")
            time.sleep(0.1)
        self.container.start(self.payload, f"connect=127.0.0.1:{wire}", self.pool_size)
        for guest in self.guests.values():
            guest.wait_agent(timeout - (time.monotonic() - started))
            status = guest.sh("cat", "/run/imgstorage-boot.status").strip()
            if status != "ok":
                raise GuestError(f"{guest.name}: guest set-up {status}: "
                                 f"{guest.sh('cat', '/var/log/imgstorage-boot.log')[-2000:]}")
        return time.monotonic() - started

    def start_daemons(self, timeout: float = 180.0) -> None:
        for guest in self.guests.values():
            daemon = DAEMON[guest.role]
            guest.sh("systemd-run", f"--unit={daemon}", "--property=Restart=no",
                     f"/usr/local/bin/{daemon}", "--debug")
        for name in self.guests:
            self.wait_ready(name, timeout)

    def zfs_driver(self, guest: "Guest") -> str:
        """Which ZFS driver imgstorage picks on ``guest`` (libzfs_core when pyzfs imports)."""
        return guest.sh("python3", "-c", "from imgstorage.drivers.zfs import make_zfs; "
                        "from imgstorage.runner import default_runner; "
                        "print(type(make_zfs(default_runner)).__name__)").strip()

    def restart_daemon(self, *guests: "Guest", timeout: float = 180.0) -> None:
        """Stop and start the daemon of each guest, all at once, then wait for each."""
        for guest in guests:
            daemon = DAEMON[guest.role]
            guest.sh("systemctl", "stop", daemon)
            guest.sh("systemctl", "reset-failed", daemon, check=False)
            guest.sh("systemd-run", f"--unit={daemon}", "--property=Restart=no",
                     f"/usr/local/bin/{daemon}", "--debug")
        for guest in guests:
            self.wait_ready(guest.name, timeout)

    def wait_ready(self, node: str, timeout: float) -> None:
        from imgstorage.config import from_dict
        from imgstorage.errors import ImgStorageError
        from imgstorage.messaging import RpcClient
        cfg = from_dict(json.loads(self.frontend_conf.read_text()))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with RpcClient(cfg) as rpc:
                    rpc.request(node, {"action": "ping"}, timeout=5)
                return
            except ImgStorageError as exc:
                if time.monotonic() >= deadline:
                    guest = self.guests[node]
                    log = guest.sh("journalctl", "-u", DAEMON[guest.role], "--no-pager",
                                   check=False)
                    raise GuestError(f"{node} did not answer within {timeout:g} s ({exc}): "
                                     f"{log[-2000:]}") from None
                time.sleep(1)

    # -- the operator ---------------------------------------------------------
    def rocks(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
        env = dict(os.environ, IMGSTORAGE_CONF=str(self.frontend_conf))
        started = time.monotonic()
        proc = subprocess.run([PYTHON, "-c", ROCKS, *args], env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=str(PROJECT))
        if TRACE:
            print(f"[trace] {time.monotonic() - started:6.2f}s frontend rocks {' '.join(args)}",
                  file=sys.stderr, flush=True)
        return proc

    def ok(self, *args: str, timeout: float = 600.0) -> str:
        proc = self.rocks(*args, timeout=timeout)
        if proc.returncode != 0 or proc.stderr.strip():
            raise AssertionError(f"rocks {' '.join(args)} -> {proc.returncode}: "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def register(self) -> None:
        for args in (["add", "host", NAS, "appliance=nas"],
                     ["add", "host", CONTAINER, "appliance=vm-container"],
                     ["set", "host", "attr", NAS, "img_zpools", POOL]):
            self.ok(*args)

    # -- evidence -------------------------------------------------------------
    def collect_logs(self) -> None:
        for guest in self.guests.values():
            if guest.proc is None or guest.proc.poll() is not None:
                continue
            logs = {"daemon.log": ["cat", f"/var/log/imgstorage/{DAEMON[guest.role]}.log"],
                    "boot.log": ["cat", "/var/log/imgstorage-boot.log"],
                    "journal.log": ["journalctl", "-b", "--no-pager"],
                    "dmesg.log": ["dmesg"]}
            for fname, argv in logs.items():
                try:
                    out = guest.result(*argv, timeout=60)
                    (self.workdir / f"{guest.name}.{fname}").write_text(
                        out["stdout"] + out["stderr"])
                except (OSError, ValueError, GuestError):
                    pass

    def shutdown(self) -> None:
        for guest in self.guests.values():
            guest.stop()
