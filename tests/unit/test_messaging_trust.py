"""Whom the messaging layer trusts: replies, reply_to, replies sent to request queues, limits."""
import threading
import time
from types import SimpleNamespace

import pytest

from imgstorage import protocol
from imgstorage.config import from_dict
from imgstorage.daemon import Daemon, SeenMessages
from imgstorage.messaging import (DIRECT_REPLY_TO, REPLY_HEADER, Consumer, RpcClient,
                                  capped_deadline)


def props(**kw):
    base = dict(reply_to=DIRECT_REPLY_TO + ".g2dkZXI=", message_id="m1", user_id="nas-0-0",
                correlation_id=None, headers=None)
    base.update(kw)
    return SimpleNamespace(**base)


def method(tag=1):
    return SimpleNamespace(delivery_tag=tag, redelivered=False)


# ----------------------------------------------------------------- replies a caller takes
def client(user="frontend"):
    cfg = from_dict({"name": "nas-0-0",
                     "broker_url": f"amqp://{user}:pw@127.0.0.1:5672/%2F"})
    rpc = RpcClient(cfg)
    rpc._asked["id-1"] = "compute-0-3"
    return rpc


REPLY = protocol.encode({"action": "dev_list", "status": "success", "body": {}})


def test_a_reply_from_the_node_asked_is_taken():
    rpc = client()
    rpc._on_reply(None, None, props(correlation_id="id-1", user_id="compute-0-3"), REPLY)
    assert rpc._replies["id-1"]["status"] == "success"


def test_a_reply_from_the_callers_own_user_is_taken():
    # a setup where every node shares one broker user
    rpc = client(user="guest")
    rpc._on_reply(None, None, props(correlation_id="id-1", user_id="guest"), REPLY)
    assert "id-1" in rpc._replies


@pytest.mark.parametrize("user,cid", [("vm-container-0-14", "id-1"), (None, "id-1"),
                                      ("compute-0-3", "id-2"), ("compute-0-3", None)])
def test_any_other_reply_is_dropped_and_the_call_keeps_waiting(user, cid, caplog):
    rpc = client()
    rpc._on_reply(None, None, props(correlation_id=cid, user_id=user), REPLY)
    assert rpc._replies == {}
    assert "dropped a reply" in caplog.text


# ----------------------------------------------------------------- what a daemon executes
class Recorder:
    def __init__(self):
        self.dispatched, self.acked = [], []


def consumer(**cfg):
    rec = Recorder()
    c = Consumer(from_dict({"name": "compute-0-3", **cfg}),
                 lambda env, responder, err: rec.dispatched.append((env, err)))
    def answer(generation, tag, reply_to, correlation_id, message):
        assert message is None, message          # dropped: acknowledged, never answered
        rec.acked.append(tag)
    c.answer = answer
    return c, rec


BODY = protocol.encode({"action": "clean_zvol", "zvol": "vol1"})


def test_a_request_with_a_direct_reply_to_is_dispatched():
    c, rec = consumer()
    c._on_message(None, method(), props(), BODY)
    assert len(rec.dispatched) == 1 and rec.dispatched[0][0].action == "clean_zvol"


@pytest.mark.parametrize("reply_to", ["nas-0-0", "compute-0-3", "amq.gen-abc", "amq.rabbitmq"])
def test_a_request_whose_reply_to_is_a_queue_is_refused_unrun(reply_to, caplog):
    c, rec = consumer()
    c._on_message(None, method(7), props(reply_to=reply_to), BODY)
    assert rec.dispatched == [] and rec.acked == [7]
    assert "is not a direct reply-to address" in caplog.text


@pytest.mark.parametrize("extra", [{"correlation_id": "abc"}, {"headers": {REPLY_HEADER: 1}}])
def test_a_reply_arriving_on_a_node_queue_is_dropped(extra, caplog):
    c, rec = consumer()
    c._on_message(None, method(3), props(**extra), BODY)
    assert rec.dispatched == [] and rec.acked == [3]
    assert "replies are never executed" in caplog.text


def test_a_notification_without_reply_to_is_dispatched():
    c, rec = consumer()
    c._on_message(None, method(), props(reply_to=None), BODY)
    assert len(rec.dispatched) == 1


