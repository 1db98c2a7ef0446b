"""pump, Progress, the one-time-token TCP transport and the ssh transport.

Everything runs in-process: in-memory sources and sinks, real sockets on
127.0.0.1, and for ssh a runner that records the argv and starts a harmless
child instead.  The throttle test is the only one that measures time,
because holding a rate is the requirement itself.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Callable, List, Optional

import pytest

from imgstorage.drivers.zfs import CommandSink, CommandSource
from imgstorage.errors import DriverError, ImgStorageError, ValidationError
from imgstorage.runner import Runner
from imgstorage.transfer import (CHUNK, Progress, SocketSink, SocketSource, StreamServer,
                                 TransferCancelled, frames, new_token, pump, ssh_sink,
                                 ssh_source)
from imgstorage.transfer.tcp import receive_buffer_for

PAYLOAD = bytes(range(256)) * 4096 * 3          # 3 MiB


class MemorySource:
    def __init__(self, data: bytes, *, piece: Optional[int] = None,
                 fail_after: Optional[int] = None, close_error: Optional[Exception] = None,
                 on_read: Optional[Callable[[int], None]] = None) -> None:
        self.data = data
        self.pos = 0
        self.piece = piece
        self.fail_after = fail_after
        self.close_error = close_error
        self.on_read = on_read
        self.closed = self.aborted = False

    def read(self, n: int) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise DriverError("`zfs send` failed: I/O error")
        if self.on_read is not None:
            self.on_read(self.pos)
        n = min(n, self.piece or n)
        data = self.data[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error

    def abort(self) -> None:
        self.aborted = True


class MemorySink:
    def __init__(self, *, fail_after: Optional[int] = None,
                 close_error: Optional[Exception] = None,
                 on_write: Optional[Callable[[int], None]] = None) -> None:
        self.parts: List[bytes] = []
        self.size = 0
        self.fail_after = fail_after
        self.close_error = close_error
        self.on_write = on_write
        self.committed = self.aborted = self.closed = False

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and self.size >= self.fail_after:
            raise DriverError("`zfs receive` failed: out of space")
        self.parts.append(bytes(data))
        self.size += len(data)
        if self.on_write is not None:
            self.on_write(self.size)

    def close(self) -> None:
        self.closed = True
        if self.close_error is not None:
            raise self.close_error
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def in_thread(target: Callable[[], object]):
    """Run ``target`` in a thread; return a function that joins and yields its outcome."""
    box = {}

    def run():
        try:
            box["result"] = target()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def outcome(timeout: float = 20.0):
        thread.join(timeout)
        assert not thread.is_alive(), "the serving side did not finish"
        return box.get("result"), box.get("error")

    return outcome


# ----------------------------------------------------------------- progress
def test_progress_rate_covers_only_the_recent_window():
    clock = FakeClock()
    progress = Progress(total=1000, window=5.0, clock=clock, wall=lambda: 1700000000.0)
    for _ in range(10):          # 10 s at 10 B/s
        clock.now += 1
        progress.add(10)
    for _ in range(10):          # then 10 s at 50 B/s
        clock.now += 1
        progress.add(50)
    assert progress.rate() == pytest.approx(50, rel=0.05)
    assert progress.done == 600
    assert progress.percent() == pytest.approx(60.0)
    assert progress.eta() == pytest.approx(8.0, rel=0.1)


def test_progress_rate_falls_to_zero_when_stalled():
    clock = FakeClock()
    progress = Progress(clock=clock)
    clock.now += 1
    progress.add(1000)
    clock.now += 30
    assert progress.rate() == 0.0
    assert progress.percent() is None and progress.eta() is None


def test_finished_progress_reports_the_overall_rate_and_a_full_bar():
    clock = FakeClock()
    progress = Progress(total=5000, clock=clock, wall=lambda: 1700000000.0)
    clock.now += 4
    progress.add(4000)       # the estimate was high; still 100 % once done
    progress.finish()
    clock.now += 100
    assert progress.rate() == pytest.approx(1000)
    assert progress.percent() == 100.0
    snap = progress.snapshot()
    assert snap == {"total": 5000, "done": 4000, "started": 1700000000.0,
                    "finished": 1700000000.0, "error": None, "rate": 1000,
                    "percent": 100.0, "eta": 0}


def test_failed_progress_keeps_its_error_and_real_percentage():
    progress = Progress(total=1000)
    progress.add(250)
    progress.finish(error="boom")
    progress.finish()            # the first ending wins
    assert progress.error == "boom" and progress.percent() == 25.0


def test_progress_counts_exactly_under_concurrent_adds():
    progress = Progress()
    threads = [threading.Thread(target=lambda: [progress.add(3) for _ in range(5000)])
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.done == 60000


# --------------------------------------------------------------------- pump
def test_pump_copies_everything_and_commits():
    source, sink, progress = MemorySource(PAYLOAD, piece=70000), MemorySink(), Progress(len(PAYLOAD))
    assert pump(source, sink, progress=progress, cancel=threading.Event()) == len(PAYLOAD)
    assert sink.data == PAYLOAD
    assert source.closed and sink.committed and not source.aborted and not sink.aborted
    assert progress.done == len(PAYLOAD) and progress.finished and progress.percent() == 100.0


def test_pump_of_an_empty_stream_still_closes_both_sides():
    source, sink = MemorySource(b""), MemorySink()
    assert pump(source, sink) == 0
    assert source.closed and sink.committed


def test_pump_honours_the_chunk_size():
    sizes = []
    sink = MemorySink(on_write=lambda total: sizes.append(total))
    pump(MemorySource(PAYLOAD), sink, chunk=1 << 16)
    assert sizes[0] == 1 << 16 and len(sizes) == len(PAYLOAD) // (1 << 16)


def test_throttle_holds_the_average_rate_without_a_burst_at_start():
    rate = 2_000_000
    data = bytes(4_000_000)
    writes = []
    started = time.monotonic()
    sink = MemorySink(on_write=lambda total: writes.append((time.monotonic() - started, total)))
    pump(MemorySource(data), sink, rate_limit=rate, progress=Progress(), cancel=threading.Event())
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed <= 2.6, elapsed
    # At no moment ahead of the limit by more than one chunk.
    for at, total in writes:
        assert total <= rate * at + CHUNK, (at, total)
    assert sink.data == data


def test_cancel_between_chunks_aborts_both_sides():
    cancel = threading.Event()
    source = MemorySource(PAYLOAD, piece=4096)
    sink = MemorySink(on_write=lambda total: cancel.set() if total >= 100_000 else None)
    progress = Progress()
    with pytest.raises(TransferCancelled) as err:
        pump(source, sink, progress=progress, cancel=cancel)
    assert isinstance(err.value, ImgStorageError) and "cancelled" in str(err.value)
    assert source.aborted and sink.aborted
    assert not source.closed and not sink.committed
    assert progress.error and progress.finished


def test_cancel_interrupts_a_throttle_wait_at_once():
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(TransferCancelled):
        pump(MemorySource(PAYLOAD), MemorySink(), rate_limit=1000, cancel=cancel)
    assert time.monotonic() - started < 1.5
    timer.cancel()


def test_a_failing_source_aborts_the_sink():
    source, sink = MemorySource(PAYLOAD, piece=65536, fail_after=200_000), MemorySink()
    with pytest.raises(DriverError, match="I/O error"):
        pump(source, sink)
    assert sink.aborted and not sink.committed and source.aborted


def test_a_failing_sink_aborts_the_source():
    source, sink = MemorySource(PAYLOAD), MemorySink(fail_after=1 << 20)
    with pytest.raises(DriverError, match="out of space"):
        pump(source, sink)
    assert source.aborted and not source.closed and sink.aborted


def test_a_producer_failing_at_close_keeps_the_sink_from_committing():
    source = MemorySource(PAYLOAD, close_error=DriverError("`zfs send` failed (exit 1)"))
    sink = MemorySink()
    with pytest.raises(DriverError, match="zfs send"):
        pump(source, sink)
    assert sink.aborted and not sink.closed


def test_a_sink_refusing_to_commit_propagates():
    source = MemorySource(PAYLOAD)
    sink = MemorySink(close_error=DriverError("cannot receive incremental stream"))
    progress = Progress()
    with pytest.raises(DriverError, match="cannot receive incremental stream"):
        pump(source, sink, progress=progress)
    assert source.closed and not source.aborted
    assert progress.error == "cannot receive incremental stream"


def test_sinks_that_can_be_told_why_are_told():
    class TellingSink(MemorySink):
        reason = None

        def fail(self, message: str) -> None:
            self.reason = message

    sink = TellingSink()
    with pytest.raises(DriverError):
        pump(MemorySource(PAYLOAD, fail_after=0), sink)
    assert sink.reason == "`zfs send` failed: I/O error" and not sink.aborted


# ---------------------------------------------------------------------- TCP
def open_server(timeout: float = 10.0, **options):
    server = StreamServer.open("127.0.0.1", timeout, **options)
    return server, server.token


def test_tokens_are_long_and_single_use_material():
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 43


def test_each_server_draws_its_own_token():
    first, _ = open_server()
    second, _ = open_server()
    try:
        assert first.token != second.token and len(first.token) >= 43
        with pytest.raises(TypeError):
            StreamServer.open("127.0.0.1", first.token, 10.0)   # no way to hand one in
    finally:
        first.close()
        second.close()


def test_the_listener_is_bound_to_the_given_address_only():
    server, _ = open_server()
    try:
        assert server.host == "127.0.0.1"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", server.port), timeout=5).close()
    finally:
        server.close()


def _idle(port: int) -> socket.socket:
    """A stranger that connects and says nothing."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


