"""Simulated ``zfs hold``, ``zfs receive -s`` and ``zfs send -t``.

A resumable receive cut anywhere (a short stream, an abort, a SIGKILL of the
receiving process) and then resumed, once or several times, must end exactly
where an uninterrupted receive ends: same bytes, same holes, same snapshots.
"""
import base64
import gc
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from imgstorage.drivers.base import HOLD_TAG
from imgstorage.drivers.sim import blockdev, sendrecv, snapshots, stream, zfs
from imgstorage.errors import DriverError, NotResumableError, ValidationError

from .test_sim_streams import data_blocks

KIB, MIB = 1 << 10, 1 << 20
BLOCK = zfs.VOLBLOCKSIZE
SIZE = 4 * MIB                                     # 32 blocks
NBLOCKS = SIZE // BLOCK
REPO = Path(__file__).resolve().parents[2]
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,4096}$")
MODES = ["new", "existing", "incremental"]
SAVED = "Partially received snapshot is saved."


# ------------------------------------------------------------------ helpers
def dev(driver, vol="v", snap=None, pool="data"):
    path = f"/dev/zvol/{pool}/{vol}" + (f"@{snap}" if snap else "")
    return blockdev.open_device(driver.root, driver.host, path)


def pool_dir(driver, pool="data"):
    return driver.root / driver.host / "zfs" / pool


def staging_dir(driver, vol="v", pool="data"):
    return pool_dir(driver, pool) / f".resume-{vol}"


def hidden(driver, pool="data"):
    return sorted(p.name for p in pool_dir(driver, pool).iterdir()
                  if p.name.startswith((".resume", ".receiving")))


def read_all(source):
    chunks = []
    while True:
        piece = source.read(100_003)
        if not piece:
            break
        chunks.append(piece)
    source.close()
    return b"".join(chunks)


def feed(sink, data, seed=1):
    """Write in uneven slices, small ones first (inside the header)."""
    rng, pos = random.Random(seed), 0
    while pos < len(data):
        step = rng.randrange(1, 40) if pos < 300 else rng.randrange(1, 200_000)
        sink.write(data[pos:pos + step])
        pos += step


def deliver(driver, data, cut=None, how="close", resumable=True, vol="v"):
    """Feed ``data`` (or its first ``cut`` bytes, then end the receive as ``how`` says)."""
    sink = driver.receive("data", vol, resumable=resumable)
    feed(sink, data if cut is None else data[:cut])
    if cut is None:
        sink.close()
    elif how == "abort":
        sink.abort()
    else:
        with pytest.raises(DriverError, match="incomplete stream"):
            sink.close()


def fingerprint(driver, vol="v"):
    """Everything a receive decides about the destination, to compare byte for byte."""
    info = driver.get_zvol("data", vol)
    if info is None:
        return None
    names = driver.list_snapshots("data", vol)
    guids = [s.guid for s in snapshots.Volume.of(driver.root, driver.host, "data",
                                                 vol).snapshots()]
    contents = [hashlib.sha256(dev(driver, vol, s).read(0, info.volsize)).hexdigest()
                for s in names]
    folder = pool_dir(driver) / vol
    return (info.volsize, dev(driver, vol).read(0, info.volsize), data_blocks(folder / "data"),
            list(zip(names, guids, contents)))


def layout(data):
    """The header, the records as ``(start, end, kind, first, count)``, where END starts."""
    header = next(iter(stream.Decoder().feed(data[:4096])))[1]
    pos, records = header.size, []
    while data[pos] != stream.END:
        if data[pos] == stream.DATA:
            (block,) = struct.unpack_from("<Q", data, pos + 1)
            records.append((pos, pos + 9 + header.volblocksize, "data", block, 1))
        else:
            first, count = struct.unpack_from("<QQ", data, pos + 1)
            records.append((pos, pos + 17, "free", first, count))
        pos = records[-1][1]
    return header, records, pos


def resume_block(data, cut):
    """Where a receive cut after ``cut`` bytes must resume; None: not even the header arrived."""
    header, records, _ = layout(data)
    if cut < header.size:
        return None
    done = [first + count for _, end, _, first, count in records if end <= cut]
    return done[-1] if done else header.resume or 0


def token_fields(token):
    return sendrecv.ResumePoint.from_token(token)


