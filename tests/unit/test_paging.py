"""Listings in pages: the node's page builder, the caller's page walker, the size limits."""
from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

from imgstorage import paging, protocol
from imgstorage.errors import ImgStorageError, ValidationError
from imgstorage.paging import Page, PageRequest


def rows(n: int, pad: int = 0) -> List[Dict[str, Any]]:
    return [{"zvol": f"vol-{i:05d}", "state": "unmapped", "pad": "x" * pad} for i in range(n)]


def keyed(items):
    return [(r["zvol"], r) for r in items]


# ------------------------------------------------------------------ limits
def test_requests_and_replies_have_their_own_limits():
    assert protocol.MAX_REQUEST == 64 * 1024 and protocol.MAX_REPLY == 1024 * 1024
    big = protocol.encode({"action": "zvol_list", "body": rows(1000, pad=200)})
    assert protocol.MAX_REQUEST < len(big) < protocol.MAX_REPLY
    with pytest.raises(ValidationError, match=f"at most {protocol.MAX_REQUEST}"):
        protocol.decode(big)                              # a request this big is refused
    assert len(protocol.decode(big, protocol.MAX_REPLY)["body"]) == 1000
    huge = protocol.encode({"action": "zvol_list", "body": rows(4000, pad=300)})
    with pytest.raises(ValidationError, match=f"at most {protocol.MAX_REPLY}"):
        protocol.decode(huge, protocol.MAX_REPLY)


def test_an_oversized_reply_becomes_an_error_the_caller_can_read():
    message = protocol.success("list_dev", body={"x": "y" * protocol.MAX_REPLY})
    err = protocol.oversized(message, len(protocol.encode(message)))
    assert err["status"] == "error" and err["action"] == "dev_list"
    assert f"more than the {protocol.MAX_REPLY}" in err["error"]
    assert len(protocol.encode(err)) < 300


def test_a_whole_large_nas_fits_one_page_of_compact_rows():
    """1000 mapped zvols with the project's own names, as list_zvols sends them."""
    iqn = "iqn.2001-04.com.nas-0-0-"
    listing = [{"zvol": f"compute-0-{i}-0-vol", "zpool": "tank", "state": "mapped",
                "lifecycle": "mapped", "iscsi_target": f"{iqn}compute-0-{i}-0-vol",
                "remotehost": f"vm-container-0-{i % 40}", "size": 36} for i in range(1000)]
    page = paging.take(sorted(keyed(listing)), PageRequest())
    assert not page.more and len(page.items) == 1000
    assert protocol.encoded_size(listing) < paging.PAGE_BYTES


# ------------------------------------------------------------- page_request
def test_page_request_fields_are_checked():
    assert paging.page_request({"action": "list_zvols"}) == PageRequest(None, None)
    assert paging.page_request({"after": "vol-1", "limit": "20"}) == PageRequest("vol-1", 20)
    for bad, text in (({"limit": 0}, "at least 1"), ({"limit": "many"}, "whole number"),
                      ({"limit": True}, "whole number"),
                      ({"limit": paging.MAX_LIMIT + 1}, "at most"),
                      ({"after": "../etc"}, "invalid zvol name"), ({"after": 5}, "zvol name")):
        with pytest.raises(ValidationError, match=text):
            paging.page_request(bad)


# --------------------------------------------------------------------- take
def test_take_without_paging_fields_returns_everything_that_fits():
    page = paging.take(keyed(rows(50)), PageRequest())
    assert [k for k, _ in page.items] == [f"vol-{i:05d}" for i in range(50)]
    assert page.reply_fields() == {"more": False}


def test_take_stops_at_the_limit_and_says_where_to_go_on():
    page = paging.take(keyed(rows(10)), PageRequest(limit=4))
    assert [k for k, _ in page.items] == ["vol-00000", "vol-00001", "vol-00002", "vol-00003"]
    assert page.reply_fields() == {"more": True, "next": "vol-00003"}
    page = paging.take(keyed(rows(10)), PageRequest(after="vol-00007", limit=4))
    assert [k for k, _ in page.items] == ["vol-00008", "vol-00009"]
    assert page.reply_fields() == {"more": False}
    exact = paging.take(keyed(rows(4)), PageRequest(limit=4))
    assert len(exact.items) == 4 and not exact.more