# ----------------------------------------------------------------- limits
def test_a_requests_deadline_is_capped_at_the_nodes_maximum():
    now = 1000.0
    far = {"x-deadline-ms": int((now + 86400) * 1000), "x-timeout-ms": 86400 * 1000}
    assert capped_deadline(far, now, 3600) == pytest.approx(now + 3600)
    near = {"x-timeout-ms": 20000}
    assert capped_deadline(near, now, 3600) == pytest.approx(now + 20)
    assert capped_deadline({}, now, 3600) is None


def test_the_daemon_applies_its_max_request_time():
    c, rec = consumer(max_request_time=60)
    headers = {"x-deadline-ms": int((time.time() + 86400) * 1000), "x-timeout-ms": 86400000}
    c._on_message(None, method(), props(headers=headers), BODY)
    env = rec.dispatched[0][0]
    assert env.deadline - env.received == pytest.approx(60)


def test_remembered_replies_are_bounded_in_bytes():
    seen = SeenMessages(size=1000, max_bytes=10_000)
    big = {"action": "zvol_list", "status": "success", "body": "x" * 3000}
    for i in range(5):
        assert seen.check(f"id{i}") is None
        seen.finish(f"id{i}", big)
    assert seen.bytes <= 10_000
    assert seen.check("id4") == big                # the newest is kept
    assert seen.check("id0") is None               # the oldest was forgotten
    assert seen.bytes == sum(e.cost for e in seen._ids.values())


def test_one_reply_larger_than_the_bound_is_not_kept():
    seen = SeenMessages(max_bytes=100)
    seen.check("a")
    seen.finish("a", {"body": "y" * 500})
    assert seen.bytes == 0 and seen.check("a") is None


# ----------------------------------------------------------------- a copy of a running request
from .test_daemon import FakeResponder  # noqa: E402  (one fake for both files)


def test_a_copy_of_a_running_request_gets_its_answer_when_it_finishes():
    release, started, calls = threading.Event(), threading.Event(), []

    def handler(env):
        calls.append(env.message_id)
        started.set()
        assert release.wait(30)
        return {"action": "zvol_mapped", "status": "success"}

    from imgstorage.messaging import Envelope
    d = Daemon(from_dict({"name": "nas-0-0"}), {"map_zvol": handler})

    def env():
        return Envelope(action="map_zvol", body={"action": "map_zvol"}, message_id="m1",
                        reply_to=DIRECT_REPLY_TO, user_id="guest", deadline=None)
    first, copy, late = FakeResponder(), FakeResponder(), FakeResponder()
    d.dispatch(env(), first, None)
    assert started.wait(30)
    d.dispatch(env(), copy, None)
    assert copy.replies == [] and copy.done_calls == 0     # waits for the first copy
    release.set()
    d.work_pool.shutdown(wait=True)
    d.dispatch(env(), late, None)
    assert calls == ["m1"]
    for r in (first, copy, late):
        assert r.replies == [{"action": "zvol_mapped", "status": "success"}]
        assert r.done_calls == 1


# ----------------------------------------------------------------- several brokers
def test_when_no_broker_answers_the_error_names_them_all_in_one_line():
    from imgstorage.errors import BrokerUnavailable
    from imgstorage.messaging import connect_any
    cfg = from_dict({"name": "nas-0-0", "broker_url": "amqp://u:p@127.0.0.1:1/%2F,"
                                                      "amqp://u:p@127.0.0.1:2/%2F"})
    with pytest.raises(BrokerUnavailable) as err:
        connect_any(cfg)
    text = str(err.value)
    assert text.startswith("cannot reach any message broker of the cluster: 127.0.0.1:1 ")
    assert "; 127.0.0.1:2 unreachable" in text and "\n" not in text


def test_one_unreachable_broker_keeps_its_short_message():
    from imgstorage.errors import BrokerUnavailable
    from imgstorage.messaging import connect_any
    cfg = from_dict({"name": "nas-0-0", "broker_url": "amqp://u:p@127.0.0.1:1/%2F"})
    with pytest.raises(BrokerUnavailable, match=r"^cannot reach the message broker at 127\.0\.0\.1:1"):
        connect_any(cfg)
