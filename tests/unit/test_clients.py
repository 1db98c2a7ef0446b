"""The typed clients of both daemons: the exact wire messages, notify vs request, codes.

The expected messages are written out field by field: the original's fields
(../spec: FE->NAS, NAS->VM and VM->NAS messages) plus the ones this
implementation added beside them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from imgstorage import protocol
from imgstorage.config import from_dict
from imgstorage.drivers.base import ChapCredentials
from imgstorage.errors import ImgStorageError, MessagingError, RemoteError
from imgstorage.messaging import RpcClient
from imgstorage.nas.client import NasClient
from imgstorage.rpcapi import Asking, OneWay, PerRequest
from imgstorage.vm.client import VmClient

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """A sender that records what it is given and answers from a script by action."""

    def __init__(self, answers: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        self.requests: List[tuple] = []
        self.notes: List[tuple] = []
        self.answers = answers or {}

    def request(self, node: str, message: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        self.requests.append((node, message, timeout))
        return dict({"status": "success"}, **self.answers.get(message["action"], {}))

    def notify(self, node: str, message: Dict[str, Any],
               timeout: Optional[float] = None) -> None:
        self.notes.append((node, message, timeout))


def sent(rec: Recorder) -> Dict[str, Any]:
    assert len(rec.requests) == 1, rec.requests
    return rec.requests[0][1]


# ------------------------------------------------------------------ NAS
NAS_CASES = [
    # the original's FE->NAS messages
    (lambda c: c.map_zvol("vol1", zpool="tank", remotehost="compute-0-3", size=36,
                          remotepool="data", sync=True),
     {"action": "map_zvol", "zpool": "tank", "zvol": "vol1", "remotehost": "compute-0-3",
      "size": 36, "remotepool": "data", "sync": True}),
    (lambda c: c.map_zvol("vol1", zpool="tank", remotehost="compute-0-3", size=1,
                          remotepool=None, sync=False),
     {"action": "map_zvol", "zpool": "tank", "zvol": "vol1", "remotehost": "compute-0-3",
      "size": 1, "remotepool": None, "sync": False}),
    (lambda c: c.unmap_zvol("vol1"), {"action": "unmap_zvol", "zvol": "vol1"}),
    (lambda c: c.del_zvol("vol1", zpool="tank"),
     {"action": "del_zvol", "zpool": "tank", "zvol": "vol1"}),
    (lambda c: c.list_zvols(), {"action": "list_zvols"}),
    (lambda c: c.get_zvol_attrs("vol1"), {"action": "get_zvol_attrs", "zvol": "vol1"}),
    (lambda c: c.get_attrs(), {"action": "get_attrs"}),
    (lambda c: c.set_attrs({"frequency": "600", "uploadspeed": None}),
     {"action": "set_attrs", "attrs": {"frequency": "600", "uploadspeed": None}}),
    (lambda c: c.del_attrs(["uploadspeed"]), {"action": "del_attrs", "attrs": ["uploadspeed"]}),
    # this implementation's own
    (lambda c: c.set_zvol_attrs("vol1", {"frequency": 600}),
     {"action": "set_zvol_attrs", "zvol": "vol1", "attrs": {"frequency": 600}}),
    (lambda c: c.clean_zvol("vol1", force=True),
     {"action": "clean_zvol", "zvol": "vol1", "force": True}),
    (lambda c: c.ping(), {"action": "ping"}),
]

NAS_ANSWERS = {"map_zvol": {"bdev": "/dev/sdb"}, "list_zvols": {"body": []},
               "get_zvol_attrs": {"body": {"zvol": "vol1"}}, "get_attrs": {"attrs": {}}}


@pytest.mark.parametrize("call,message", NAS_CASES, ids=[m["action"] for _, m in NAS_CASES])
def test_nas_client_sends_the_exact_wire_message(call, message):
    rec = Recorder(NAS_ANSWERS)
    call(NasClient(rec, "nas-0-0", timeout=7))
    assert rec.requests == [("nas-0-0", message, 7)]
    assert rec.notes == []


def test_nas_client_results():
    rec = Recorder(NAS_ANSWERS)
    nas = NasClient(rec, "nas-0-0", timeout=7)
    assert nas.map_zvol("v", zpool="tank", remotehost="h", size=1, remotepool=None,
                        sync=False) == "/dev/sdb"
    rec.answers["map_zvol"] = {}
    assert nas.map_zvol("v", zpool="tank", remotehost="h", size=1, remotepool=None,
                        sync=False) is None
    rec.answers["get_attrs"] = {"attrs": ["not", "a", "dict"]}
    with pytest.raises(ImgStorageError, match="^nas-0-0 sent a malformed attribute list$"):
        nas.get_attrs()


def test_kept_dropped_is_a_notification():
    rec = Recorder()
    NasClient(rec, "nas-0-0", timeout=7).kept_dropped("vol1", host="compute-0-3",
                                                      snapshot="IMG-STORAGE-2")
    assert rec.requests == []
    assert rec.notes == [("nas-0-0", {"action": "kept_dropped", "zvol": "vol1",
                                      "host": "compute-0-3", "snapshot": "IMG-STORAGE-2"}, None)]


def test_del_local_says_whether_the_copy_was_kept():
    rec = Recorder({"del_local": {"kept": True}})
    assert VmClient(rec, "compute-0-3").del_local("vol1", keep="s") is True
    rec.answers["del_local"] = {"kept": "yes"}            # anything but true is "destroyed"
    assert VmClient(rec, "compute-0-3").del_local("vol1", keep="s") is False
    rec.answers["del_local"] = {}                          # an older container's answer
    assert VmClient(rec, "compute-0-3").del_local("vol1") is False


def test_a_method_timeout_overrides_the_clients():
    rec = Recorder()
    NasClient(rec, "nas-0-0", timeout=7).unmap_zvol("v", timeout=30)
    assert rec.requests[0][2] == 30


@pytest.mark.parametrize("ok,error,message", [
    (True, None, {"action": "zvol_synced", "zvol": "vol1", "status": "success"}),
    (False, "dmsetup failed", {"action": "zvol_synced", "zvol": "vol1", "status": "error",
                               "error": "dmsetup failed"}),
])
def test_zvol_synced_is_a_notification(ok, error, message):
    rec = Recorder()
    NasClient(rec, "nas-0-0", timeout=7).zvol_synced("vol1", ok=ok, error=error)
    assert rec.requests == []
    assert rec.notes == [("nas-0-0", message, None)]


# ------------------------------------------------------------------- VM
CHAP = ChapCredentials("imgstorage-ab12cd34", "0123456789abcdef")
VM_CASES = [
    # the original's NAS->VM messages, with the fields added beside them
    (lambda c: c.map_zvol("vol1", target="iqn.2001-04.com.nas-0-0-vol1", nas="nas-0-0.ibnet",
                          nas_node="nas-0-0", size=2, volsize=2 << 30, sync=True,
                          remotehost="compute-0-3", remotepool="data", chap=CHAP),
     {"action": "map_zvol", "target": "iqn.2001-04.com.nas-0-0-vol1", "nas": "nas-0-0.ibnet",
      "size": 2, "zvol": "vol1", "sync": True, "remotehost": "compute-0-3",
      "remotepool": "data", "nas_node": "nas-0-0", "volsize": 2 << 30,
      "chap": {"userid": "imgstorage-ab12cd34", "password": "0123456789abcdef"}}),
    (lambda c: c.map_zvol("vol1", target="iqn.2001-04.com.nas-0-0-vol1", nas="nas-0-0",
                          nas_node="nas-0-0", size=2, volsize=None, sync=False,
                          remotehost="compute-0-3", remotepool=None),
     {"action": "map_zvol", "target": "iqn.2001-04.com.nas-0-0-vol1", "nas": "nas-0-0",
      "size": 2, "zvol": "vol1", "sync": False, "remotehost": "compute-0-3",
      "remotepool": None, "nas_node": "nas-0-0", "volsize": None}),
    (lambda c: c.unmap_zvol("vol1", target=None),
     {"action": "unmap_zvol", "zvol": "vol1", "target": None}),
    (lambda c: c.unmap_zvol("vol1", target="iqn.x", sync=True),
     {"action": "unmap_zvol", "zvol": "vol1", "target": "iqn.x", "sync": True}),
    (lambda c: c.sync_zvol("vol1", target="iqn.x", snap="IMG-STORAGE-1"),
     {"action": "sync_zvol", "zvol": "vol1", "target": "iqn.x", "snap": "IMG-STORAGE-1"}),
    (lambda c: c.list_dev(), {"action": "list_dev"}),
    # this implementation's own
    (lambda c: c.initiator_name(), {"action": "initiator_name"}),
    (lambda c: c.clean_zvol("vol1", target="iqn.x"),
     {"action": "clean_zvol", "zvol": "vol1", "target": "iqn.x"}),
    (lambda c: c.recv_zvol("vol1"), {"action": "recv_zvol", "zvol": "vol1"}),
    (lambda c: c.recv_zvol("vol1", restart=True),
     {"action": "recv_zvol", "zvol": "vol1", "restart": True}),
    (lambda c: c.recv_zvol("vol1", stream=True),
     {"action": "recv_zvol", "zvol": "vol1", "stream": True}),
    (lambda c: c.send_zvol("vol1", snap="s2", base="s1"),
     {"action": "send_zvol", "zvol": "vol1", "snap": "s2", "base": "s1"}),
    (lambda c: c.send_zvol("vol1", snap="s1"),
     {"action": "send_zvol", "zvol": "vol1", "snap": "s1", "base": None}),
    (lambda c: c.send_zvol("vol1", resume_token="1-abc-12-789c"),
     {"action": "send_zvol", "zvol": "vol1", "resume_token": "1-abc-12-789c"}),
    (lambda c: c.send_zvol("vol1", snap="s2", base="s1", stream=True),
     {"action": "send_zvol", "zvol": "vol1", "snap": "s2", "base": "s1", "stream": True}),
    (lambda c: c.del_local("vol1"), {"action": "del_local", "zvol": "vol1"}),
    (lambda c: c.ping(), {"action": "ping"}),
    # kept copies (img_keep_local)
    (lambda c: c.del_local("vol1", keep="IMG-STORAGE-2"),
     {"action": "del_local", "zvol": "vol1", "keep": "IMG-STORAGE-2"}),
    (lambda c: c.recv_zvol("vol1", base="IMG-STORAGE-2", base_guid=12345, stream=True),
     {"action": "recv_zvol", "zvol": "vol1", "base": "IMG-STORAGE-2", "base_guid": 12345,
      "stream": True}),
    (lambda c: c.recv_zvol("vol1", fresh=True),
     {"action": "recv_zvol", "zvol": "vol1", "fresh": True}),
]

VM_ANSWERS = {"list_dev": {"body": {}}, "initiator_name": {"initiator": "iqn.x"}}


@pytest.mark.parametrize("call,message", VM_CASES, ids=[m["action"] for _, m in VM_CASES])
def test_vm_client_sends_the_exact_wire_message(call, message):
    rec = Recorder(VM_ANSWERS)
    call(VmClient(rec, "compute-0-3", timeout=9))
    assert rec.requests == [("compute-0-3", message, 9)]
    assert rec.notes == []


def test_send_zvol_needs_a_snapshot_or_a_token():
    rec = Recorder()
    with pytest.raises(ValueError):
        VmClient(rec, "compute-0-3", timeout=9).send_zvol("vol1")
    assert rec.requests == []


def test_listings_follow_the_pages():
    pages = iter([{"status": "success", "body": {"a": {}, "b": {}}, "more": True, "next": "b"},
                  {"status": "success", "body": {"c": {}}}])

    class Paged(Recorder):
        def request(self, node, message, timeout):
            self.requests.append((node, message, timeout))
            return next(pages)
    rec = Paged()
    assert sorted(VmClient(rec, "compute-0-3", timeout=9).list_dev()) == ["a", "b", "c"]
    assert [m for _, m, _ in rec.requests] == [{"action": "list_dev"},
                                              {"action": "list_dev", "after": "b"}]


# ----------------------------------------------------- codes through RpcClient
def rpc_answering(reply: Dict[str, Any]) -> RpcClient:
    """A real RpcClient whose broker round trip is replaced by ``reply``."""
    rpc = RpcClient(from_dict({"name": "frontend"}))
    rpc.asked = []

    def call(node, message, timeout):
        rpc.asked.append((node, message, timeout))
        return reply
    rpc.call = call
    return rpc


@pytest.mark.parametrize("code", ["not_resumable", "busy", "state", "not_found", "forbidden"])
def test_an_error_reply_raises_remote_error_with_its_code(code):
    rpc = rpc_answering(protocol.error("send_zvol", "the words for people", code))
    with pytest.raises(RemoteError) as err:
        VmClient(rpc, "compute-0-3").send_zvol("vol1", resume_token="1-abc-12-789c")
    assert (err.value.code, err.value.node, err.value.action, str(err.value)) == (
        code, "compute-0-3", "send_zvol", "the words for people")
    assert rpc.asked[0][2] == rpc.config.timeout      # the configuration's timeout


def test_a_reply_without_a_code_is_a_generic_error():
    rpc = rpc_answering({"action": "zvol_deleted", "status": "error", "error": "old node"})
    with pytest.raises(RemoteError) as err:
        NasClient(rpc, "nas-0-0").del_zvol("vol1", zpool="tank")
    assert err.value.code == "error"


# ------------------------------------------------------------- senders
def test_per_request_opens_a_connection_for_each_message():
    opened: List[Recorder] = []

    class Factory:
        def __enter__(self):
            opened.append(Recorder())
            return opened[-1]

        def __exit__(self, *exc):
            return False
    client = VmClient(PerRequest(Factory), "compute-0-3", timeout=5)
    client.del_local("a")
    client.del_local("b")
    assert [sent(r)["zvol"] for r in opened] == ["a", "b"]


def test_asking_and_one_way_senders():
    asked = []
    nas = NasClient(Asking(lambda node, m: asked.append((node, m)) or {"status": "success"}),
                    "nas-0-0")
    nas.unmap_zvol("v")
    assert asked == [("nas-0-0", {"action": "unmap_zvol", "zvol": "v"})]
    with pytest.raises(MessagingError):
        nas.zvol_synced("v", ok=True)
    told = []
    one_way = NasClient(OneWay(lambda node, m: told.append((node, m))), "nas-0-0")
    one_way.zvol_synced("v", ok=True)
    assert told == [("nas-0-0", {"action": "zvol_synced", "zvol": "v", "status": "success"})]
    with pytest.raises(MessagingError):
        one_way.ping()


# ------------------------------------------- no message written by hand elsewhere
ALLOWED = {
    "imgstorage/nas/client.py", "imgstorage/vm/client.py",
    "imgstorage/messaging.py", "imgstorage/protocol.py",
    "imgstorage/nas/handlers.py", "imgstorage/vm/handlers.py",
}
HAND_WRITTEN = re.compile(r"""["']action["']\s*:\s*["']|\bdict\(\s*action\s*=""")


def test_no_module_outside_the_clients_writes_a_request_by_hand():
    offenders = []
    for folder in ("imgstorage", "admin"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ALLOWED:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if HAND_WRITTEN.search(line):
                    offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == []


def test_the_hand_written_pattern_finds_what_it_must():
    assert HAND_WRITTEN.search('rpc.request(n, {"action": "ping"}, 2)')
    assert HAND_WRITTEN.search("m = {'action': 'list_dev'}")
    assert HAND_WRITTEN.search('dict(action="del_local", zvol=z)')
    assert not HAND_WRITTEN.search('body = {"action": action}')
