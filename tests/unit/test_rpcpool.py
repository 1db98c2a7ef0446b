"""A daemon's broker connections to other nodes: kept open between requests, never shared."""
from __future__ import annotations

from typing import List

import pytest

from imgstorage import messaging
from imgstorage.config import from_dict
from imgstorage.errors import BrokerUnavailable, RemoteError, RpcTimeout
from imgstorage.messaging import RpcPool


class FakeClient:
    """Stands in for RpcClient: one connection, answering as the test says."""

    made: List["FakeClient"] = []

    def __init__(self, config) -> None:
        self.config = config
        self.closed = False
        self.alive = True
        self.requests = 0
        FakeClient.made.append(self)

    def request(self, node, message, timeout):
        self.requests += 1
        what = message.get("answer")
        if what == "error":
            raise RemoteError(node, message["action"], "no such zvol", "not_found")
        if what == "timeout":
            raise RpcTimeout(node, timeout)
        if what == "broker":
            raise BrokerUnavailable("cannot reach the message broker")
        return {"status": "success"}

    def notify(self, node, message, timeout=None) -> None:
        self.requests += 1

    def keep_alive(self) -> bool:
        return self.alive

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool(monkeypatch):
    FakeClient.made = []
    monkeypatch.setattr(messaging, "RpcClient", FakeClient)
    clock = Clock()
    pool = RpcPool(from_dict({"name": "nas-0-0"}), keep=2, clock=clock)
    pool.clock_ = clock
    return pool


def ask(pool: RpcPool, answer: str = "ok") -> None:
    pool.request("compute-0-3", {"action": "ping", "answer": answer}, 5)


def test_one_connection_serves_request_after_request(pool):
    for _ in range(3):
        ask(pool)
    pool.notify("compute-0-3", {"action": "zvol_synced"})
    assert len(FakeClient.made) == 1 and FakeClient.made[0].requests == 4


def test_an_error_reply_keeps_the_connection(pool):
    with pytest.raises(RemoteError):
        ask(pool, "error")
    ask(pool)
    assert len(FakeClient.made) == 1


@pytest.mark.parametrize("answer", ["timeout", "broker"])
def test_a_connection_whose_request_failed_is_closed_not_reused(pool, answer):
    ask(pool)
    with pytest.raises((RpcTimeout, BrokerUnavailable)):
        ask(pool, answer)
    ask(pool)
    first, second = FakeClient.made
    assert first.closed and not second.closed


def test_threads_at_once_get_connections_of_their_own_and_only_keep_are_kept(pool):
    with pool.client() as a, pool.client() as b, pool.client() as c:
        assert len({id(a), id(b), id(c)}) == 3
    # c and b came back first and are kept; a found the pool full
    assert [rpc.closed for rpc in (a, b, c)] == [True, False, False]
    with pool.client() as again:
        assert again is b                           # the most recently given back


def test_an_unstarted_pool_does_not_reuse_a_connection_idle_too_long(pool):
    ask(pool)
    pool.clock_.now += RpcPool.IDLE + 1
    ask(pool)
    first, second = FakeClient.made
    assert first.closed and not second.closed


def test_a_started_pool_keeps_idle_connections_alive_and_lets_go_of_dead_or_unused_ones(pool):
    pool._keeper = object()                # as start() does, without the thread
    with pool.client(), pool.client():
        pass
    kept, dead = FakeClient.made
    dead.alive = False
    pool.clock_.now += RpcPool.IDLE + 1    # idle long, but served: still good
    pool._serve_idle()
    assert dead.closed and not kept.closed
    ask(pool)
    assert len(FakeClient.made) == 2 and kept.requests == 1
    pool.clock_.now += RpcPool.KEEP + 1
    pool._serve_idle()
    assert kept.closed


def test_closing_the_pool_closes_what_comes_back(pool):
    with pool.client() as rpc:
        pool.close()
    assert rpc.closed
