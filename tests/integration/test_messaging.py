"""The wire protocol against real daemons on the real broker, without the CLI."""
from __future__ import annotations

import time

import pika
import pytest

from imgstorage.config import from_dict
from imgstorage.errors import MessagingError, NoSuchNode, RpcTimeout
from imgstorage.messaging import DIRECT_REPLY_TO, RpcClient, connect


def test_ping_every_node(rpc, daemons):
    for node in daemons.nas + daemons.containers:
        reply = rpc.request(node, {"action": "ping"}, timeout=10)
        assert reply["node"] == node


def test_unroutable_node_fails_at_once(rpc):
    started = time.monotonic()
    with pytest.raises(NoSuchNode, match="no such node: nas-9-9"):
        rpc.call("nas-9-9", {"action": "list_zvols"}, timeout=30)
    assert time.monotonic() - started < 10  # not the 30 s timeout


def test_a_request_the_broker_refuses_fails_at_once_with_its_reason(daemons):
    """A request is not confirmed before its answer is awaited: a refusal (here a
    ``user_id`` that is not the connection's) must still end it, not its timeout."""
    import json

    class Claiming:
        """The frontend's configuration, claiming to publish as another user."""
        broker_user = "someone-else"

        def __init__(self, config):
            self._config = config

        def __getattr__(self, name):
            return getattr(self._config, name)

    cfg = from_dict(json.loads(daemons.config_path("frontend").read_text()))
    with RpcClient(Claiming(cfg)) as impostor:
        with pytest.raises(MessagingError, match="refused the request to nas-0-0: "
                                                 "PRECONDITION_FAILED") as caught:
            impostor.request("nas-0-0", {"action": "ping"}, timeout=120)
    assert not isinstance(caught.value, RpcTimeout)


def test_node_with_queue_but_no_daemon_times_out_naming_it(rpc, daemons):
    ch = rpc._open()
    ch.queue_declare(queue="ghost-0-0", durable=False, auto_delete=True)
    ch.queue_bind(queue="ghost-0-0", exchange=daemons_exchange(), routing_key="ghost-0-0")
    with pytest.raises(RpcTimeout, match="node ghost-0-0 did not answer within 1 s"):
        rpc.call("ghost-0-0", {"action": "list_zvols"}, timeout=1)
    # the request carried an expiration: the broker dropped it, nothing waits in the queue
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        declared = ch.queue_declare(queue="ghost-0-0", passive=True)
        if declared.method.message_count == 0:
            break
        time.sleep(0.1)
    assert declared.method.message_count == 0


def daemons_exchange() -> str:
    return "rocks.vm-manage"


def raw_call(cfg, node: str, body: bytes, timeout: float = 10) -> dict:
    """Publish raw bytes (not necessarily JSON) and wait for the reply."""
    import json
    conn = connect(cfg)
    try:
        ch = conn.channel()
        replies = []
        ch.basic_consume(DIRECT_REPLY_TO, lambda c, m, p, b: replies.append(b), auto_ack=True)
        ch.basic_publish("rocks.vm-manage", node, body,
                         pika.BasicProperties(reply_to=DIRECT_REPLY_TO, message_id="raw-1"))
        deadline = time.monotonic() + timeout
        while not replies and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        assert replies, "no reply"
        return json.loads(replies[0])
    finally:
        conn.close()


@pytest.mark.parametrize("node", ["nas-0-0", "compute-0-3"])
@pytest.mark.parametrize("body,text", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"action": "format_disk"}', "unknown action: format_disk"),
    (b'{"action": "map_zvol", "zvol": "../etc", "zpool": "tank", "remotehost": "compute-0-3", "size": 1}',
     "invalid zvol name"),
    (b'{"action": "map_zvol", "zvol": "v", "zpool": "tank", "remotehost": "compute-0-3", "size": -1}',
     None),
])
def test_bad_messages_get_an_error_reply_and_the_daemon_lives(rpc, daemons, node, body, text):
    reply = raw_call(rpc.config, node, body)
    assert reply["status"] == "error"
    if text:
        assert text in reply["error"]
    assert rpc.request(node, {"action": "ping"}, timeout=10)["status"] == "success"


def test_map_and_unmap_through_messages(rpc, daemons):
    reply = rpc.request("nas-0-0", {"action": "map_zvol", "zvol": "msgvol", "zpool": "tank",
                                    "remotehost": "compute-0-3", "size": 1}, timeout=30)
    assert reply["action"] == "zvol_mapped" and reply["bdev"].startswith("/dev/sd")
    rows = rpc.request("nas-0-0", {"action": "list_zvols"}, timeout=10)["body"]
    row = next(r for r in rows if r["zvol"] == "msgvol")
    assert (row["state"], row["remotehost"]) == ("mapped", "compute-0-3")
    assert row["iscsi_target"] == "iqn.2001-04.com.nas-0-0-msgvol"
    dev = rpc.request("compute-0-3", {"action": "list_dev"}, timeout=10)["body"]
    assert dev["msgvol"]["bdev"] == reply["bdev"].rsplit("/", 1)[-1]
    out = rpc.request("nas-0-0", {"action": "unmap_zvol", "zvol": "msgvol"}, timeout=30)
    assert out["action"] == "zvol_unmapped"
    rows = rpc.request("nas-0-0", {"action": "list_zvols"}, timeout=10)["body"]
    assert next(r for r in rows if r["zvol"] == "msgvol")["state"] == "unmapped"
    assert "msgvol" not in rpc.request("compute-0-3", {"action": "list_dev"}, timeout=10)["body"]