def test_idle_and_wrong_token_strangers_never_hold_up_the_peer():
    # Strangers would hold a one-at-a-time server for their whole (here very
    # long) handshake time; the peer's own patience is far shorter than that.
    server, token = open_server(timeout=60, hello_timeout=600)
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    idle = [_idle(server.port) for _ in range(8)]
    for _ in range(3):
        with pytest.raises(DriverError, match="refused the connection"):
            SocketSink.connect("127.0.0.1", server.port, new_token(), io_timeout=30)
    half = _idle(server.port)
    half.sendall(frames.hello(token)[:20])           # part of the right hello, never the rest
    assert all(_still_open(sock) for sock in idle + [half])   # all still held open...
    client = SocketSink.connect("127.0.0.1", server.port, token, io_timeout=30)  # ...meanwhile
    pump(MemorySource(PAYLOAD), client)
    result, error = outcome()
    assert error is None and result == len(PAYLOAD) and received.data == PAYLOAD
    assert received.committed
    # The first right one won: the strangers are let go and nothing listens any more.
    assert all(_closed_by_server(sock) for sock in idle + [half])
    with pytest.raises(ConnectionRefusedError):
        _idle(server.port)
    assert server.refused == 3 + len(idle) + 1


def test_closing_the_server_ends_a_waiting_accept():
    server, _ = open_server(timeout=600)
    outcome = in_thread(server.accept)
    wait_for(lambda: server._used)
    server.close()
    result, error = outcome()
    assert isinstance(error, DriverError) and "was closed" in str(error)


