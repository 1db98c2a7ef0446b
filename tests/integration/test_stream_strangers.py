"""Strangers at a container's stream endpoint cannot get in nor hold up the NAS's transfer.

A sync-mode map whose copy is throttled; each time the container opens a
stream endpoint (the copy, then the periodic pulls) the test, reading the
container's log, freezes the NAS for a moment so that it is first at the
port: it holds idle connections open and tries wrong tokens, then lets the
NAS go on.  The transfer completes with every byte, the strangers were
refused or dropped, and the container's log says so.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import time
from typing import List, Optional

import pytest

from imgstorage.errors import DriverError
from imgstorage.transfer import SocketSink, new_token

from .sync_helpers import (FAST, MIB, NAS, do_writes, log_of, phase_writes, prepare_zvol,
                           set_zvolattr, sync_cluster_body, sync_map, unmap_and_check,
                           wait_local, wait_until)

ENDPOINT = re.compile(r"\]: (.+): stream endpoint listening on 127\.0\.0\.1:(\d+)$")
COPY_STARTS = re.compile(r"NAS->VM copy of strangers to \S+ started")
IDLE = 8
WRONG = 3


@pytest.fixture(scope="module")
def sync_cluster(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "strangers")


class LogTail:
    """New lines of a node's log as they are written, read as soon as they are there."""

    def __init__(self, path) -> None:
        self.fd = os.open(str(path), os.O_RDONLY)
        self.offset = os.fstat(self.fd).st_size
        self.partial = b""

    def close(self) -> None:
        os.close(self.fd)

    def lines(self) -> List[str]:
        data = os.pread(self.fd, 1 << 20, self.offset)
        self.offset += len(data)
        self.partial += data
        *done, self.partial = self.partial.split(b"\n")
        return [line.decode("utf-8", "replace") for line in done]

    def wait(self, pattern: "re.Pattern[str]", timeout: float) -> Optional["re.Match[str]"]:
        """The next line matching ``pattern``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                found = pattern.search(line)
                if found:
                    return found
            time.sleep(0.0002)
        return None


def try_connect(port: int) -> Optional[socket.socket]:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return None


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Strangers:
    """Idle connections and wrong tokens at one endpoint, while the NAS is frozen."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: List[socket.socket] = []
        self.refusals: List[str] = []

    def arrive(self) -> bool:
        """Whether they all reached the endpoint before the NAS got in."""
        for _ in range(IDLE):
            sock = try_connect(self.port)
            if sock is None:
                return False
            self.idle.append(sock)
        for _ in range(WRONG):
            with pytest.raises(DriverError) as caught:
                SocketSink.connect("127.0.0.1", self.port, new_token(), io_timeout=10)
            self.refusals.append(str(caught.value))
        return all("refused the connection" in text for text in self.refusals)

    def leave(self) -> None:
        for sock in self.idle:
            sock.close()


def test_strangers_at_the_endpoint_are_refused_and_the_copy_completes(sync_cluster):
    c, zvol, host = sync_cluster, "strangers", FAST
    rng = random.Random(4242)
    image, tail = prepare_zvol(c, zvol, host, 3 * MIB, seed=42)
    set_zvolattr(c, zvol, "uploadspeed", 300000)      # the copy takes about ten seconds
    set_zvolattr(c, zvol, "frequency", 2)             # then a pull every two seconds
    nas = c.procs[NAS]
    container_log, nas_log = LogTail(c.log_path(host)), LogTail(c.log_path(NAS))
    attacked: Optional[Strangers] = None
    what = None
    try:
        dev = sync_map(c, zvol, host)
        # The copy: frozen as it asks for the endpoint, the NAS cannot hear the answer
        # before the strangers are at the port.  Should the freeze come too early (before
        # the request left) or too late, the next endpoint, a pull's, is tried the same way.
        frozen = nas_log.wait(COPY_STARTS, timeout=60) is not None
        if frozen:
            os.kill(nas.pid, signal.SIGSTOP)
        for _ in range(20):
            opened = container_log.wait(ENDPOINT, timeout=2 if frozen else 60)
            if opened is None:
                assert frozen, "the container opened no stream endpoint"
                os.kill(nas.pid, signal.SIGCONT)
                frozen = False
                continue
            if not frozen:
                os.kill(nas.pid, signal.SIGSTOP)      # the NAS may not have connected yet
            strangers = Strangers(int(opened.group(2)))
            try:
                won = strangers.arrive()
            finally:
                os.kill(nas.pid, signal.SIGCONT)
                frozen = False
            if won:
                attacked, what = strangers, opened.group(1)
                break
            strangers.leave()
        assert attacked is not None, "never reached an endpoint before the NAS"
        # The NAS got in past the strangers still holding their connections;
        # once it did, they were let go and nothing listens there any more.
        assert all(closed_by_server(sock) for sock in attacked.idle)
        assert try_connect(attacked.port) is None
        do_writes(c, host, dev, image, phase_writes(rng, 4))
        wait_local(c, host, zvol)
        do_writes(c, host, dev, image, phase_writes(rng, 4))
    finally:
        os.kill(nas.pid, signal.SIGCONT)
        if attacked is not None:
            attacked.leave()
        container_log.close()
        nas_log.close()
    port = attacked.port
    assert len(attacked.refusals) == WRONG
    text = log_of(c, host)
    wrong = re.findall(rf"refused a stream connection from 127\.0\.0\.1:\d+ on port {port}: "
                       r"wrong token", text)
    assert len(wrong) == WRONG, text[-3000:]
    # Each idle stranger was dropped: when the NAS got in, or (on a slow machine) when
    # its handshake time ran out first.
    closed = re.search(rf"stream server on port {port} closed (\d+) connections that had not "
                       r"presented the token", text)
    timed_out = re.findall(rf"refused a stream connection from 127\.0\.0\.1:\d+ on port {port}: "
                           r"no token within", text)
    assert (int(closed.group(1)) if closed else 0) + len(timed_out) == IDLE, text[-3000:]
    # The transfer the strangers tried to hold up is the one that succeeded.
    start = text.index(f"{what}: stream endpoint listening on 127.0.0.1:{port}")
    ended = wait_until("the attacked transfer to end", lambda: re.search(
        rf"{re.escape(what)}(: \d+ bytes in| failed)", log_of(c, host)[start:]))
    assert ended.group(1) != " failed", log_of(c, host)[start:][-3000:]
    unmap_and_check(c, host, zvol, image, tail)      # every byte, on the NAS