def test_take_stops_before_the_byte_budget():
    items = keyed(rows(100, pad=100))
    one = protocol.encoded_size(items[0][1]) + protocol.encoded_size(items[0][0]) + 4
    page = paging.take(items, PageRequest(), budget=10 * one + 2)
    assert len(page.items) == 10 and page.next == "vol-00009"
    page = paging.take(items, PageRequest(), budget=10 * one + 1)
    assert len(page.items) == 9


def test_take_always_moves_on_even_when_one_item_is_over_the_budget():
    page = paging.take(keyed(rows(3, pad=500)), PageRequest(), budget=100)
    assert [k for k, _ in page.items] == ["vol-00000"] and page.more


def test_walking_pages_lists_every_item_once_and_the_pages_fit_a_reply():
    items = keyed(rows(3000, pad=400))
    assert protocol.encoded_size([r for _, r in items]) > protocol.MAX_REPLY
    seen, cursor, pages = [], None, 0
    while True:
        page = paging.take(items, PageRequest(after=cursor))
        reply = protocol.success("list_zvols", body=[r for _, r in page.items],
                                 **page.reply_fields())
        assert len(protocol.encode(reply)) <= protocol.MAX_REPLY
        pages += 1
        seen.extend(k for k, _ in page.items)
        if not page.more:
            break
        cursor = page.next
    assert pages == 2 and seen == [k for k, _ in items]


# ---------------------------------------------------------------- fetch_all
class FakeNode:
    """Answers list requests from a fixed listing, in pages of ``per_page`` items."""

    def __init__(self, listing, per_page: int, as_dict: bool = False):
        self.items = sorted(keyed(listing))
        self.per_page = per_page
        self.as_dict = as_dict
        self.asked: List[Dict[str, Any]] = []

    def __call__(self, message):
        self.asked.append(message)
        page = paging.take(self.items, PageRequest(message.get("after"), self.per_page))
        body = dict(page.items) if self.as_dict else [r for _, r in page.items]
        return {"status": "success", "body": body, **page.reply_fields()}


def malformed():
    return ImgStorageError("nas-0-0 sent a malformed zvol list")


def test_fetch_all_follows_the_pages_to_the_end():
    node = FakeNode(rows(25), per_page=10)
    got = paging.fetch_all(node, {"action": "list_zvols"}, keyed=False, malformed=malformed)
    assert [r["zvol"] for r in got] == [f"vol-{i:05d}" for i in range(25)]
    assert node.asked == [{"action": "list_zvols"},
                          {"action": "list_zvols", "after": "vol-00009"},
                          {"action": "list_zvols", "after": "vol-00019"}]


def test_fetch_all_of_a_keyed_listing():
    node = FakeNode(rows(7), per_page=3, as_dict=True)
    got = paging.fetch_all(node, {"action": "list_dev"}, keyed=True, malformed=malformed)
    assert sorted(got) == [f"vol-{i:05d}" for i in range(7)] and len(node.asked) == 3


def test_fetch_all_of_a_node_that_does_not_page_is_one_request():
    """A node of an earlier release answers without ``more``: its listing is whole."""
    calls = []

    def old_node(message):
        calls.append(message)
        return {"status": "success", "body": rows(3)}
    got = paging.fetch_all(old_node, {"action": "list_zvols"}, keyed=False, malformed=malformed)
    assert len(got) == 3 and calls == [{"action": "list_zvols"}]