# ------------------------------------------------------------------ setup
@pytest.fixture
def world(tmp_path):
    """The sender ``nas`` (pool ``tank``) and a factory of fresh receivers (pool ``data``)."""
    zfs.create_pool(tmp_path, "nas", "tank")
    nas = zfs.SimZfs(tmp_path, "nas")
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    rng = random.Random(11)
    device = blockdev.open_device(tmp_path, "nas", "/dev/zvol/tank/v")
    for b in rng.sample(range(NBLOCKS), 20):                    # 20 blocks of data, 12 holes
        device.write(b * BLOCK, rng.randbytes(BLOCK))
    nas.snapshot("tank", "v", "s1")
    held = sorted(data_blocks(tmp_path / "nas" / "zfs" / "tank" / "v" / "data"))
    vol = snapshots.Volume.of(tmp_path, "nas", "tank", "v")
    for b in held[2:5] + held[9:10]:                            # frees in s2
        vol.discard(b * BLOCK, BLOCK)
    device.write(held[12] * BLOCK, bytes(BLOCK))                # zeros: a free as well
    for b in rng.sample(range(NBLOCKS), 8):                     # new data in s2
        device.write(b * BLOCK + rng.randrange(BLOCK - 5000), rng.randbytes(5000))
    nas.snapshot("tank", "v", "s2")
    counter = itertools.count()

    def receiver(mode=None):
        host = f"r{next(counter)}"
        zfs.create_pool(tmp_path, host, "data")
        driver = zfs.SimZfs(tmp_path, host)
        if mode is not None:
            prepare(nas, driver, mode)
        return driver

    return nas, receiver


def send_bytes(nas, snap, base=None):
    return read_all(nas.send("tank", "v", snap, base))


def prepare(nas, driver, mode):
    """The destination as each mode needs it, the same every time."""
    rng = random.Random(12)
    if mode == "existing":
        driver.create_zvol("data", "v", 2 * SIZE, sparse=True)   # another size, data in holes
        for b in range(0, 2 * NBLOCKS, 3):
            dev(driver).write(b * BLOCK + 100, rng.randbytes(3000))
    elif mode == "incremental":
        deliver(driver, send_bytes(nas, "s1"))
        dev(driver).write(7 * BLOCK + 9, b"written on the receiver after s1")  # -F undoes it


def mode_stream(nas, mode):
    return send_bytes(nas, "s2", "s1") if mode == "incremental" else send_bytes(nas, "s1")


def reference(nas, receiver, mode, data):
    ref = receiver(mode)
    deliver(ref, data, resumable=False)
    return fingerprint(ref)


def resumed_bytes(nas, driver):
    token = driver.resume_token("data", "v")
    assert token is not None
    size = nas.send_resume_size("tank", "v", token)
    rest = read_all(nas.send_resume("tank", "v", token))
    assert len(rest) == size
    return rest


def finish(nas, driver, original):
    """Complete a receive from wherever it stands: resume if there is a token, else start over."""
    if driver.resume_token("data", "v") is None:
        deliver(driver, original)
    else:
        deliver(driver, resumed_bytes(nas, driver))
    assert driver.resume_token("data", "v") is None
    assert hidden(driver) == []


