"""The init scripts driven for real: a daemon process on a simulated node and the real broker.

The scripts run with a cleared environment, as ``service`` runs them; the
daemon program is found on PATH (a small launcher for this checkout), its
configuration is the simulated node's, and the pid file and output go to
folders of the test instead of ``/var/run`` and ``/var/log/imgstorage``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from imgstorage.simcluster import SimCluster, broker_url

NAS, HOST = "nas-0-0", "vm-container-0-14"
NODE = {"nas": NAS, "vm": HOST}
REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "init.d"
USAGE = "{start|stop|status|restart|try-restart|force-reload}"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, vhost):
    c = SimCluster(tmp_path_factory.mktemp("initd"), broker_url(vhost), containers=(HOST,))
    assert c.make_pools() == [NAS, HOST]
    bindir = c.workdir / "bin"
    bindir.mkdir()
    for role in ("nas", "vm"):
        launcher = bindir / f"img-storage-{role}"
        launcher.write_text(f"#!{sys.executable}\n"
                            "import sys\n"
                            f"sys.path.insert(0, {str(REPO)!r})\n"
                            f"from imgstorage.{role}.main import main\n"
                            "main()\n")
        launcher.chmod(0o755)
    yield c
    for role in ("nas", "vm"):                 # whatever a failed test left running
        pid = read_pid(c, role)
        if pid and alive(pid):
            os.kill(pid, 9)


def env_for(c, role: str, **extra: str) -> Dict[str, str]:
    env = {"PATH": f"{c.workdir / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
           "IMGSTORAGE_CONF": str(c.config_path(NODE[role])),
           "IMGSTORAGE_PIDDIR": str(c.workdir / "run"),
           "IMGSTORAGE_LOGDIR": str(c.workdir / "varlog"),
           "DAEMON_ARGS": "--debug"}
    env.update(extra)
    return env


def script(c, role: str, *args: str, timeout: float = 200, **extra: str):
    return subprocess.run(["bash", str(SCRIPTS / f"img-storage-{role}"), *args],
                          env=env_for(c, role, **extra), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def pid_path(c, role: str) -> Path:
    return c.workdir / "run" / f"img-storage-{role}.pid"


def read_pid(c, role: str) -> Optional[int]:
    try:
        return int(pid_path(c, role).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running, not merely a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children_of(pid: int) -> list:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


# ------------------------------------------------------------------ the life cycle
@pytest.mark.parametrize("role", ["nas", "vm"])
def test_start_status_stop_restart(nodes, role):
    c, node, name = nodes, NODE[role], f"img-storage-{role}"
    proc = script(c, role, "status")
    assert (proc.returncode, proc.stdout.strip()) == (3, f"{name} is stopped"), proc

    proc = script(c, role, "start")
    assert proc.returncode == 0, proc
    pid = read_pid(c, role)
    assert pid and alive(pid), proc
    assert re.fullmatch(rf"Starting .*: OK \(pid {pid}\)", proc.stdout.strip()), proc.stdout
    assert (proc := script(c, role, "status")).returncode == 0, proc
    assert proc.stdout.strip() == f"{name} (pid {pid}) is running"
    c.wait_ready(node, timeout=30)            # it answers a ping through the broker
    # the daemon runs in its own session, from /, with the configured log
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert f"{name} {node} starting" in c.log_path(node).read_text()
    assert (c.workdir / "varlog" / f"{name}.out").exists()

    proc = script(c, role, "start")           # starting a running service succeeds
    assert proc.returncode == 0 and proc.stdout.strip() == f"{name} is already running (pid {pid})"
    assert read_pid(c, role) == pid

    proc = script(c, role, "stop")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("stopped"), proc
    assert wait_gone(pid, 1.0), "stop returned before the daemon exited"
    assert not pid_path(c, role).exists()
    assert "received signal 15, stopping after in-flight work" in c.log_path(node).read_text()
    assert (proc := script(c, role, "status")).returncode == 3, proc
    assert (proc := script(c, role, "stop")).returncode == 0, proc    # stopping a stopped one
    assert proc.stdout.strip() == f"{name} is not running"

    proc = script(c, role, "restart")          # from stopped: starts it
    assert proc.returncode == 0, proc
    first = read_pid(c, role)
    assert first and alive(first)
    c.wait_ready(node, timeout=30)
    proc = script(c, role, "restart")          # from running: stop, then start
    assert proc.returncode == 0, proc
    second = read_pid(c, role)
    assert second != first and not alive(first) and alive(second)
    c.wait_ready(node, timeout=30)
    proc = script(c, role, "try-restart")
    assert proc.returncode == 0 and alive(third := read_pid(c, role)) and third != second
    assert script(c, role, "stop").returncode == 0
    assert not alive(third)
    proc = script(c, role, "try-restart")      # not running: stays stopped
    assert proc.returncode == 0 and read_pid(c, role) is None


def test_a_bad_configuration_fails_start_with_its_one_line(nodes, tmp_path):
    c = nodes
    conf = tmp_path / "bad.conf"
    conf.write_text('{"broker_url": "amqp://guest:guest@127.0.0.1:5672/x", "db": "/tmp/x.db"}\n')
    proc = script(c, "nas", "start", IMGSTORAGE_CONF=str(conf))
    assert proc.returncode == 6, proc
    assert proc.stderr.splitlines() == [f"img-storage-nas: {conf}: missing key 'name'"], proc.stderr
    assert proc.stdout == ""
    assert not pid_path(c, "nas").exists()
    assert script(c, "nas", "status", IMGSTORAGE_CONF=str(conf)).returncode == 3

    missing = script(c, "nas", "start", IMGSTORAGE_CONF=str(tmp_path / "none.conf"))
    assert missing.returncode == 6 and "configuration file not found" in missing.stderr


def test_usage_and_unknown_actions(nodes):
    for args in (["frobnicate"], []):
        proc = script(nodes, "vm", *args)
        assert proc.returncode == 2, proc
        assert proc.stderr.strip().startswith("Usage: ") and proc.stderr.strip().endswith(USAGE)
    proc = script(nodes, "vm", "reload")
    assert proc.returncode == 3 and "use restart" in proc.stderr


def test_a_pid_file_without_its_process_is_dead_then_cleaned(nodes):
    c = nodes
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_path(c, "vm").parent.mkdir(exist_ok=True)
    pid_path(c, "vm").write_text(f"{dead.pid}\n")
    proc = script(c, "vm", "status")
    assert proc.returncode == 1 and "dead but its pid file" in proc.stdout, proc
    assert script(c, "vm", "stop").returncode == 0
    assert not pid_path(c, "vm").exists()
    assert script(c, "vm", "status").returncode == 3


# ------------------------------------------------------------------ edge cases, fake daemons
FAKE = """#!/bin/bash
case " $* " in *" --check-config "*) exit 0 ;; esac
{body}
"""


def fake(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(FAKE.format(body=body))
    path.chmod(0o755)
    return path


def test_stop_waits_for_sigterm_and_kills_after_its_bound(nodes, tmp_path):
    c = nodes
    # a daemon still busy: it ignores SIGTERM, and it has a child of its own
    stubborn = fake(tmp_path, "busy-daemon",
                    "trap 'echo finishing in-flight work' TERM\n"
                    "sleep 600 &\n"
                    "while :; do sleep 0.1; done")
    proc = script(c, "nas", "start", DAEMON=str(stubborn), START_WAIT="1")
    assert proc.returncode == 0, proc
    pid = read_pid(c, "nas")
    children = children_of(pid)
    assert children, "the fake daemon should have a child"
    started = time.monotonic()
    proc = script(c, "nas", "stop", DAEMON=str(stubborn), STOP_TIMEOUT="2")
    took = time.monotonic() - started
    assert proc.returncode == 0, proc
    assert "still running after 2s, killing it" in proc.stdout, proc.stdout
    assert 2.0 <= took < 15, took
    assert wait_gone(pid, 1.0) and all(wait_gone(child, 5.0) for child in children)
    out = (c.workdir / "varlog" / "img-storage-nas.out").read_text()
    assert "finishing in-flight work" in out
    assert script(c, "nas", "status", DAEMON=str(stubborn)).returncode == 3


def test_a_daemon_that_exits_at_once_fails_start(nodes, tmp_path):
    c = nodes
    broken = fake(tmp_path, "broken-daemon", "echo 'cannot open the database' >&2\nexit 1")
    proc = script(c, "vm", "start", DAEMON=str(broken))
    assert proc.returncode == 7, proc
    assert "exited at start" in proc.stderr and "cannot open the database" in proc.stderr
    assert script(c, "vm", "status", DAEMON=str(broken)).returncode == 3

    proc = script(c, "vm", "start", DAEMON=str(tmp_path / "not-installed"))
    assert proc.returncode == 5 and "not an executable program" in proc.stderr
    proc = script(c, "vm", "start", PATH="/usr/bin:/bin")
    if not any(Path(d, "img-storage-vm").exists() for d in ("/usr/local/bin", "/usr/bin",
                                                            "/opt/rocks/bin")):
        assert proc.returncode == 5 and "not installed" in proc.stderr, proc


# ------------------------------------------------------------------ packaging
@pytest.mark.parametrize("role", ["nas", "vm"])
def test_lsb_header_and_systemd_unit(role):
    text = (SCRIPTS / f"img-storage-{role}").read_text()
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(re.findall(r"^# ([A-Z][\w-]+):\s+(.*)$", header, re.M))
    assert fields["Provides"] == f"img-storage-{role}"
    assert fields["Default-Start"] == "2 3 4 5" and fields["Default-Stop"] == "0 1 6"
    assert os.access(SCRIPTS / f"img-storage-{role}", os.X_OK)

    unit = (SCRIPTS / f"img-storage-{role}.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Type"] == "simple" and settings["KillSignal"] == "SIGTERM"
    assert settings["TimeoutStopSec"] == "120" and settings["Restart"] == "on-failure"
    assert f"img-storage-{role}" in settings["ExecStart"]
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify",
                               str(SCRIPTS / f"img-storage-{role}.service")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ boot order
def lsb_fields(role: str) -> Dict[str, List[str]]:
    text = (SCRIPTS / f"img-storage-{role}").read_text()
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    return {k: v.split() for k, v in re.findall(r"^# ([A-Z][\w-]+):\s+(.*)$", header, re.M)}


def unit_lists(role: str) -> Dict[str, List[str]]:
    """Each [Unit] setting with the values of all its lines (After= may be repeated)."""
    unit = (SCRIPTS / f"img-storage-{role}.service").read_text().split("[Service]", 1)[0]
    found: Dict[str, List[str]] = {}
    for key, value in re.findall(r"^(\w+)=(.*)$", unit, re.M):
        found.setdefault(key, []).extend(value.split())
    return found


@pytest.mark.parametrize("role,needs", [
    ("nas", ["zfs-import", "zfs-mount", "rabbitmq-server", "target", "tgtd"]),
    ("vm", ["zfs-import", "zfs-mount", "rabbitmq-server", "iscsid", "open-iscsi"]),
])
def test_lsb_scripts_start_after_network_and_pools(role, needs):
    fields = lsb_fields(role)
    for facility in ("$local_fs", "$remote_fs", "$network", "$named"):
        assert facility in fields["Required-Start"], fields
    for facility in ("$local_fs", "$remote_fs", "$network"):
        assert facility in fields["Required-Stop"], fields
    # services a host may lack are Should-, never Required- (insserv refuses a missing one)
    assert set(needs) <= set(fields["Should-Start"]), fields
    assert set(needs) <= set(fields["Should-Stop"]), fields   # and stops before them
    assert all(f.startswith("$") for f in fields["Required-Start"] + fields["Required-Stop"])


@pytest.mark.parametrize("role,after", [
    ("nas", ["target.service", "tgtd.service"]),
    ("vm", ["iscsid.service", "open-iscsi.service"]),
])
def test_units_start_after_network_and_pools_without_requiring_them(role, after):
    lists = unit_lists(role)
    wanted = ["network-online.target", "zfs-import.target", "zfs.target"]
    assert set(wanted + ["zfs-mount.service"] + after) <= set(lists["After"]), lists
    assert set(wanted) <= set(lists["Wants"]), lists
    # a dependency this host does not have must not keep the daemon from starting
    assert not {"Requires", "Requisite", "BindsTo", "PartOf"} & set(lists), lists


def test_the_two_scripts_share_one_functions_file():
    shared = SCRIPTS / "img-storage-functions"
    text = shared.read_text()
    assert "### BEGIN INIT INFO" not in text          # not a service of its own
    assert not os.access(shared, os.X_OK)
    for name in ("do_start", "do_stop", "do_status", "do_restart", "imgstorage_service"):
        assert re.search(rf"^{name}\(\) {{$", text, re.M), name
    for role in ("nas", "vm"):
        own = (SCRIPTS / f"img-storage-{role}").read_text()
        assert not re.search(r"^\s*[\w-]+\(\)\s*\{", own, re.M), "functions belong in the shared file"
        assert ". \"$IMGSTORAGE_FUNCTIONS\"" in own and "img-storage-functions" in own
        assert len(own.splitlines()) < 60


def install(tmp_path: Path, *names: str) -> Path:
    """The files copied into an /etc/init.d of the test's own, modes kept."""
    initd = tmp_path / "etc" / "init.d"
    initd.mkdir(parents=True)
    for name in names:
        shutil.copy2(SCRIPTS / name, initd / name)
    return initd


