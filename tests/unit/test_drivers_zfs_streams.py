"""Snapshots and send/receive streams of the real ZFS drivers.

Commands that answer once are replayed from recorded zfs output.  Streams
need a live child: a small Runner puts a Python child in place of ``zfs``
(after recording the argv the driver built), and the child plays the
recorded exit status and stderr of the real tool around real bytes.
"""
from __future__ import annotations

import errno
import hashlib
import sys
import threading
import time
import types
from pathlib import Path
from typing import List

import pytest

from imgstorage.drivers.base import ByteSource
from imgstorage.drivers.zfs import (CommandSink, CommandSource, LibZfsCoreZfs, ReceiveMismatch,
                                    ZfsCli, is_receive_mismatch, parse_send_size, stream_error)
from imgstorage.errors import CommandError, DriverError, NotFoundError
from imgstorage.runner import Runner
from tests.unit.replay import ReplayRunner, load_fixture

VOL = "compute-0-1-0-vol"
NAME = f"tank/{VOL}"
S1 = "IMG-STORAGE-5f0c2a1e-8d4b-4c1e-9a7f-2b6d3e4f5a60"
S2 = "IMG-STORAGE-9b1d7c3a-2e4f-4a8b-b6c5-0d1e2f3a4b5c"
S3 = "IMG-STORAGE-c4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f70"
LIST_SNAPS = ["zfs", "list", "-Hp", "-t", "snapshot", "-o", "name", "-s", "creation", "-d", "1"]


def cli(runner) -> ZfsCli:
    return ZfsCli(runner, path_exists=lambda path: True)


# ---------------------------------------------------------------- snapshots
def test_snapshot_names_the_zvol_and_the_snapshot():
    runner = ReplayRunner().expect(["zfs", "snapshot", f"{NAME}@{S3}"], "zfs/snapshot_ok.txt")
    cli(runner).snapshot("tank", VOL, S3)
    runner.assert_all_used()


def test_snapshot_that_exists_reports_zfs_words():
    runner = ReplayRunner().expect(["zfs", "snapshot", f"{NAME}@{S3}"], "zfs/snapshot_exists.txt")
    with pytest.raises(CommandError, match="dataset already exists"):
        cli(runner).snapshot("tank", VOL, S3)


def test_snapshot_of_a_missing_zvol_is_not_found():
    runner = ReplayRunner().expect(["zfs", "snapshot", f"tank/nosuch@{S3}"],
                                   "zfs/snapshot_missing.txt")
    with pytest.raises(NotFoundError, match="zvol tank/nosuch does not exist"):
        cli(runner).snapshot("tank", "nosuch", S3)


def test_list_snapshots_oldest_first_with_short_names():
    runner = ReplayRunner().expect(LIST_SNAPS + [NAME], "zfs/list_snapshots.txt")
    assert cli(runner).list_snapshots("tank", VOL) == [S1, "before-upgrade", S2]


def test_list_snapshots_of_a_zvol_without_any():
    runner = ReplayRunner().expect(LIST_SNAPS + [NAME], "zfs/list_snapshots_none.txt")
    assert cli(runner).list_snapshots("tank", VOL) == []


def test_list_snapshots_of_a_missing_zvol_is_not_an_empty_list():
    runner = ReplayRunner().expect(LIST_SNAPS + ["tank/nosuch"], "zfs/list_snapshots_missing.txt")
    with pytest.raises(NotFoundError, match="tank/nosuch"):
        cli(runner).list_snapshots("tank", "nosuch")


def test_list_snapshots_ignores_lines_of_other_datasets():
    runner = ReplayRunner().expect(LIST_SNAPS + ["tank/v"],
                                   stdout="tank/v@a\ntank/v-temp-write@x\ntank/v@b\n")
    assert cli(runner).list_snapshots("tank", "v") == ["a", "b"]