def test_a_connection_that_presents_no_token_in_time_is_closed():
    server, token = open_server(timeout=60, hello_timeout=0.2)
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    idle = _idle(server.port)
    assert _closed_by_server(idle)
    wait_for(lambda: server.refused == 1)
    client = SocketSink.connect("127.0.0.1", server.port, token)
    pump(MemorySource(b"payload"), client)
    assert outcome()[1] is None and received.data == b"payload"


def test_waiting_handshakes_are_bounded_and_the_oldest_go_first():
    server, token = open_server(timeout=60, hello_timeout=600, max_handshakes=4)
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    idle = []
    for n in range(10):
        idle.append(_idle(server.port))
        # connections are taken in order; each newcomer past four drops the oldest
        wait_for(lambda: server.refused == max(0, n + 1 - 4))
    assert all(_closed_by_server(sock) for sock in idle[:6])
    assert all(_still_open(sock) for sock in idle[6:])
    client = SocketSink.connect("127.0.0.1", server.port, token)
    pump(MemorySource(PAYLOAD), client)
    result, error = outcome()
    assert error is None and received.data == PAYLOAD


def test_upload_round_trip_commits_and_reports_ok():
    server, token = open_server()
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    client = SocketSink.connect("127.0.0.1", server.port, token)
    progress = Progress(len(PAYLOAD))
    assert pump(MemorySource(PAYLOAD), client, progress=progress) == len(PAYLOAD)
    result, error = outcome()
    assert error is None and result == len(PAYLOAD)
    assert received.committed and received.data == PAYLOAD