@pytest.mark.parametrize("replies", [
    # a next that does not move on would ask forever
    [{"body": [{"zvol": "a"}], "more": True, "next": "a"},
     {"body": [{"zvol": "a"}], "more": True, "next": "a"}],
    # a page that goes back before the cursor
    [{"body": [{"zvol": "b"}], "more": True, "next": "b"}, {"body": [{"zvol": "a"}]}],
    # more follows, but no place to go on from
    [{"body": [{"zvol": "a"}], "more": True}],
    [{"body": [{"zvol": "a"}], "more": True, "next": 7}],
    [{"body": [], "more": True, "next": "a"}],
    # next is not the last key of the page
    [{"body": [{"zvol": "a"}, {"zvol": "c"}], "more": True, "next": "b"}],
    [{"body": [{"no": "zvol"}], "more": True, "next": "a"}],
    [{"body": {"not": "a list"}}],
    [{"body": ["text"]}],
])
def test_fetch_all_refuses_a_broken_paging_with_one_error(replies):
    answers = iter(replies)
    with pytest.raises(ImgStorageError, match="malformed zvol list"):
        paging.fetch_all(lambda m: next(answers), {"action": "list_zvols"}, keyed=False,
                         malformed=malformed)


def test_fetch_all_gives_up_on_a_listing_that_never_ends(monkeypatch):
    monkeypatch.setattr(paging, "MAX_PAGES", 5)
    counter = iter(range(10 ** 6))

    def endless(message):
        key = f"vol-{next(counter):07d}"
        return {"body": [{"zvol": key}], "more": True, "next": key}
    with pytest.raises(ImgStorageError, match="malformed"):
        paging.fetch_all(endless, {"action": "list_zvols"}, keyed=False, malformed=malformed)


def test_page_reply_fields_round_trip_through_json():
    page = Page([("a", {"zvol": "a"})], more=True)
    assert json.loads(json.dumps(page.reply_fields())) == {"more": True, "next": "a"}


# ------------------------------------------------- a daemon's oversized reply
class _Channel:
    def __init__(self):
        self.published = []

    def basic_publish(self, exchange, routing_key, body, properties):
        self.published.append(body)

    def basic_ack(self, delivery_tag):
        self.published.append(("ack", delivery_tag))


class _Connection:
    def add_callback_threadsafe(self, fn):
        fn()


def _consumer():
    from imgstorage.config import from_dict
    from imgstorage.messaging import Consumer
    consumer = Consumer(from_dict({"name": "nas-0-0", "broker_url": "amqp://u:p@h:5672/v"}),
                        dispatch=lambda *a: None)
    consumer._conn, consumer._channel = _Connection(), _Channel()
    consumer._reply_channel = lambda: consumer._channel   # replies have a connection of their own
    return consumer


def test_a_daemon_answers_an_error_instead_of_a_reply_nobody_could_read(caplog):
    consumer = _consumer()
    big = protocol.success("list_dev", body={"x": {"pad": "y" * protocol.MAX_REPLY}})
    consumer.answer(consumer._generation, 7, "reply-queue", "id-1", big)
    sent = consumer._channel.published
    assert len(sent) == 2 and len(sent[0]) < 1000 and sent[1] == ("ack", 7)  # answered, then acked
    reply = protocol.decode(sent[0], protocol.MAX_REPLY)
    assert reply["status"] == "error" and "more than the" in reply["error"]
    assert "over the 1048576 bytes a reply may carry" in caplog.text


def test_a_reply_within_the_limit_is_sent_as_it_is():
    consumer = _consumer()
    listing = protocol.success("list_zvols", body=rows(2000, pad=200), more=False)
    consumer.answer(consumer._generation, 8, "reply-queue", "id-2", listing)
    assert protocol.decode(consumer._channel.published[0], protocol.MAX_REPLY) == listing
    assert consumer._channel.published[1:] == [("ack", 8)]


def test_a_request_without_an_answer_is_only_acknowledged():
    consumer = _consumer()
    consumer.answer(consumer._generation, 9, None, "id-3", protocol.success("ping"))
    consumer.answer(consumer._generation, 10, "reply-queue", "id-4", None)
    assert consumer._channel.published == [("ack", 9), ("ack", 10)]