def publish_raw(cfg, node: str, message: dict, **props) -> None:
    """A request as a hostile client would shape it, published with confirms."""
    import json
    conn = connect(cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("rocks.vm-manage", node, json.dumps(message).encode(),
                         pika.BasicProperties(**props), mandatory=True)
    finally:
        conn.close()


def wait_for_log(daemons, node: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemons.log_path(node).read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{node} never logged {text!r}"
        time.sleep(0.1)


def zvols(rpc) -> list:
    return [r["zvol"] for r in rpc.request("nas-0-0", {"action": "list_zvols"}, timeout=10)["body"]]


MAP_RT = {"action": "map_zvol", "zvol": "replytovol", "zpool": "tank",
          "remotehost": "compute-0-3", "size": 1}


def test_a_request_whose_reply_to_is_a_queue_is_not_run(rpc, daemons):
    publish_raw(rpc.config, "nas-0-0", MAP_RT, reply_to="compute-0-3", message_id="rt-1")
    wait_for_log(daemons, "nas-0-0", "'compute-0-3' is not a direct reply-to address")
    assert "replytovol" not in zvols(rpc)


@pytest.mark.parametrize("props", [{"correlation_id": "c-1"},
                                   {"headers": {"x-imgstorage-reply": 1}}])
def test_a_reply_sent_to_a_node_queue_is_never_executed(rpc, daemons, props):
    before = daemons.log_path("nas-0-0").read_text(errors="replace").count(
        "replies are never executed")
    publish_raw(rpc.config, "nas-0-0", MAP_RT, **props)
    deadline = time.monotonic() + 20
    while daemons.log_path("nas-0-0").read_text(errors="replace").count(
            "replies are never executed") == before:
        assert time.monotonic() < deadline, "the reply was not dropped"
        time.sleep(0.1)
    assert "replytovol" not in zvols(rpc)


def test_every_reply_carries_the_answering_nodes_user_and_the_reply_mark(rpc, daemons):
    conn = connect(rpc.config)
    try:
        ch = conn.channel()
        got = []
        ch.basic_consume(DIRECT_REPLY_TO, lambda c, m, p, b: got.append(p), auto_ack=True)
        ch.basic_publish("rocks.vm-manage", "compute-0-3", b'{"action": "ping"}',
                         pika.BasicProperties(reply_to=DIRECT_REPLY_TO, message_id="mark-1"))
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.2)
        assert got, "no reply"
        assert got[0].user_id == "guest" and got[0].correlation_id == "mark-1"
        assert got[0].headers == {"x-imgstorage-reply": 1}
    finally:
        conn.close()


@pytest.fixture
def node_user(daemons, vhost):
    """A broker user with a node's rights: configure nothing, write the exchange, read its queue."""
    import subprocess
    import uuid
    name, password = f"lonely-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(["rabbitmqctl", "-q", "add_user", name, password], check=True,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, name, "^$",
                    "^(rocks\\.vm-manage|amq\\.default)$", f"^{name}$"], check=True,
                   capture_output=True)
    yield name, password
    subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True)


def test_a_node_that_may_not_create_its_missing_queue_says_what_to_run(rpc, node_user, caplog):
    import threading

    from imgstorage.config import from_dict
    from imgstorage.messaging import Consumer, RpcClient, declare_node_queues
    name, password = node_user
    url = rpc.config.broker_url.replace("guest:guest", f"{name}:{password}")
    received = []

    def dispatch(env, responder, err):
        received.append(env.action)
        responder.done()
    consumer = Consumer(from_dict({"name": name, "broker_url": url}), dispatch)
    thread = threading.Thread(target=consumer.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        wanted = (f"queue {name} does not exist on the message broker at 127.0.0.1:5672 and this "
                  f"user may not create it: run `rocks sync host imgstorage {name}` on the frontend")
        while wanted not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
        assert not consumer.connected.is_set()
        # once the administrator declared it, the node consumes it without declaring anything
        declare_node_queues(rpc.config, [name])
        assert consumer.connected.wait(30)
        # and a caller with the same narrow rights sends without declaring the exchange
        with RpcClient(from_dict({"name": name, "broker_url": url})) as own:
            own.notify(name, {"action": "ping"}, timeout=10)
        while not received:
            assert time.monotonic() < deadline + 40, "the node never received its request"
            time.sleep(0.1)
        assert received == ["ping"]
    finally:
        consumer.stop()
        thread.join(30)
