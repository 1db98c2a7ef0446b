"""The container's stream endpoints: where they listen, how many, and whose token."""
from __future__ import annotations

import socket
import time
from typing import Callable, List

import pytest

from imgstorage.config import Config
from imgstorage.errors import BusyError, DriverError, ValidationError
from imgstorage.messaging import Envelope
from imgstorage.transfer import SocketSink, SocketSource, pump
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm import streams


class Sink:
    def __init__(self) -> None:
        self.data = b""
        self.committed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


class Source:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = self.aborted = False

    def read(self, n: int) -> bytes:
        piece, self.data = self.data[:n], self.data[n:]
        return piece

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def config(**given) -> Config:
    values = dict(path="<test>", name="compute-0-0", stream_address="127.0.0.1")
    values.update(given)
    return Config(**values)


@pytest.fixture(autouse=True)
def fresh_slots(monkeypatch):
    """Each test counts its own streams, whatever else this process serves."""
    slots = streams.StreamSlots()
    monkeypatch.setattr(streams, "slots", slots)
    return slots


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_endpoint_listens_on_the_storage_address_by_default():
    cfg = config()
    assert cfg.stream_bind is None and streams.bind_address(cfg) == "127.0.0.1"
    sink = Sink()
    with streams.reserve(cfg) as slot:
        reply = slot.serve_receive(lambda: sink, "test copy")
    assert reply["address"] == "127.0.0.1" and len(reply["token"]) >= 43
    assert refused("127.0.0.2", reply["port"])           # not on every address
    pump(Source(b"bytes"), SocketSink.connect("127.0.0.1", reply["port"], reply["token"]))
    wait_for(lambda: sink.committed)
    assert sink.data == b"bytes"


def test_stream_bind_chooses_the_listening_address_and_the_answer_names_the_storage_one():
    cfg = config(stream_bind="127.0.0.2")
    source = Source(b"pulled bytes")
    with streams.reserve(cfg) as slot:
        reply = slot.serve_send(lambda: source, "test pull")
    assert reply["address"] == "127.0.0.1"
    assert refused("127.0.0.1", reply["port"])
    client = SocketSource.connect("127.0.0.2", reply["port"], reply["token"])
    sink = Sink()
    pump(client, sink)
    assert sink.data == b"pulled bytes" and sink.committed


def test_one_stream_more_than_max_streams_is_busy_until_one_ends(fresh_slots):
    cfg = config(max_streams=2)
    sinks: List[Sink] = [Sink(), Sink()]
    replies = []
    for sink in sinks:
        with streams.reserve(cfg) as slot:
            replies.append(slot.serve_receive(lambda sink=sink: sink, "test copy"))
    opened = []
    with pytest.raises(BusyError, match="max_streams is 2") as caught:
        with streams.reserve(cfg) as slot:
            slot.serve_receive(lambda: opened.append(1) or Sink(), "one too many")
    assert caught.value.code == "busy" and opened == [] and fresh_slots.open == 2
    # The slot is given back when the transfer ends, not before.
    client = SocketSink.connect("127.0.0.1", replies[0]["port"], replies[0]["token"])
    pump(Source(b"first"), client)
    wait_for(lambda: fresh_slots.open == 1)
    with streams.reserve(cfg) as slot:
        reply = slot.serve_receive(lambda: Sink(), "now there is room")
    assert reply["port"] not in (r["port"] for r in replies)


def test_a_slot_is_given_back_whichever_way_opening_fails(fresh_slots):
    cfg = config(max_streams=1)

    def no_sink():
        raise DriverError("cannot receive: out of space")

    with pytest.raises(DriverError, match="out of space"):
        with streams.reserve(cfg) as slot:
            slot.serve_receive(no_sink, "test copy")
    assert fresh_slots.open == 0
    sink = Sink()
    with pytest.raises(DriverError, match="cannot listen"):
        with streams.reserve(config(max_streams=1, stream_bind="192.0.2.1")) as slot:
            slot.serve_receive(lambda: sink, "test copy")
    assert fresh_slots.open == 0 and sink.aborted
    with streams.reserve(cfg, wanted=False) as nothing:
        assert nothing is None and fresh_slots.open == 0


def test_a_slot_is_given_back_when_nobody_connects(fresh_slots, monkeypatch):
    monkeypatch.setattr(streams, "ACCEPT_TIMEOUT", 0.2)
    sink = Sink()
    with streams.reserve(config()) as slot:
        slot.serve_receive(lambda: sink, "test copy")
    wait_for(lambda: fresh_slots.open == 0)
    assert sink.aborted and not sink.committed


class NoService:
    """A handler that gets past field parsing has gone too far for these tests."""
    config = config()

    class drivers:
        zfs = None

    def __getattr__(self, name):
        raise AssertionError(f"the handler used the service ({name}) for a refused request")


def envelope(body: dict) -> Envelope:
    return Envelope(action=body["action"], body=body, message_id="m1", reply_to="q",
                    user_id="nas-0-0", deadline=None)


@pytest.mark.parametrize("body", [
    {"action": "recv_zvol", "zvol": "vol1", "token": "A" * 43},
    {"action": "recv_zvol", "zvol": "vol1", "stream": True, "token": "A" * 43},
    {"action": "send_zvol", "zvol": "vol1", "snap": "s1", "token": "A" * 43},
    {"action": "send_zvol", "zvol": "vol1", "snap": "s1", "stream": True, "token": None},
])
def test_a_requester_token_is_refused_with_one_clear_error(body, fresh_slots):
    handler = vm_handlers.build(NoService())[body["action"]]
    with pytest.raises(ValidationError, match='drawn by the container.*"stream": true') as caught:
        handler(envelope(body))
    assert caught.value.code == "invalid" and fresh_slots.open == 0


def test_a_stream_flag_that_is_not_a_truth_value_is_refused(fresh_slots):
    handler = vm_handlers.build(NoService())["recv_zvol"]
    with pytest.raises(ValidationError, match="invalid stream flag"):
        handler(envelope({"action": "recv_zvol", "zvol": "vol1", "stream": "please"}))
    assert fresh_slots.open == 0