def test_installed_scripts_run_through_rc_links(nodes, tmp_path):
    c = nodes
    assert not Path("/usr/lib/imgstorage/img-storage-functions").exists()
    initd = install(tmp_path, "img-storage-nas", "img-storage-vm", "img-storage-functions")
    rc2 = tmp_path / "etc" / "rc2.d"
    rc2.mkdir()
    for role in ("nas", "vm"):
        link = rc2 / f"S99img-storage-{role}"
        link.symlink_to(Path("..") / "init.d" / f"img-storage-{role}")
        for path in (initd / f"img-storage-{role}", link):
            proc = subprocess.run([str(path), "status"], env=env_for(c, role),
                                  capture_output=True, text=True, timeout=60)
            assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (
                3, f"img-storage-{role} is stopped", ""), proc
    # the whole life cycle from the installed copy, through its rc link
    link = str(rc2 / "S99img-storage-nas")
    proc = subprocess.run([link, "start"], env=env_for(c, "nas"), capture_output=True,
                          text=True, timeout=200)
    assert proc.returncode == 0, proc
    pid = read_pid(c, "nas")
    assert pid and alive(pid)
    c.wait_ready(NAS, timeout=30)
    proc = subprocess.run([link, "stop"], env=env_for(c, "nas"), capture_output=True,
                          text=True, timeout=200)
    assert proc.returncode == 0 and wait_gone(pid, 1.0), proc


def test_a_script_without_its_functions_file_says_so(nodes, tmp_path):
    initd = install(tmp_path, "img-storage-vm")
    proc = subprocess.run([str(initd / "img-storage-vm"), "start"], env=env_for(nodes, "vm"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, proc
    assert proc.stderr.splitlines() == [
        f"img-storage-vm: img-storage-functions is not installed next to "
        f"{initd / 'img-storage-vm'} nor in /usr/lib/imgstorage"], proc.stderr
    assert proc.stdout == "" and read_pid(nodes, "vm") is None


def test_setup_installs_every_service_file():
    setup = (REPO / "setup.py").read_text()
    for path in SCRIPTS.iterdir():
        assert f'"init.d/{path.name}"' in setup, path.name