def test_destroy_snapshot_destroys_exactly_that_snapshot():
    runner = ReplayRunner().expect(["zfs", "destroy", f"{NAME}@{S1}"],
                                   "zfs/destroy_snapshot_ok.txt")
    cli(runner).destroy_snapshot("tank", VOL, S1)
    assert runner.argvs == [["zfs", "destroy", f"{NAME}@{S1}"]]


def test_destroy_of_a_missing_snapshot_is_not_found():
    runner = ReplayRunner().expect(["zfs", "destroy", f"{NAME}@nosuch"],
                                   "zfs/destroy_snapshot_missing.txt")
    with pytest.raises(NotFoundError, match=f"snapshot {NAME}@nosuch does not exist"):
        cli(runner).destroy_snapshot("tank", VOL, "nosuch")


def test_destroy_of_a_held_snapshot_reports_why():
    runner = ReplayRunner().expect(["zfs", "destroy", f"{NAME}@{S1}"],
                                   "zfs/destroy_snapshot_busy.txt")
    with pytest.raises(CommandError, match="dataset is busy"):
        cli(runner).destroy_snapshot("tank", VOL, S1)


# --------------------------------------------------------------- send size
def test_send_size_of_a_full_stream_reads_the_size_line():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", f"{NAME}@{S1}"],
                                   "zfs/send_size_full.txt")
    assert cli(runner).send_size("tank", VOL, S1) == 4831838208


def test_send_size_of_an_incremental_stream_takes_the_total():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-I", f"@{S1}", f"{NAME}@{S2}"],
                                   "zfs/send_size_incremental.txt")
    assert cli(runner).send_size("tank", VOL, S2, base=S1) == 212655640


def test_send_size_of_a_missing_snapshot_is_not_found():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", f"{NAME}@nosuch"],
                                   "zfs/send_size_missing.txt")
    with pytest.raises(NotFoundError, match=f"cannot open '{NAME}@nosuch'"):
        cli(runner).send_size("tank", VOL, "nosuch")


def test_send_size_from_a_destroyed_base_names_the_base():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-I", "@gone", f"{NAME}@{S2}"],
                                   "zfs/send_size_missing_base.txt")
    with pytest.raises(NotFoundError, match=f"'{NAME}@gone'"):
        cli(runner).send_size("tank", VOL, S2, base="gone")


def test_send_size_without_a_total_line_sums_the_streams():
    assert parse_send_size("incremental\ta\ttank/v@b\t100\nincremental\tb\ttank/v@c\t23\n") == 123
    assert parse_send_size("full\ttank/v@a\t4096\n") == 4096


def test_send_size_found_on_stderr_when_stdout_is_empty():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "tank/v@a"],
                                   stderr="full\ttank/v@a\t8192\nsize\t8192\n")
    assert cli(runner).send_size("tank", "v", "a") == 8192


def test_send_size_without_any_estimate_is_an_error():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "tank/v@a"], stdout="garbage\n")
    with pytest.raises(DriverError, match="printed no size estimate"):
        cli(runner).send_size("tank", "v", "a")


# ------------------------------------------------------ error classification
@pytest.mark.parametrize("fixture", ["zfs/receive_mismatch.txt", "zfs/receive_has_snapshots.txt"])
def test_receive_refusals_that_need_a_full_stream_are_mismatches(fixture):
    rec = load_fixture(fixture)
    err = stream_error(["zfs", "receive", "-F", NAME], rec.returncode, rec.stderr)
    assert isinstance(err, ReceiveMismatch) and isinstance(err, CommandError)
    assert rec.stderr.splitlines()[0] in str(err)


def test_modified_destination_message_spans_two_lines_and_is_still_a_mismatch():
    stderr = (f"cannot receive incremental stream: destination {NAME} has been modified\n"
              "since most recent snapshot\n")
    assert isinstance(stream_error(["zfs", "receive", NAME], 1, stderr), ReceiveMismatch)