def test_pull_round_trip_reads_the_served_stream():
    server, token = open_server()
    served = MemorySource(PAYLOAD, piece=100_000)
    outcome = in_thread(lambda: server.serve_from(served))
    client = SocketSource.connect("127.0.0.1", server.port, token)
    sink = MemorySink()
    assert pump(client, sink) == len(PAYLOAD)
    result, error = outcome()
    assert error is None and result == len(PAYLOAD)
    assert sink.committed and sink.data == PAYLOAD and served.closed


def test_a_throttled_reader_bounds_its_receive_buffer():
    """A reader limited to 800 kB/s asks the kernel for a quarter second of buffer, not
    the tens of MiB Linux would grow it to (the sender would 'finish' far ahead)."""
    assert receive_buffer_for(None) is None and receive_buffer_for(0) is None
    assert receive_buffer_for(800_000) == 200_000
    assert receive_buffer_for(1000) == 64 * 1024
    assert receive_buffer_for(10 ** 10) == 4 * 1024 * 1024
    server, token = open_server()
    outcome = in_thread(lambda: server.serve_from(MemorySource(PAYLOAD)))
    client = SocketSource.connect("127.0.0.1", server.port, token, rate=800_000)
    granted = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert 200_000 <= granted <= 2 * 200_000          # Linux reports twice what was asked
    sink = MemorySink()
    assert pump(client, sink) == len(PAYLOAD) and sink.data == PAYLOAD
    assert outcome()[1] is None


def test_wrong_token_is_refused_and_the_right_one_still_gets_in():
    server, token = open_server()
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    with pytest.raises(DriverError, match="refused the connection"):
        SocketSink.connect("127.0.0.1", server.port, new_token())
    client = SocketSink.connect("127.0.0.1", server.port, token)
    pump(MemorySource(b"payload"), client)
    assert outcome()[1] is None and received.data == b"payload"


def test_only_one_connection_is_ever_admitted():
    server, token = open_server()
    outcome = in_thread(lambda: server.serve_into(MemorySink()))
    client = SocketSink.connect("127.0.0.1", server.port, token)
    with pytest.raises(DriverError, match="cannot connect|refused"):
        SocketSink.connect("127.0.0.1", server.port, token, connect_timeout=2, io_timeout=2)
    client.close()
    assert outcome()[1] is None


def test_nobody_connecting_times_out_and_aborts_the_sink():
    server, _ = open_server(timeout=0.3)
    sink = MemorySink()
    with pytest.raises(DriverError, match="within 0.3 s"):
        server.serve_into(sink)
    assert sink.aborted


def test_serving_can_be_cancelled_while_waiting_for_the_peer():
    server, _ = open_server(timeout=30)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    source = MemorySource(PAYLOAD)
    started = time.monotonic()
    with pytest.raises(TransferCancelled):
        server.serve_from(source, cancel=cancel)
    assert time.monotonic() - started < 3 and source.aborted