def cut_points(data, seed):
    header, records, end = layout(data)
    points = {1, 9, header.size // 2, header.size - 1, header.size, header.size + 1,
              end, end + 4, end + 9, end + 20, len(data) - 1}
    frees = [r for r in records if r[2] == "free"]
    datas = [r for r in records if r[2] == "data"]
    for start, stop, *_ in datas[:2] + datas[len(datas) // 2:len(datas) // 2 + 1] + datas[-1:]:
        points |= {start, start + 5, start + 9, start + 9 + BLOCK // 2, stop - 1}
    for start, stop, *_ in frees:
        points |= {start, start + 8, stop}
    rng = random.Random(seed)
    points |= {rng.randrange(1, len(data)) for _ in range(4)}
    return sorted(points)


# ------------------------------------------------------------- the format
def test_a_resume_header_carries_its_block_and_only_later_records_pass():
    header = stream.Header(SIZE, BLOCK, "s2", 77, "s1", 55, resume=5)
    raw = header.pack()
    assert len(raw) == header.size
    assert struct.unpack_from("<H", raw, 10)[0] == stream.FLAG_INCREMENTAL | stream.FLAG_RESUME
    assert raw[-8:] == struct.pack("<Q", 5)
    decoded = next(iter(stream.Decoder().feed(raw)))[1]
    assert (decoded.resume, decoded.name, decoded.base) == (5, "s2", "s1")
    enc = stream.Encoder(header)
    enc.start()
    with pytest.raises(ValueError, match="out of order"):
        enc.data(4, bytes(BLOCK))
    early = raw + struct.pack("<BQ", stream.DATA, 4) + bytes(BLOCK)
    with pytest.raises(stream.StreamError, match=r"block 4 out of order"):
        list(stream.Decoder().feed(early))
    beyond = stream.Header(SIZE, BLOCK, "s1", 77, resume=NBLOCKS + 1).pack()
    with pytest.raises(stream.StreamError, match="resume block 33 beyond the end"):
        list(stream.Decoder().feed(beyond))
    unknown = bytearray(stream.Header(SIZE, BLOCK, "s1", 77).pack())
    unknown[10] |= 0x4
    with pytest.raises(stream.StreamError, match=r"unknown flags 0x4"):
        list(stream.Decoder().feed(bytes(unknown)))
    assert stream.Header(SIZE, BLOCK, "s1", 77).size + 8 == stream.Header(
        SIZE, BLOCK, "s1", 77, resume=0).size


def test_the_token_says_what_to_resume_and_nothing_else_passes(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    cut = layout(data)[1][3][1]                                 # after the fourth record
    deliver(vm, data, cut)
    token = vm.resume_token("data", "v")
    assert TOKEN_RE.match(token)
    point = token_fields(token)
    vol = snapshots.Volume.of(nas.root, "nas", "tank", "v")
    guids = {s.name: s.guid for s in vol.snapshots()}
    assert point == sendrecv.ResumePoint("s2", guids["s2"], "s1", guids["s1"], SIZE, BLOCK,
                                         resume_block(data, cut))
    prefix, check, payload = token.split("-", 2)
    assert prefix == "1" and len(check) == 8
    assert "=" not in payload
    assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[
        "block"] == point.block
    tampered = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in ["", "nonsense", "2" + token[1:], tampered, token + "A", "1-00000000-e30",
                sendrecv.ResumePoint("s2", 1, None, 0, SIZE, BLOCK, NBLOCKS + 1).token(),
                sendrecv.ResumePoint("s2", 1, "s1", 0, SIZE, BLOCK, 0).token()]:
        for call in (nas.send_resume, nas.send_resume_size):
            with pytest.raises(NotResumableError, match=r"^cannot resume send: resume token is corrupt$"):
                call("tank", "v", bad)
    assert vm.resume_token("data", "v") == token                 # none of that touched it


def test_no_partial_state_no_token(world):
    nas, receiver = world
    vm = receiver("incremental")
    assert vm.resume_token("data", "v") is None
    assert vm.resume_token("data", "nothing") is None
    assert vm.resume_token("nopool", "v") is None
    assert zfs.SimZfs(vm.root, "nohost").resume_token("data", "v") is None
    assert not (vm.root / "nohost").exists()
    vm.abort_resume("data", "v")
    vm.abort_resume("nopool", "v")
    assert fingerprint(vm) is not None


# ------------------------------------------------------------ cut anywhere
@pytest.mark.parametrize("mode", MODES)
def test_a_receive_cut_anywhere_resumes_to_the_same_bytes(world, mode):
    nas, receiver = world
    data = mode_stream(nas, mode)
    _, records, _ = layout(data)
    kinds = {r[2] for r in records}
    assert kinds == ({"data", "free"} if mode == "incremental" else {"data"})
    expected = reference(nas, receiver, mode, data)
    for i, cut in enumerate(cut_points(data, seed=len(mode))):
        vm = receiver(mode)
        before = fingerprint(vm)
        deliver(vm, data, cut, how="abort" if i % 3 == 2 else "close")
        assert fingerprint(vm) == before                        # nothing visible yet
        block = resume_block(data, cut)
        token = vm.resume_token("data", "v")
        if block is None:
            assert token is None and hidden(vm) == [], cut
        else:
            assert token_fields(token).block == block, cut
            assert hidden(vm) == [".resume-v"]
            rest = resumed_bytes(nas, vm)
            events = list(stream.Decoder().feed(rest))
            assert events[0][1].resume == block
            sent = [e[1] for e in events if e[0] in ("data", "free")]
            assert all(b >= block for b in sent)
            assert len([e for e in events if e[0] == "data"]) == len(
                [r for r in records if r[2] == "data" and r[3] >= block])
        finish(nas, vm, data)
        assert fingerprint(vm) == expected, (mode, cut)


@pytest.mark.parametrize("mode", MODES)
def test_a_resumed_receive_can_be_cut_again(world, mode):
    nas, receiver = world
    data = mode_stream(nas, mode)
    header, records, end = layout(data)
    expected = reference(nas, receiver, mode, data)
    middle = records[len(records) // 2]
    pairs = [(header.size + 1, 5), (middle[0] + 9 + BLOCK // 3, None), (records[1][1], 0),
             (records[0][0] + 3, "inside END"), (len(data) - 1, "just the header")]
    for first, second in pairs:
        vm = receiver(mode)
        deliver(vm, data, first)
        token = vm.resume_token("data", "v")
        rest = resumed_bytes(nas, vm)
        rheader, rrecords, rend = layout(rest)
        if second is None:
            second = min(rrecords[len(rrecords) // 2][0] + 9 + 1000 if rrecords else rend + 1,
                         len(rest) - 1)
        elif second == "inside END":
            second = rend + 17
        elif second == "just the header":
            second = rheader.size
        deliver(vm, rest, second, how="abort" if first % 2 else "close")
        if second < rheader.size:
            assert vm.resume_token("data", "v") == token         # never reached the state
        else:
            assert token_fields(vm.resume_token("data", "v")).block == (
                resume_block(rest, second))
        again = resumed_bytes(nas, vm)
        third = layout(again)[0].size + 2
        deliver(vm, again, third)                               # a third cut, in its first record
        finish(nas, vm, data)
        assert fingerprint(vm) == expected, (mode, first, second)


@pytest.mark.parametrize("mode", MODES)
def test_records_staged_but_not_journaled_and_a_torn_entry_are_taken_again(world, mode):
    nas, receiver = world
    data = mode_stream(nas, mode)
    expected = reference(nas, receiver, mode, data)
    vm = receiver(mode)
    _, records, _ = layout(data)
    deliver(vm, data, records[3][1])
    block = token_fields(vm.resume_token("data", "v")).block
    stage = staging_dir(vm)
    # what a receiver killed between a block and its journal entry leaves behind: the
    # next record's block staged, or a block that is a hole in the stream
    later = [r for r in records if r[3] >= block]
    hole = max(set(range(block, NBLOCKS)) - {b for r in records for b in range(r[3], r[3] + r[4])})
    fd = os.open(stage / "data", os.O_WRONLY)
    os.pwrite(fd, os.urandom(BLOCK), later[0][3] * BLOCK)
    os.pwrite(fd, os.urandom(BLOCK), hole * BLOCK)
    os.close(fd)
    with open(stage / "journal", "ab") as fh:
        fh.write(struct.pack("<BQQ", 1, later[0][3], 1)[:11])    # and a torn entry
    assert token_fields(vm.resume_token("data", "v")).block == block
    rest = resumed_bytes(nas, vm)
    cut = layout(rest)[1][2][1]
    deliver(vm, rest, cut)                                      # journaled after the torn tail
    assert token_fields(vm.resume_token("data", "v")).block == resume_block(rest, cut)
    finish(nas, vm, data)
    assert fingerprint(vm) == expected


# ---------------------------------------------------------------- SIGKILL
CHILD = r"""
import sys
from imgstorage.drivers.sim import zfs

root, host, path, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(path, "rb") as fh:
    data = fh.read()
sink = zfs.SimZfs(root, host).receive("data", "v", resumable=True)
pos = 0
while pos < stop:
    step = min(3001, stop - pos)
    sink.write(data[pos:pos + step])
    pos += step
    print(pos, flush=True)
print("parked", flush=True)
sys.stdin.read()                      # never ends by itself: this process gets killed
"""


def kill_midway(driver, data, tmp_path, target):
    """A child receives ``data`` but its END; SIGKILL once it has fed ``target`` bytes."""
    path = tmp_path / f"stream-{driver.host}-{len(data)}"
    path.write_bytes(data)
    stop = len(data) - 10                                      # it can never commit
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(driver.root), driver.host,
                              str(path), str(stop)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env, text=True)
    watchdog = threading.Timer(120, child.kill)                 # a hung child fails the test
    watchdog.start()
    try:
        fed = 0
        while fed < target:                                     # wait for the condition
            line = child.stdout.readline()
            assert line, "the child ended before it fed enough"
            fed = int(line) if line.strip() != "parked" else stop
        os.kill(child.pid, signal.SIGKILL)                      # it is still writing
        assert child.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.stdout.close()
        child.stdin.close()
    return fed, stop


@pytest.mark.parametrize("mode", ["new", "incremental"])
def test_a_receiver_killed_midway_twice_resumes_to_the_same_bytes(world, tmp_path, mode):
    nas, receiver = world
    data = mode_stream(nas, mode)
    expected = reference(nas, receiver, mode, data)
    vm = receiver(mode)
    before = fingerprint(vm)
    _, records, _ = layout(data)
    fed, stop = kill_midway(vm, data, tmp_path, records[4][1])
    assert fingerprint(vm) == before
    block = token_fields(vm.resume_token("data", "v")).block
    assert resume_block(data, fed) <= block <= resume_block(data, stop)
    assert block > 0
    # another receive sweeps the staging of dead receivers: not this one
    deliver(vm, send_bytes(nas, "s1"), vol="other")
    assert token_fields(vm.resume_token("data", "v")).block == block
    assert vm.get_zvol("data", "other") is not None
    # the resumed stream is killed in turn
    rest = resumed_bytes(nas, vm)
    fed, stop = kill_midway(vm, rest, tmp_path, len(rest) // 2)
    second = token_fields(vm.resume_token("data", "v")).block
    assert resume_block(rest, fed) <= second <= resume_block(rest, stop)
    assert second >= block
    finish(nas, vm, data)
    assert fingerprint(vm) == expected
    assert hidden(vm) == []


# --------------------------------------------------------------- refusals
def test_a_new_stream_is_refused_while_a_partial_state_exists(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    deliver(vm, data, len(data) // 2)
    token = vm.resume_token("data", "v")
    state = fingerprint(vm)
    nas.snapshot("tank", "v", "s3")
    for resumable in (False, True):
        for stream_bytes, prefix in [(data, "cannot receive incremental stream"),
                                     (send_bytes(nas, "s3", "s1"),
                                      "cannot receive incremental stream"),
                                     (send_bytes(nas, "s1"),
                                      "cannot receive new filesystem stream")]:
            sink = vm.receive("data", "v", resumable=resumable)
            with pytest.raises(DriverError) as err:
                feed(sink, stream_bytes)
            assert str(err.value) == (f"{prefix}: destination 'data/v' contains "
                                      'partially-complete state from "zfs receive -s".')
            with pytest.raises(DriverError):
                sink.close()
    assert vm.resume_token("data", "v") == token
    assert fingerprint(vm) == state
    vm.abort_resume("data", "v")
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    vm.abort_resume("data", "v")                                 # nothing left: fine
    deliver(vm, send_bytes(nas, "s3", "s1"))
    assert vm.list_snapshots("data", "v") == ["s1", "s3"]


def test_a_resume_stream_needs_the_very_partial_state_it_continues(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    refused = ("cannot receive resume stream: destination 'data/v' has no matching partially "
               "received state")
    _, records, _ = layout(data)
    deliver(vm, data, records[2][1])
    old = resumed_bytes(nas, vm)
    old_token = vm.resume_token("data", "v")
    deliver(vm, old, layout(old)[1][2][1])                      # the state moves on
    token = vm.resume_token("data", "v")
    assert token_fields(token).block > token_fields(old_token).block
    other = receiver("incremental")
    for target, stale in [(vm, old), (other, old)]:
        sink = target.receive("data", "v", resumable=True)
        with pytest.raises(DriverError, match=f"^{re.escape(refused)}$"):
            feed(sink, stale)
        with pytest.raises(DriverError, match=re.escape(refused)):
            sink.close()
    # a tampered resume block is refused at the header, before the digest could tell
    bad = bytearray(resumed_bytes(nas, vm))
    size = layout(bytes(bad))[0].size
    bad[size - 8:size] = struct.pack("<Q", token_fields(token).block + 1)
    with pytest.raises(DriverError, match=re.escape(refused)):
        deliver(vm, bytes(bad))
    assert vm.resume_token("data", "v") == token                 # still there, untouched
    assert other.resume_token("data", "v") is None and hidden(other) == []
    finish(nas, vm, data)
    assert fingerprint(vm) == reference(nas, receiver, "incremental", data)


def test_a_corrupt_stream_discards_the_partial_state(world):
    nas, receiver = world
    data = send_bytes(nas, "s2", "s1")
    _, records, _ = layout(data)
    # a resumable receive of a corrupt stream: refused at END, nothing kept
    vm = receiver("incremental")
    before = fingerprint(vm)
    flipped = bytearray(data)
    second_data = [r for r in records if r[2] == "data"][1]
    flipped[second_data[0] + 9 + 200] ^= 0x10                   # inside a block's bytes
    sink = vm.receive("data", "v", resumable=True)
    with pytest.raises(DriverError, match="checksum mismatch"):
        feed(sink, bytes(flipped))
        sink.close()
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    # a resumed stream that is corrupt: its records were staged unchecked, all goes
    deliver(vm, data, records[1][1])
    rest = bytearray(resumed_bytes(nas, vm))
    rest[len(rest) // 2] ^= 0x01
    sink = vm.receive("data", "v", resumable=True)
    with pytest.raises(DriverError, match=r"^cannot receive resume stream: "):
        feed(sink, bytes(rest))
        sink.close()
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    assert fingerprint(vm) == before
    # a resumable receive refused at the header stages nothing
    empty = receiver()
    sink = empty.receive("data", "v", resumable=True)
    with pytest.raises(DriverError, match="destination 'data/v' does not exist"):
        feed(sink, data)
    sink.abort()
    assert empty.resume_token("data", "v") is None and hidden(empty) == []


def test_without_s_a_resume_stream_completes_or_discards_the_state(world):
    nas, receiver = world
    data = send_bytes(nas, "s1")
    vm = receiver("new")
    deliver(vm, data, len(data) // 3)
    rest = resumed_bytes(nas, vm)
    sink = vm.receive("data", "v")
    feed(sink, rest[:len(rest) // 2])
    with pytest.raises(DriverError, match=r"^cannot receive resume stream: checksum mismatch "
                                          r"or incomplete stream$"):
        sink.close()
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    deliver(vm, data, len(data) // 3)
    deliver(vm, resumed_bytes(nas, vm), resumable=False)
    assert fingerprint(vm) == reference(nas, receiver, "new", data)
    assert hidden(vm) == []


def test_the_cut_message_says_the_partial_state_is_kept(world):
    nas, receiver = world
    vm = receiver()
    data = send_bytes(nas, "s1")
    sink = vm.receive("data", "v", resumable=True)
    feed(sink, data[:-1])
    with pytest.raises(DriverError, match=(r"^cannot receive new filesystem stream: checksum "
                                           rf"mismatch or incomplete stream\. {SAVED}$")):
        sink.close()
    with pytest.raises(DriverError, match=re.escape(SAVED)):
        sink.close()                                            # the same failure again
    assert vm.resume_token("data", "v") is not None
    inside = receiver()
    sink = inside.receive("data", "v", resumable=True)
    feed(sink, data[:20])                                       # not even a header
    with pytest.raises(DriverError, match=r"^cannot receive: checksum mismatch or incomplete "
                                          r"stream$"):
        sink.close()
    assert inside.resume_token("data", "v") is None and hidden(inside) == []


# --------------------------------------------------------------- the sender
def test_the_sender_needs_the_very_snapshots_of_the_initial_send(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    deliver(vm, data, len(data) // 2)
    token = vm.resume_token("data", "v")
    expected = resumed_bytes(nas, vm)
    # another host with the same snapshots (by guid) and another pool name can continue it
    mirror_root = nas.root
    zfs.create_pool(mirror_root, "mirror", "other")
    mirror = zfs.SimZfs(mirror_root, "mirror")
    deliver_to(mirror, "other", send_bytes(nas, "s1"))
    deliver_to(mirror, "other", data)
    rest = read_all(mirror.send_resume("other", "v", token))
    assert rest[:16] == expected[:16]
    assert layout(rest)[1] == layout(expected)[1]
    assert mirror.send_resume_size("other", "v", token) == len(rest)
    for call in (nas.send_resume, nas.send_resume_size):
        with pytest.raises(NotResumableError, match=r"^cannot resume send: 'tank/w@s2' used in the "
                                              r"initial send no longer exists$"):
            call("tank", "w", token)
        with pytest.raises(NotResumableError, match=r"^cannot resume send: 'nopool/v@s2' used in the "
                                              r"initial send no longer exists$"):
            call("nopool", "v", token)
    nas.destroy_snapshot("tank", "v", "s1")
    with pytest.raises(NotResumableError, match=r"^cannot resume send: 'tank/v@s1' used in the "
                                          r"initial send no longer exists$"):
        nas.send_resume_size("tank", "v", token)
    nas.destroy_snapshot("tank", "v", "s2")
    with pytest.raises(NotResumableError, match=r"^cannot resume send: 'tank/v@s2' used in the "
                                          r"initial send no longer exists$"):
        nas.send_resume("tank", "v", token)
    nas.snapshot("tank", "v", "s1")
    nas.snapshot("tank", "v", "s2")
    with pytest.raises(NotResumableError, match=r"^cannot resume send: 'tank/v@s2' is no longer the "
                                          r"same snapshot used in the initial send$"):
        nas.send_resume("tank", "v", token)
    # the mirror finishes the receive for the nas
    deliver(vm, rest)
    assert vm.list_snapshots("data", "v") == ["s1", "s2"]
    assert dev(vm).read(0, SIZE) == dev(mirror, pool="other").read(0, SIZE)


def deliver_to(driver, pool, data):
    sink = driver.receive(pool, "v")
    feed(sink, data)
    sink.close()


# ------------------------------------------------------ staging lifecycle
def test_a_partial_new_zvol_is_invisible_and_destroy_takes_it(world):
    nas, receiver = world
    vm = receiver()
    data = send_bytes(nas, "s1")
    deliver(vm, data, len(data) // 2)
    assert vm.get_zvol("data", "v") is None
    assert vm.list_zvols() == [] and vm.list_zvols("data") == []
    assert vm.pool_usage("data")["used"] == 0
    assert staging_dir(vm).is_dir()
    vm.destroy("data", "v", recursive=False)                    # the half-received dataset
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    with pytest.raises(DriverError, match=r"^cannot open 'data/v': dataset does not exist$"):
        vm.destroy("data", "v")


def test_destroy_of_a_zvol_takes_its_partial_receive_along(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    deliver(vm, data, len(data) // 2)
    with pytest.raises(DriverError, match=r"^cannot destroy 'data/v': volume has children$"):
        vm.destroy("data", "v", recursive=False)
    assert vm.resume_token("data", "v") is not None
    vm.destroy("data", "v")
    assert vm.get_zvol("data", "v") is None
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    # a full stream into an existing zvol without snapshots, likewise
    other = receiver("existing")
    deliver(other, send_bytes(nas, "s1"), 1000)
    assert other.resume_token("data", "v") is not None
    other.destroy("data", "v", recursive=True)
    assert other.resume_token("data", "v") is None and hidden(other) == []


def test_a_receive_in_progress_keeps_its_staging_to_itself(world):
    nas, receiver = world
    vm = receiver("incremental")
    data = send_bytes(nas, "s2", "s1")
    deliver(vm, data, len(data) // 3)
    rest = resumed_bytes(nas, vm)
    active = vm.receive("data", "v", resumable=True)
    active.write(rest[:len(rest) // 2])                         # working on the staging
    with pytest.raises(DriverError, match=r"^cannot destroy 'data/v/%recv': dataset is busy$"):
        vm.abort_resume("data", "v")
    with pytest.raises(DriverError, match=r"^cannot destroy 'data/v': dataset is busy$"):
        vm.destroy("data", "v")
    second = vm.receive("data", "v", resumable=True)
    with pytest.raises(DriverError, match=r"^cannot receive resume stream: destination 'data/v' "
                                          r"is busy"):
        second.write(rest)
    second.abort()
    assert vm.resume_token("data", "v") is not None              # in progress: still a token
    active.write(rest[len(rest) // 2:])
    active.close()
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    assert fingerprint(vm) == reference(nas, receiver, "incremental", data)
    # a new zvol's receive in progress: no %recv child in the message
    fresh = receiver()
    sink = fresh.receive("data", "v", resumable=True)
    sink.write(send_bytes(nas, "s1")[:5000])
    with pytest.raises(DriverError, match=r"^cannot destroy 'data/v': dataset is busy$"):
        fresh.abort_resume("data", "v")
    sink.abort()                                                # resumable: kept
    assert fresh.resume_token("data", "v") is not None
    fresh.abort_resume("data", "v")
    assert hidden(fresh) == []


def test_a_sink_dropped_without_close_leaves_a_resumable_state(world):
    nas, receiver = world
    vm = receiver()
    data = send_bytes(nas, "s1")
    sink = vm.receive("data", "v", resumable=True)
    sink.write(data[:len(data) // 2])
    assert staging_dir(vm).is_dir()
    del sink
    gc.collect()                                                # its flock went with it
    finish(nas, vm, data)
    assert fingerprint(vm) == reference(nas, receiver, "new", data)


def test_a_staging_left_by_a_receiver_killed_while_committing_goes_away(world, tmp_path):
    nas, receiver = world
    data = send_bytes(nas, "s2", "s1")
    vm = receiver("incremental")
    deliver(vm, data, len(data) - 5)
    kept = tmp_path / "kept"
    shutil.copytree(staging_dir(vm), kept)
    finish(nas, vm, data)
    # killed after the snapshot was taken, before the staging went: the work is done
    shutil.copytree(kept, staging_dir(vm))
    assert vm.resume_token("data", "v") is None and hidden(vm) == []
    # killed after a full stream's data moved into place: nothing to resume
    other = receiver("existing")
    deliver(other, send_bytes(nas, "s1"), 7000)
    os.unlink(staging_dir(other) / "data")
    assert other.resume_token("data", "v") is None and hidden(other) == []
    deliver(other, send_bytes(nas, "s1"))
    assert other.list_snapshots("data", "v") == ["s1"]


# -------------------------------------------------------------------- holds
HOLD_CHILD = r"""
import sys
from imgstorage.drivers.sim import zfs
from imgstorage.errors import DriverError

driver = zfs.SimZfs(sys.argv[1], "nas")
print(",".join(driver.holds("tank", "v", "s1")))
try:
    driver.destroy_snapshot("tank", "v", "s1")
except DriverError as exc:
    print(exc)
"""


def test_a_held_snapshot_cannot_be_destroyed_by_anyone(world):
    nas, _ = world
    folder = nas.root / "nas" / "zfs" / "tank" / "v"
    nas.snapshot("tank", "v", "s3")
    assert nas.holds("tank", "v", "s1") == []
    nas.hold("tank", "v", "s1")
    nas.hold("tank", "v", "s1")                                 # again: fine
    nas.hold("tank", "v", "s1", "backup")
    assert nas.holds("tank", "v", "s1") == ["backup", HOLD_TAG]
    assert json.loads((folder / "snapshots" / "s1" / "holds.json").read_text()) == [
        "backup", HOLD_TAG]
    before = dev(nas, snap="s1", pool="tank").read(0, SIZE)
    busy = r"^cannot destroy snapshot tank/v@s1: dataset is busy$"
    with pytest.raises(DriverError, match=busy):
        nas.destroy_snapshot("tank", "v", "s1")
    with pytest.raises(DriverError, match=busy):
        nas.destroy("tank", "v", recursive=True)
    assert nas.list_snapshots("tank", "v") == ["s1", "s2", "s3"]
    assert nas.get_zvol("tank", "v") is not None
    # another process, another driver object: the same holds, the same refusal
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", HOLD_CHILD, str(nas.root)], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"backup,{HOLD_TAG}", "cannot destroy snapshot tank/v@s1: dataset is busy"]
    # destroying an unheld neighbour folds into s1 and keeps its holds and content
    nas.destroy_snapshot("tank", "v", "s2")
    assert nas.holds("tank", "v", "s1") == ["backup", HOLD_TAG]
    assert dev(nas, snap="s1", pool="tank").read(0, SIZE) == before
    nas.release("tank", "v", "s1")
    nas.release("tank", "v", "s1")                              # gone already: fine
    nas.release("tank", "v", "s1", "never-held")
    assert nas.holds("tank", "v", "s1") == ["backup"]
    with pytest.raises(DriverError, match=busy):
        nas.destroy("tank", "v")
    nas.release("tank", "v", "s1", "backup")
    assert nas.holds("tank", "v", "s1") == []
    assert not (folder / "snapshots" / "s1" / "holds.json").exists()
    nas.hold("tank", "v", "s3")
    with pytest.raises(DriverError, match=r"^cannot destroy snapshot tank/v@s3: dataset is busy$"):
        nas.destroy("tank", "v")
    nas.destroy_snapshot("tank", "v", "s1")
    nas.release("tank", "v", "s3")
    nas.destroy("tank", "v")
    assert nas.get_zvol("tank", "v") is None


def test_holds_read_like_zfs(world):
    nas, _ = world
    for call, words in [(nas.hold, "cannot hold snapshot"),
                        (nas.release, "cannot release hold from snapshot"),
                        (nas.holds, "cannot open")]:
        with pytest.raises(DriverError, match=rf"^{words} 'tank/v@nope': dataset does not exist$"):
            call("tank", "v", "nope")
        with pytest.raises(DriverError, match=rf"^{words} 'tank/w@s1': dataset does not exist$"):
            call("tank", "w", "s1")
        with pytest.raises(DriverError, match=rf"^{words} 'nopool/v@s1': dataset does not exist$"):
            call("nopool", "v", "s1")
    for tag in ["", "-r", "two words", "x" * 256, None, "tab\there"]:
        with pytest.raises(ValidationError, match="invalid zfs hold tag"):
            nas.hold("tank", "v", "s1", tag)
    with pytest.raises(ValidationError):
        nas.hold("tank", "v", "../s1")
    assert nas.holds("tank", "v", "s1") == []
    nowhere = zfs.SimZfs(nas.root, "nohost")
    for call in (nowhere.hold, nowhere.release, nowhere.holds):
        with pytest.raises(DriverError, match="'tank/v@s1': dataset does not exist$"):
            call("tank", "v", "s1")
    assert not (nas.root / "nohost").exists()


def test_a_received_snapshot_can_be_held_as_the_next_base(world):
    nas, receiver = world
    vm = receiver("incremental")
    vm.hold("data", "v", "s1")
    deliver(vm, send_bytes(nas, "s2", "s1"), 20_000)
    finish(nas, vm, send_bytes(nas, "s2", "s1"))                # the rollback keeps holds
    assert vm.holds("data", "v", "s1") == [HOLD_TAG] and vm.holds("data", "v", "s2") == []
    with pytest.raises(DriverError, match=r"^cannot destroy snapshot data/v@s1: dataset is busy$"):
        vm.destroy("data", "v")
    assert vm.list_snapshots("data", "v") == ["s1", "s2"]