def test_a_mismatch_is_recognised_after_crossing_a_socket_by_its_words():
    rec = load_fixture("zfs/receive_mismatch.txt")
    relayed = DriverError(f"10.1.1.3:40000 could not store the stream: `zfs receive -F {NAME}` "
                          f"failed (exit 1): {rec.stderr.strip()}")
    assert is_receive_mismatch(relayed)
    assert is_receive_mismatch(stream_error(["zfs"], 1, rec.stderr))
    assert not is_receive_mismatch(DriverError("cannot receive: failed to read from stream"))


@pytest.mark.parametrize("fixture", ["zfs/receive_truncated.txt", "zfs/receive_no_pool.txt",
                                     "zfs/send_missing.txt"])
def test_other_stream_failures_are_plain_command_errors(fixture):
    rec = load_fixture(fixture)
    err = stream_error(["zfs"], rec.returncode, rec.stderr)
    assert type(err) is CommandError
    assert rec.stderr.strip().splitlines()[-1] in str(err)


# ----------------------------------------------------------- live streams
PRODUCER = r"""
import os, sys
size, stderr_file, code, noise = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if noise:
    sys.stderr.write("x" * noise)   # far more than a pipe holds
    sys.stderr.flush()
block = bytes(range(256)) * 256
left = size
while left:
    piece = block[:min(left, len(block))]
    sys.stdout.buffer.write(piece)
    left -= len(piece)
sys.stdout.buffer.flush()
if stderr_file != "-":
    sys.stderr.write(open(stderr_file).read())
sys.exit(code)
"""

FOREVER_PRODUCER = r"""
import sys
while True:
    sys.stdout.buffer.write(b"z" * 65536)
"""

CONSUMER = r"""
import hashlib, os, sys
out, stderr_file, code, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
digest, total = hashlib.sha256(), 0
while limit < 0 or total < limit:
    data = sys.stdin.buffer.read1(65536)
    if not data:
        break
    digest.update(data)
    total += len(data)
if stderr_file != "-":
    sys.stderr.write(open(stderr_file).read())
if code == 0:
    # like zfs receive: the result exists only once the whole stream arrived
    with open(out, "w") as f:
        f.write("%d %s" % (total, digest.hexdigest()))
sys.exit(code)
"""


class ChildRunner(Runner):
    """Records the argv a driver built and runs a Python child in its place."""

    def __init__(self, script: str, *args: object) -> None:
        self.script = script
        self.args = [str(a) for a in args]
        self.argvs: List[List[str]] = []
        self.procs = []

    def popen(self, argv, **kwargs):
        self.argvs.append([str(a) for a in argv])
        proc = super().popen([sys.executable, "-c", self.script, *self.args], **kwargs)
        self.procs.append(proc)
        return proc


def stderr_of(fixture: str, tmp_path: Path) -> str:
    path = tmp_path / (Path(fixture).stem + ".stderr")
    path.write_text(load_fixture(fixture).stderr)
    return str(path)


def read_all(source: ByteSource, n: int = 1 << 20) -> bytes:
    parts = []
    while True:
        data = source.read(n)
        if not data:
            return b"".join(parts)
        parts.append(data)


def pattern(size: int) -> bytes:
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


def test_send_streams_the_full_snapshot_and_closes_cleanly():
    runner = ChildRunner(PRODUCER, 3 << 20, "-", 0, 0)
    source = cli(runner).send("tank", VOL, S1)
    assert isinstance(source, CommandSource)
    assert read_all(source) == pattern(3 << 20)
    source.close()
    assert runner.argvs == [["zfs", "send", f"{NAME}@{S1}"]]


def test_incremental_send_uses_capital_i_from_the_base():
    runner = ChildRunner(PRODUCER, 10, "-", 0, 0)
    source = cli(runner).send("tank", VOL, S2, base=S1)
    read_all(source)
    source.close()
    assert runner.argvs == [["zfs", "send", "-I", f"@{S1}", f"{NAME}@{S2}"]]