def test_receiver_refusing_to_commit_reaches_the_senders_close():
    server, token = open_server()
    refusing = MemorySink(close_error=DriverError(
        "cannot receive incremental stream: most recent snapshot of tank/v does not match "
        "incremental source"))
    outcome = in_thread(lambda: server.serve_into(refusing))
    client = SocketSink.connect("127.0.0.1", server.port, token)
    with pytest.raises(DriverError) as err:
        pump(MemorySource(PAYLOAD), client)
    assert "could not store the stream" in str(err.value)
    assert "does not match incremental source" in str(err.value)
    assert isinstance(outcome()[1], DriverError)


def test_receiver_failing_mid_stream_stops_the_sender_with_its_reason():
    server, token = open_server()
    outcome = in_thread(lambda: server.serve_into(MemorySink(fail_after=100_000)))
    client = SocketSink.connect("127.0.0.1", server.port, token)
    source = MemorySource(PAYLOAD * 8, piece=65536)
    with pytest.raises(DriverError, match="out of space"):
        pump(source, client)
    assert source.aborted
    assert isinstance(outcome()[1], DriverError)


def test_sender_failing_mid_stream_leaves_the_receiver_uncommitted():
    server, token = open_server()
    received = MemorySink()
    outcome = in_thread(lambda: server.serve_into(received))
    client = SocketSink.connect("127.0.0.1", server.port, token)
    with pytest.raises(DriverError, match="I/O error"):
        pump(MemorySource(PAYLOAD, piece=65536, fail_after=300_000), client)
    _, error = outcome()
    assert isinstance(error, DriverError) and "I/O error" in str(error)
    assert received.aborted and not received.committed


def test_producer_error_reaches_the_puller_as_an_error_frame():
    server, token = open_server()
    failing = MemorySource(PAYLOAD, close_error=DriverError(
        "`zfs send tank/v@s` failed (exit 1): cannot open 'tank/v@s': dataset does not exist"))
    outcome = in_thread(lambda: server.serve_from(failing))
    client = SocketSource.connect("127.0.0.1", server.port, token)
    sink = MemorySink()
    with pytest.raises(DriverError, match="dataset does not exist") as err:
        pump(client, sink)
    assert "failed" in str(err.value)
    assert sink.aborted and not sink.committed
    assert isinstance(outcome()[1], DriverError)


def raw_server(behaviour: Callable[[socket.socket], None]):
    """A server whose side of the stream is written by hand, to break the protocol."""
    server, token = open_server()

    def serve():
        conn, _ = server.accept()
        try:
            behaviour(conn)
        finally:
            conn.close()

    return server, token, in_thread(serve)


@pytest.mark.parametrize("raw", [
    frames.FRAME.pack(b"D", 1000) + b"x" * 400,                     # cut inside a frame
    frames.FRAME.pack(b"D", 5) + b"hello",                          # no end frame
    frames.FRAME.pack(b"D", 5) + b"hello" + b"\x00\x00",            # cut inside a header
])
def test_truncated_pull_is_detected(raw):
    server, token, outcome = raw_server(lambda conn: conn.sendall(raw))
    client = SocketSource.connect("127.0.0.1", server.port, token)
    sink = MemorySink()
    with pytest.raises(DriverError, match="ended early"):
        pump(client, sink)
    assert sink.aborted and not sink.committed
    outcome()


def test_garbled_pull_is_refused():
    server, token, outcome = raw_server(
        lambda conn: conn.sendall(frames.FRAME.pack(b"Q", 3) + b"abc"))
    client = SocketSource.connect("127.0.0.1", server.port, token)
    with pytest.raises(DriverError, match="garbled"):
        pump(client, MemorySink())
    outcome()


def test_closing_a_pull_before_the_end_is_an_error():
    server, token = open_server()
    outcome = in_thread(lambda: server.serve_from(MemorySource(PAYLOAD)))
    client = SocketSource.connect("127.0.0.1", server.port, token)
    client.read(1000)
    with pytest.raises(DriverError, match="before its end"):
        client.close()
    outcome()


def test_silent_peer_times_out_instead_of_hanging():
    server, token, outcome = raw_server(lambda conn: time.sleep(1.0))
    client = SocketSource.connect("127.0.0.1", server.port, token, io_timeout=0.3)
    with pytest.raises(DriverError, match="timed out"):
        client.read(100)
    client.abort()
    outcome()


