"""Every handler fed malformed and adversarial messages: an error, nothing changed."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgstorage import protocol
from imgstorage.config import from_dict
from imgstorage.daemon import Daemon
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.errors import NoSuchNode
from imgstorage.messaging import Envelope
from imgstorage.nas import handlers as nas_handlers
from imgstorage.nas.models import Base as NasBase
from imgstorage.nas.service import NasService
from imgstorage.nas.store import NasStore
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService

NASTY = ["../etc", "a/b", "a;b", "a b", "$(reboot)", "`id`", "x" * 5000, "", "\n", "vol\n",
         "-rf", "..", "tank/../../x", "\x00", "é", "*", "a|b"]
values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                   st.floats(allow_nan=True), st.sampled_from(NASTY), st.text(max_size=300),
                   st.lists(st.text(max_size=5), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))


class NoNetwork:
    """Any call to another node: that node does not exist."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def request(self, node, message, timeout):
        raise NoSuchNode(node)

    call = request


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    from imgstorage.drivers.sim import cli as simcli  # the pool, as an administrator would
    from click.testing import CliRunner
    CliRunner().invoke(simcli.cli, ["--sim-root", str(root / "sim"), "zpool", "create",
                                    "--host", "nas-0-0", "tank"])
    nas_cfg = from_dict({"name": "nas-0-0", "backend": "sim", "sim_root": str(root / "sim"),
                         "db": str(root / "nas.db")})
    engine = make_engine(nas_cfg.db)
    create_schema(engine, NasBase)
    store = NasStore(engine)
    store.ensure_defaults()
    nas = NasService(nas_cfg, store, node_drivers(nas_cfg), rpc_factory=NoNetwork)
    vm_cfg = from_dict({"name": "compute-0-3", "backend": "sim", "sim_root": str(root / "sim"),
                        "db": str(root / "vm.db")})
    vm_engine = make_engine(vm_cfg.db)
    create_schema(vm_engine, VmBase)
    vm = VmService(vm_cfg, vm_engine, node_drivers(vm_cfg))
    daemons = {
        "nas": Daemon(nas_cfg, nas_handlers.build(nas), quick_actions=nas_handlers.QUICK,
                      workers=1),
        "vm": Daemon(vm_cfg, vm_handlers.build(vm), quick_actions=vm_handlers.QUICK, workers=1),
    }
    return root, daemons


def snapshot(root: Path) -> tuple:
    """The databases and the simulated kernel, as files and rows."""
    rows = []
    for db in ("nas.db", "vm.db"):
        con = sqlite3.connect(root / db)
        try:
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                        "ORDER BY name"):
                if table != "nas_attrs":
                    rows.append((table, sorted(con.execute(f'SELECT * FROM "{table}"').fetchall(),
                                               key=repr)))
        finally:
            con.close()
    files = sorted(str(p.relative_to(root)) for p in (root / "sim").rglob("*")
                   if not p.name.startswith("."))
    return tuple(rows), tuple(files)


class Capture:
    def __init__(self):
        self.replies = []
        self.done = 0

    def reply(self, message):
        self.replies.append(message)

    def done_(self):
        self.done += 1


def deliver(daemon: Daemon, body: dict, message_id: str) -> dict:
    cap = Capture()
    responder = type("R", (), {"reply": cap.reply, "done": lambda self: cap.done_()})()
    raw = json.dumps(body, default=str).encode()
    try:
        decoded = protocol.decode(raw)
    except Exception as exc:
        daemon.dispatch(None, responder, str(exc))
    else:
        env = Envelope(action=decoded["action"], body=decoded, message_id=message_id,
                       reply_to="q", user_id="guest", deadline=None)
        handler = daemon.handlers.get(env.action)
        if handler is None:
            daemon.dispatch(env, responder, None)
        else:
            daemon._inflight["work"] += 1
            daemon._run(handler, env, responder)
    assert cap.done == 1
    return cap.replies[0] if cap.replies else None


ACTIONS = sorted(set(nas_handlers.MANAGEMENT) | {"map_zvol", "unmap_zvol", "del_zvol",
                                                 "sync_zvol", "recv_zvol", "send_zvol",
                                                 "del_local", "zvol_synced", "format_disk",
                                                 "kept_dropped"})
FIELDS = ["zvol", "zpool", "remotehost", "remotepool", "size", "sync", "target", "nas", "attrs",
          "token", "stream", "snap", "base", "chap", "volsize", "status", "resume_token", "restart",
          "base_guid", "fresh", "keep", "keep_local", "host", "snapshot"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(action=st.sampled_from(ACTIONS), side=st.sampled_from(["nas", "vm"]),
       body=st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
       message_id=st.text(min_size=1, max_size=40))
def test_hostile_messages_change_nothing(nodes, action, side, body, message_id):
    root, daemons = nodes
    before = snapshot(root)
    reply = deliver(daemons[side], {**body, "action": action}, message_id)
    if reply is not None:                       # notifications are not answered
        assert reply["status"] in ("error", "success")
        assert "internal error" not in reply.get("error", ""), reply
        # The NAS has no zvol and reaches no container: these cannot succeed.  (A
        # container's idempotent let-go of a zvol it does not have may succeed.)
        if side == "nas" and action in ("map_zvol", "unmap_zvol", "del_zvol", "clean_zvol"):
            assert reply["status"] == "error", reply
    after = snapshot(root)
    if action not in ("set_zvol_attrs", "set_attrs", "del_attrs"):
        assert after == before


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b'"map_zvol"', b"\xff" * 10,
                                 b'{"action": null}', b'{"action": ["map_zvol"]}'])
def test_undecodable_bodies(nodes, raw):
    root, daemons = nodes
    cap = Capture()
    responder = type("R", (), {"reply": cap.reply, "done": lambda self: cap.done_()})()
    try:
        protocol.decode(raw)
        pytest.fail("decoded")
    except Exception as exc:
        daemons["nas"].dispatch(None, responder, str(exc))
    assert cap.replies[0]["status"] == "error" and cap.done == 1