def test_send_failure_surfaces_at_close_with_zfs_stderr(tmp_path):
    runner = ChildRunner(PRODUCER, 0, stderr_of("zfs/send_missing.txt", tmp_path), 1, 0)
    source = cli(runner).send("tank", VOL, "nosuch")
    assert read_all(source) == b""
    with pytest.raises(CommandError) as err:
        source.close()
    assert err.value.argv == ["zfs", "send", f"{NAME}@nosuch"]
    assert f"cannot open '{NAME}@nosuch': dataset does not exist" in str(err.value)
    assert err.value.returncode == 1


def test_a_chatty_producer_cannot_deadlock_on_stderr():
    runner = ChildRunner(PRODUCER, 2 << 20, "-", 0, 1 << 20)
    source = cli(runner).send("tank", VOL, S1)
    result = {}

    def consume():
        result["data"] = read_all(source)
        source.close()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        source.abort()
        pytest.fail("the stream stalled behind a full stderr pipe")
    assert len(result["data"]) == 2 << 20


def test_aborting_a_send_kills_the_producer():
    runner = ChildRunner(FOREVER_PRODUCER)
    source = cli(runner).send("tank", VOL, S1)
    assert source.read(4096)
    started = time.monotonic()
    source.abort()
    source.abort()   # twice is harmless
    assert time.monotonic() - started < 10
    assert runner.procs[0].poll() is not None


def test_closing_a_send_before_its_end_is_an_error():
    runner = ChildRunner(FOREVER_PRODUCER)
    source = cli(runner).send("tank", VOL, S1)
    source.read(4096)
    with pytest.raises(CommandError):
        source.close()


def test_receive_feeds_stdin_and_commits_at_close(tmp_path):
    out = tmp_path / "received"
    runner = ChildRunner(CONSUMER, out, "-", 0, -1)
    sink = cli(runner).receive("tank", VOL)
    assert isinstance(sink, CommandSink)
    data = pattern(5 << 20)
    for start in range(0, len(data), 1 << 20):
        sink.write(data[start:start + (1 << 20)])
    sink.close()
    assert runner.argvs == [["zfs", "receive", "-F", NAME]]
    assert out.read_text() == f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def test_receive_refusing_the_incremental_raises_a_mismatch_at_close(tmp_path):
    runner = ChildRunner(CONSUMER, tmp_path / "r", stderr_of("zfs/receive_mismatch.txt", tmp_path),
                         1, -1)
    sink = cli(runner).receive("tank", VOL)
    sink.write(b"stream" * 1000)
    with pytest.raises(ReceiveMismatch) as err:
        sink.close()
    assert "most recent snapshot of tank/compute-0-1-0-vol does not match incremental source" \
        in str(err.value)
    assert err.value.argv == ["zfs", "receive", "-F", NAME]


def test_receive_that_quits_early_reports_its_reason_not_a_broken_pipe(tmp_path):
    runner = ChildRunner(CONSUMER, tmp_path / "r",
                         stderr_of("zfs/receive_has_snapshots.txt", tmp_path), 1, 1000)
    sink = cli(runner).receive("tank", VOL)
    with pytest.raises(ReceiveMismatch, match="destination has snapshots"):
        for _ in range(64):
            sink.write(b"\0" * (1 << 20))
        sink.close()
    sink.abort()   # what pump does next: harmless


def test_truncated_stream_is_a_command_error(tmp_path):
    runner = ChildRunner(CONSUMER, tmp_path / "r", stderr_of("zfs/receive_truncated.txt", tmp_path),
                         1, -1)
    sink = cli(runner).receive("tank", VOL)
    sink.write(b"half a record")
    with pytest.raises(CommandError, match="failed to read from stream"):
        sink.close()


def test_aborting_a_receive_leaves_nothing_committed(tmp_path):
    out = tmp_path / "received"
    runner = ChildRunner(CONSUMER, out, "-", 0, -1)
    sink = cli(runner).receive("tank", VOL)
    sink.write(b"partial")
    sink.abort()
    assert runner.procs[0].poll() is not None
    assert not out.exists()
    with pytest.raises(DriverError, match="already closed"):
        sink.write(b"more")