def test_connecting_to_nothing_fails_cleanly():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(DriverError, match="cannot connect"):
        SocketSink.connect("127.0.0.1", port, new_token())


@pytest.mark.parametrize("token", ["", "has space", "x" * 60, "caf\u00e9"])
def test_unusable_tokens_are_rejected_before_connecting(token):
    server, _ = open_server()
    try:
        with pytest.raises(ValidationError):
            SocketSink.connect("127.0.0.1", server.port, token)
    finally:
        server.close()


# ---------------------------------------------------------------------- ssh
class SshRunner(Runner):
    """Records the ssh argv; runs a local child that plays the remote zfs."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.argvs: List[List[str]] = []

    def popen(self, argv, **kwargs):
        self.argvs.append(list(argv))
        return super().popen([sys.executable, "-c", self.script], **kwargs)


SSH_PREFIX = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "img-storage@compute-0-3"]


def test_ssh_source_runs_an_incremental_send_remotely():
    runner = SshRunner("import sys; sys.stdout.buffer.write(b'stream-bytes')")
    source = ssh_source(runner, "img-storage", "compute-0-3", "tank", "vm-1-vol",
                        "IMG-STORAGE-b", "IMG-STORAGE-a")
    assert isinstance(source, CommandSource)
    sink = MemorySink()
    pump(source, sink)
    assert sink.data == b"stream-bytes"
    assert runner.argvs == [SSH_PREFIX + ["zfs", "send", "-I", "@IMG-STORAGE-a",
                                          "tank/vm-1-vol@IMG-STORAGE-b"]]


def test_ssh_source_full_send():
    runner = SshRunner("pass")
    source = ssh_source(runner, "img-storage", "compute-0-3", "tank", "v", "s", None)
    source.abort()
    assert runner.argvs == [SSH_PREFIX + ["zfs", "send", "tank/v@s"]]


def test_ssh_sink_runs_receive_remotely_and_reports_its_failure():
    runner = SshRunner(
        "import sys; sys.stdin.buffer.read(); "
        "sys.stderr.write('cannot receive incremental stream: most recent snapshot of ssd/v "
        "does not match incremental source\\n'); sys.exit(1)")
    sink = ssh_sink(runner, "img-storage", "compute-0-3", "ssd", "v")
    assert isinstance(sink, CommandSink)
    with pytest.raises(DriverError, match="does not match incremental source"):
        pump(MemorySource(PAYLOAD), sink)
    assert runner.argvs == [SSH_PREFIX + ["zfs", "receive", "-F", "ssd/v"]]


def test_remote_words_are_quoted_for_the_remote_shell():
    runner = SshRunner("pass")
    ssh_source(runner, "u", "h", "tank", "a b;reboot", "s$(id)").abort()
    assert runner.argvs[0][-1] == "'tank/a b;reboot@s$(id)'"


@pytest.mark.parametrize("user,host", [("-oProxyCommand=x", "h"), ("u", "-h"), ("u", "a@b"),
                                       ("", "h"), ("u", "h x")])
def test_ssh_refuses_destinations_that_ssh_would_misread(user, host):
    runner = SshRunner("pass")
    with pytest.raises(ValidationError):
        ssh_sink(runner, user, host, "tank", "v")
    assert runner.argvs == []


def test_a_source_returning_more_than_asked_cannot_stall_the_throttle():
    class Greedy(MemorySource):
        def read(self, n: int) -> bytes:
            return super().read(n * 4)

    started = time.monotonic()
    sink = MemorySink()
    pump(Greedy(bytes(400_000)), sink, rate_limit=1_000_000)
    assert sink.size == 400_000 and time.monotonic() - started < 2


def test_a_server_that_never_answers_times_out_the_connect():
    server, token = open_server()     # listening, but nobody accepts
    with pytest.raises(DriverError, match="timed out waiting for the stream server"):
        SocketSink.connect("127.0.0.1", server.port, token, io_timeout=0.3)
    server.close()