def test_a_node_without_zfs_fails_like_a_missing_command():
    class Missing(Runner):
        def popen(self, argv, **kwargs):
            return super().popen(["no-such-zfs-imgstorage", *argv[1:]], **kwargs)

    with pytest.raises(CommandError, match="command not found"):
        cli(Missing()).send("tank", VOL, S1)


# ------------------------------------------------------------- libzfs_core
class FakeZFSError(Exception):
    def __init__(self, code: int, errors=None) -> None:
        self.errno = code
        self.errors = errors or []
        super().__init__(f"[Errno {code}]")


def fake_lzc(*, snapshot_error=None, destroy_error=None, existing=()):
    calls = []

    def lzc_snapshot(snaps, props=None):
        calls.append(("snapshot", list(snaps)))
        if snapshot_error is not None:
            raise snapshot_error

    def lzc_destroy_snaps(snaps, defer):
        calls.append(("destroy_snaps", list(snaps), defer))
        if destroy_error is not None:
            raise destroy_error

    def lzc_exists(name):
        calls.append(("exists", name))
        return name in existing

    return types.SimpleNamespace(lzc_snapshot=lzc_snapshot, lzc_destroy_snaps=lzc_destroy_snaps,
                                 lzc_exists=lzc_exists, calls=calls,
                                 exceptions=types.SimpleNamespace(ZFSError=FakeZFSError))


def lzc_driver(runner, lzc) -> LibZfsCoreZfs:
    return LibZfsCoreZfs(runner, lzc, path_exists=lambda path: True)


def test_lzc_snapshots_directly():
    lzc = fake_lzc()
    runner = ReplayRunner()
    lzc_driver(runner, lzc).snapshot("tank", "v", "s")
    assert lzc.calls == [("snapshot", [b"tank/v@s"])]
    assert runner.calls == []


def test_lzc_snapshot_errors_read_like_the_command():
    batch = FakeZFSError(errno.EEXIST, [FakeZFSError(errno.EEXIST)])
    with pytest.raises(DriverError, match="cannot create snapshot 'tank/v@s': dataset already exists"):
        lzc_driver(ReplayRunner(), fake_lzc(snapshot_error=batch)).snapshot("tank", "v", "s")
    batch = FakeZFSError(errno.ENOENT, [FakeZFSError(errno.ENOENT)])
    with pytest.raises(NotFoundError, match="zvol tank/v does not exist"):
        lzc_driver(ReplayRunner(), fake_lzc(snapshot_error=batch)).snapshot("tank", "v", "s")


def test_lzc_destroys_an_existing_snapshot():
    lzc = fake_lzc(existing=(b"tank/v@s",))
    lzc_driver(ReplayRunner(), lzc).destroy_snapshot("tank", "v", "s")
    assert ("destroy_snaps", [b"tank/v@s"], False) in lzc.calls


def test_lzc_destroy_of_a_missing_snapshot_is_not_found_not_silent():
    lzc = fake_lzc()
    with pytest.raises(NotFoundError, match="snapshot tank/v@s does not exist"):
        lzc_driver(ReplayRunner(), lzc).destroy_snapshot("tank", "v", "s")
    assert not any(call[0] == "destroy_snaps" for call in lzc.calls)


def test_lzc_destroy_of_a_held_snapshot():
    lzc = fake_lzc(existing=(b"tank/v@s",),
                   destroy_error=FakeZFSError(errno.EBUSY, [FakeZFSError(errno.EBUSY)]))
    with pytest.raises(DriverError, match="cannot destroy snapshot tank/v@s: dataset is busy"):
        lzc_driver(ReplayRunner(), lzc).destroy_snapshot("tank", "v", "s")


def test_lzc_driver_lists_and_streams_through_the_command():
    runner = ReplayRunner().expect(LIST_SNAPS + [NAME], "zfs/list_snapshots.txt")
    assert lzc_driver(runner, fake_lzc()).list_snapshots("tank", VOL)[-1] == S2
