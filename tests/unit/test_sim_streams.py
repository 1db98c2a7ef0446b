"""Simulated ``zfs send`` / ``zfs receive -F``: exact bytes, holes kept, nothing half-applied."""
import hashlib
import multiprocessing
import os
import random

import pytest

from imgstorage.drivers.sim import blockdev, dm, snapshots, stream, zfs
from imgstorage.errors import DriverError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
BLOCK = zfs.VOLBLOCKSIZE
SIZE = 16 * MIB


@pytest.fixture
def hosts(tmp_path):
    for host in ("nas", "vm"):
        zfs.create_pool(tmp_path, host, "tank")
    return zfs.SimZfs(tmp_path, "nas"), zfs.SimZfs(tmp_path, "vm")


def dev(driver, vol="v", snap=None):
    path = f"/dev/zvol/tank/{vol}" + (f"@{snap}" if snap else "")
    return blockdev.open_device(driver.root, driver.host, path)


def folder(driver, vol="v"):
    return driver.root / driver.host / "zfs" / "tank" / vol


def data_blocks(path):
    """Which blocks of a sparse file hold data, asked of the file system block by block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, out = os.fstat(fd).st_size, set()
        for b in range(size // BLOCK):
            try:
                if os.lseek(fd, b * BLOCK, os.SEEK_DATA) < (b + 1) * BLOCK:
                    out.add(b)
            except OSError:                      # ENXIO: no data after this point
                break
        return out
    finally:
        os.close(fd)


def digest(device, size):
    h = hashlib.sha256()
    for offset in range(0, size, 64 * MIB):
        h.update(device.read(offset, min(64 * MIB, size - offset)))
    return h.hexdigest()


def read_all(source, rng=None):
    """Drain a ByteSource in uneven reads, as a pipe would deliver it."""
    rng = rng or random.Random(0)
    chunks = []
    while True:
        piece = source.read(rng.choice([1, 7, 4096, 65536, 200_000, 1 << 20]))
        if not piece:
            break
        chunks.append(piece)
    source.close()
    return b"".join(chunks)


def feed(sink, data, rng=None):
    """Write ``data`` in arbitrary slices: tiny ones first (inside the header), then larger."""
    rng = rng or random.Random(1)
    pos = 0
    while pos < len(data):
        step = rng.randrange(1, 40) if pos < 2000 else rng.randrange(1, 300_000)
        sink.write(data[pos:pos + step])
        pos += step


def pipe(src, dst, snap, base=None, vol="v"):
    """Source straight into sink, never holding the whole stream; returns its length."""
    source, sink, total = src.send("tank", vol, snap, base), dst.receive("tank", vol), 0
    while True:
        piece = source.read(1 << 20)
        if not piece:
            break
        sink.write(piece)
        total += len(piece)
    source.close()
    sink.close()
    return total


def send_bytes(driver, snap, base=None, vol="v"):
    return read_all(driver.send("tank", vol, snap, base))


def transfer(src, dst, snap, base=None, vol="v", dst_vol=None):
    data = send_bytes(src, snap, base, vol)
    sink = dst.receive("tank", dst_vol or vol)
    feed(sink, data)
    sink.close()
    return data


def scribble(driver, rng, count, vol="v", size=SIZE):
    device = dev(driver, vol)
    for _ in range(count):
        offset = rng.randrange(size - 1)
        length = min(rng.choice([1, 300, 5000, BLOCK, 2 * BLOCK + 3]), size - offset)
        device.write(offset, rng.randbytes(length))


def snapshot_of(driver, vol, snap):
    return snapshots.Volume.of(driver.root, driver.host, "tank", vol).snapshots()[
        driver.list_snapshots("tank", vol).index(snap)]


def state_of(driver, vol="v"):
    """Everything a failed receive must leave alone."""
    if driver.get_zvol("tank", vol) is None:
        return None
    return (digest(dev(driver, vol), driver.get_zvol("tank", vol).volsize),
            data_blocks(folder(driver, vol) / "data"), driver.get_zvol("tank", vol).volsize,
            [(s, snapshot_of(driver, vol, s).guid) for s in driver.list_snapshots("tank", vol)])


def leftovers(driver):
    return [p.name for p in (driver.root / driver.host / "zfs" / "tank").iterdir()
            if p.name.startswith(".receiving")]


# ------------------------------------------------------------------ full
def test_a_full_stream_reproduces_the_snapshot_and_its_holes(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    scribble(nas, random.Random(2), 30)
    dev(nas).write(5 * BLOCK, bytes(BLOCK))                # zeros over data: a hole again
    nas.snapshot("tank", "v", "s1")
    expected = dev(nas, snap="s1").read(0, SIZE)
    dev(nas).write(0, os.urandom(SIZE))                    # later writes are not in s1's stream
    transfer(nas, vm, "s1")
    assert dev(vm).read(0, SIZE) == expected
    assert vm.get_zvol("tank", "v").volsize == SIZE
    assert vm.list_snapshots("tank", "v") == ["s1"]
    assert snapshot_of(vm, "v", "s1").guid == snapshot_of(nas, "v", "s1").guid
    held = {b for b in range(SIZE // BLOCK) if expected[b * BLOCK:(b + 1) * BLOCK] != bytes(BLOCK)}
    assert data_blocks(folder(vm) / "data") == held
    assert vm.get_zvol("tank", "v").refer == len(held) * BLOCK
    assert leftovers(vm) == []


def test_a_full_stream_replaces_an_existing_volume(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(MIB, os.urandom(MIB))
    nas.snapshot("tank", "v", "s1")
    vm.create_zvol("tank", "v", 2 * SIZE, sparse=True)
    dev(vm).write(0, os.urandom(4 * MIB))                  # data where the stream has holes
    dev(vm).write(20 * MIB, b"beyond the stream's volsize")
    transfer(nas, vm, "s1")
    assert vm.get_zvol("tank", "v").volsize == SIZE
    assert dev(vm).read(0, SIZE) == dev(nas, snap="s1").read(0, SIZE)
    assert data_blocks(folder(vm) / "data") == set(range(8, 16))
    assert vm.list_snapshots("tank", "v") == ["s1"]


def test_the_header_says_what_the_stream_carries(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    nas.snapshot("tank", "v", "a")
    nas.snapshot("tank", "v", "b")
    events = list(stream.Decoder().feed(send_bytes(nas, "b", "a")))
    header = events[0][1]
    assert events[0][0] == "header" and events[-1] == ("end",)
    assert (header.name, header.base) == ("b", "a")
    assert (header.volsize, header.volblocksize) == (SIZE, BLOCK)
    assert header.to_guid == snapshot_of(nas, "v", "b").guid
    assert header.from_guid == snapshot_of(nas, "v", "a").guid
    assert len(header.stream_id) == 16
    full = list(stream.Decoder().feed(send_bytes(nas, "a")))[0][1]
    assert full.base is None and full.from_guid == 0 and full.stream_id != header.stream_id


# ----------------------------------------------------------- incremental
def test_send_size_is_the_exact_stream_length(hosts):
    nas, _ = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    rng = random.Random(3)
    scribble(nas, rng, 20)
    nas.snapshot("tank", "v", "s1")
    scribble(nas, rng, 10)
    vol = snapshots.Volume.of(nas.root, "nas", "tank", "v")
    vol.discard(0, 3 * BLOCK)
    vol.discard(10 * BLOCK, BLOCK)
    nas.snapshot("tank", "v", "s2")
    nas.snapshot("tank", "v", "s3")                       # nothing changed: an empty increment
    for snap, base in [("s1", None), ("s2", None), ("s2", "s1"), ("s3", "s2"), ("s3", "s1")]:
        assert nas.send_size("tank", "v", snap, base) == len(send_bytes(nas, snap, base))
    free_records = [e for e in stream.Decoder().feed(send_bytes(nas, "s2", "s1")) if e[0] == "free"]
    assert ("free", 10, 1) in free_records


def test_an_incremental_of_one_percent_carries_about_one_percent(hosts):
    nas, vm = hosts
    size = GIB
    nas.create_zvol("tank", "v", size, sparse=True)
    device = dev(nas)
    chunk = (b"imgstorage" * (8 * MIB // 10 + 1))[:8 * MIB]
    for offset in range(0, size, len(chunk)):
        device.write(offset, chunk)
    nas.snapshot("tank", "v", "s1")
    assert pipe(nas, vm, "s1") == nas.send_size("tank", "v", "s1")
    rng = random.Random(4)
    blocks = rng.sample(range(size // BLOCK), size // BLOCK // 100)
    for b in blocks:
        device.write(b * BLOCK + rng.randrange(BLOCK - 4096), rng.randbytes(4096))
    nas.snapshot("tank", "v", "s2")
    full = nas.send_size("tank", "v", "s2")
    increment = transfer(nas, vm, "s2", "s1")
    assert full > size
    assert len(increment) < 0.02 * full
    assert len(increment) == nas.send_size("tank", "v", "s2", "s1")
    assert digest(dev(vm), size) == digest(dev(nas, snap="s2"), size)
    assert vm.list_snapshots("tank", "v") == ["s1", "s2"]


def test_frees_turn_blocks_back_into_holes_on_the_receiver(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(SIZE))
    nas.snapshot("tank", "v", "s1")
    transfer(nas, vm, "s1")
    vol = snapshots.Volume.of(nas.root, "nas", "tank", "v")
    vol.discard(2 * BLOCK, 5 * BLOCK)
    dev(nas).write(9 * BLOCK, bytes(BLOCK))
    nas.snapshot("tank", "v", "s2")
    transfer(nas, vm, "s2", "s1")
    assert dev(vm).read(0, SIZE) == dev(nas).read(0, SIZE)
    holes = {2, 3, 4, 5, 6, 9}
    assert data_blocks(folder(vm) / "data") == set(range(SIZE // BLOCK)) - holes
    assert dev(vm, snap="s1").read(0, SIZE) == dev(nas, snap="s1").read(0, SIZE)


def test_the_sync_round_trip_nas_to_vm_and_back(hosts):
    nas, vm = hosts
    rng = random.Random(5)
    nas.create_zvol("tank", "vm-1-vol", SIZE, sparse=True)
    scribble(nas, rng, 40, vol="vm-1-vol")
    nas.snapshot("tank", "vm-1-vol", "sync-1")
    transfer(nas, vm, "sync-1", vol="vm-1-vol")
    # the VM runs from its local copy, through a device-mapper device over it
    mapper = dm.SimDeviceMapper(vm.root, "vm")
    mapper.create("vm-1", f"0 {SIZE // 512} linear /dev/zvol/tank/vm-1-vol 0")
    disk = blockdev.open_device(vm.root, "vm", "/dev/mapper/vm-1")
    for cycle in range(2, 5):
        for _ in range(15):
            offset = rng.randrange(SIZE - BLOCK)
            disk.write(offset, rng.randbytes(rng.choice([1, 512, BLOCK])))
        snapshots.Volume.of(vm.root, "vm", "tank", "vm-1-vol").discard(
            rng.randrange(SIZE // BLOCK) * BLOCK, BLOCK)
        vm.snapshot("tank", "vm-1-vol", f"sync-{cycle}")
        transfer(vm, nas, f"sync-{cycle}", f"sync-{cycle - 1}", vol="vm-1-vol")
        assert dev(nas, "vm-1-vol").read(0, SIZE) == dev(vm, "vm-1-vol").read(0, SIZE)
        assert (data_blocks(folder(nas, "vm-1-vol") / "data")
                == data_blocks(folder(vm, "vm-1-vol") / "data"))
    assert nas.list_snapshots("tank", "vm-1-vol") == ["sync-1", "sync-2", "sync-3", "sync-4"]
    kept = dev(nas, "vm-1-vol", "sync-2").read(0, SIZE)
    assert kept == dev(vm, "vm-1-vol", "sync-2").read(0, SIZE)


def test_an_incremental_rolls_back_what_the_receiver_wrote_since(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(SIZE // 2))
    nas.snapshot("tank", "v", "s1")
    transfer(nas, vm, "s1")
    dev(vm).write(12 * MIB, os.urandom(MIB))               # stray writes on the receiver
    dev(vm).write(BLOCK, os.urandom(10))
    dev(nas).write(3 * MIB, os.urandom(BLOCK))
    nas.snapshot("tank", "v", "s2")
    transfer(nas, vm, "s2", "s1")
    assert dev(vm).read(0, SIZE) == dev(nas, snap="s2").read(0, SIZE)
    assert dev(vm, snap="s1").read(0, SIZE) == dev(nas, snap="s1").read(0, SIZE)


def test_a_64_gib_volume_with_a_few_mib_goes_both_ways_quickly(hosts):
    nas, vm = hosts
    size = 64 * GIB
    nas.create_zvol("tank", "big", size, sparse=True)
    rng = random.Random(6)
    writes = {rng.randrange(size // BLOCK) * BLOCK + 77: rng.randbytes(300 * KIB)
              for _ in range(12)}
    for offset, data in writes.items():
        dev(nas, "big").write(offset, data)
    nas.snapshot("tank", "big", "s1")
    full = transfer(nas, vm, "s1", vol="big")
    assert len(full) < 8 * MIB
    for offset, data in writes.items():
        assert dev(vm, "big").read(offset, len(data)) == data
    assert vm.get_zvol("tank", "big").volsize == size
    assert (folder(vm, "big") / "data").stat().st_blocks * 512 < 8 * MIB
    dev(vm, "big").write(size - MIB, os.urandom(MIB))
    vm.snapshot("tank", "big", "s2")
    back = transfer(vm, nas, "s2", "s1", vol="big")
    assert len(back) < 2 * MIB
    tail = size - 2 * MIB
    assert dev(nas, "big").read(tail, 2 * MIB) == dev(vm, "big").read(tail, 2 * MIB)


def test_a_send_is_lazy_and_reads_the_snapshot_not_the_live_volume(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(SIZE))
    nas.snapshot("tank", "v", "s1")
    expected = dev(nas, snap="s1").read(0, SIZE)
    source = nas.send("tank", "v", "s1")
    sink = vm.receive("tank", "v")
    sink.write(source.read(3 * BLOCK))
    dev(nas).write(0, os.urandom(SIZE))                    # overwrite all that is still to come
    nas.snapshot("tank", "v", "s2")
    dev(nas).write(MIB, os.urandom(MIB))
    nas.destroy_snapshot("tank", "v", "s2")
    sink.write(read_all(source))
    sink.close()
    assert dev(vm).read(0, SIZE) == expected


# ---------------------------------------------------------------- failures
DAMAGES = {
    "cut in a block": lambda s: s[:len(s) // 2],
    "cut before the end record": lambda s: s[:-41],
    "last byte missing": lambda s: s[:-1],
    "only the header": lambda s: s[:70],
    "flipped data byte": lambda s: _flip(s, len(s) // 2),
    "flipped digest byte": lambda s: _flip(s, len(s) - 3),
    "flipped magic": lambda s: _flip(s, 2),
    "flipped first record type": lambda s: _flip(s, _header_size(s)),
    "flipped block number": lambda s: _flip(s, _header_size(s) + 1),
    "trailing bytes": lambda s: s + b"\0",
}


def _flip(data, index):
    return data[:index] + bytes([data[index] ^ 0x10]) + data[index + 1:]


def _header_size(data):
    return next(iter(stream.Decoder().feed(data)))[1].size


def _refused(dst, vol, data):
    sink = dst.receive("tank", vol)
    try:
        feed(sink, data)
    except DriverError:
        pass                                               # refused early, as a dead receiver is
    with pytest.raises(DriverError) as err:
        sink.close()
    return str(err.value)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("mode", ["new volume", "existing volume", "incremental"])
def test_a_damaged_stream_changes_nothing(hosts, mode, damage):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    scribble(nas, random.Random(7), 30)
    nas.snapshot("tank", "v", "s1")
    if mode == "existing volume":
        vm.create_zvol("tank", "v", SIZE, sparse=True)
        dev(vm).write(BLOCK + 5, os.urandom(3 * BLOCK))
    if mode == "incremental":
        transfer(nas, vm, "s1")
        dev(vm).write(7 * MIB, b"written after s1 on the receiver")
        scribble(nas, random.Random(8), 10)
        nas.snapshot("tank", "v", "s2")
        data = send_bytes(nas, "s2", "s1")
    else:
        data = send_bytes(nas, "s1")
    before = state_of(vm)
    message = _refused(vm, "v", DAMAGES[damage](data))
    assert message.startswith("cannot receive")
    assert state_of(vm) == before
    assert leftovers(vm) == []


def test_truncation_reads_like_zfs(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    nas.snapshot("tank", "v", "s1")
    data = send_bytes(nas, "s1")
    assert _refused(vm, "v", data[:-1]) == ("cannot receive new filesystem stream: "
                                            "checksum mismatch or incomplete stream")
    sink = vm.receive("tank", "v")
    with pytest.raises(DriverError, match=r"^cannot receive: invalid stream \(bad magic number\)$"):
        sink.write(b"not a stream at all")
    with pytest.raises(DriverError, match="bad magic number"):
        sink.close()


def test_an_incremental_needs_the_base_as_the_most_recent_snapshot(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    nas.snapshot("tank", "v", "s1")
    transfer(nas, vm, "s1")
    dev(nas).write(0, b"one")
    nas.snapshot("tank", "v", "s2")
    dev(nas).write(0, b"two")
    nas.snapshot("tank", "v", "s3")
    before = state_of(vm)
    assert _refused(vm, "v", send_bytes(nas, "s3", "s2")) == (
        "cannot receive incremental stream: most recent snapshot of tank/v does not "
        "match incremental source")
    vm.snapshot("tank", "v", "s2")                          # same name, not the same snapshot
    assert "does not match incremental source" in _refused(vm, "v", send_bytes(nas, "s3", "s2"))
    vm.destroy_snapshot("tank", "v", "s2")
    assert state_of(vm) == before
    transfer(nas, vm, "s2", "s1")
    assert _refused(vm, "v", send_bytes(nas, "s2", "s1")) == (
        "cannot restore to tank/v@s2: destination already exists")
    assert _refused(vm, "w", send_bytes(nas, "s2", "s1")) == (
        "cannot receive incremental stream: destination 'tank/w' does not exist")
    assert _refused(vm, "v", send_bytes(nas, "s1")) == (
        "cannot receive new filesystem stream: destination has snapshots (eg. tank/v@s1) "
        "must destroy them to overwrite it")
    transfer(nas, vm, "s3", "s2")
    assert dev(vm).read(0, 3) == b"two"
    assert leftovers(vm) == []


def test_send_refuses_what_zfs_send_refuses(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    nas.snapshot("tank", "v", "s1")
    nas.snapshot("tank", "v", "s2")
    with pytest.raises(DriverError, match=r"^cannot open 'tank/v@nope': dataset does not exist$"):
        nas.send("tank", "v", "nope")
    with pytest.raises(DriverError, match=r"^cannot open 'tank/v@nope': dataset does not exist$"):
        nas.send_size("tank", "v", "s2", "nope")
    with pytest.raises(DriverError, match=r"^cannot open 'tank/w': dataset does not exist$"):
        nas.send("tank", "w", "s1")
    for snap, base in [("s1", "s2"), ("s1", "s1")]:
        with pytest.raises(DriverError, match=r"^cannot send 'tank/v@s1': not an earlier "
                                              r"snapshot from the same fs$"):
            nas.send("tank", "v", snap, base)
    with pytest.raises(DriverError, match=r"^cannot open 'nopool': dataset does not exist$"):
        vm.receive("nopool", "v")


def test_a_snapshot_destroyed_during_its_send_fails_the_send(hosts):
    nas, _ = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(SIZE))
    nas.snapshot("tank", "v", "s1")
    source = nas.send("tank", "v", "s1")
    assert source.read(BLOCK)
    nas.destroy_snapshot("tank", "v", "s1")
    with pytest.raises(DriverError, match="tank/v@s1"):
        while source.read(MIB):
            pass
    with pytest.raises(DriverError, match="tank/v@s1"):
        source.close()


def test_an_aborted_receive_leaves_nothing(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(SIZE))
    nas.snapshot("tank", "v", "s1")
    source = nas.send("tank", "v", "s1")
    sink = vm.receive("tank", "v")
    sink.write(source.read(SIZE // 2))
    assert leftovers(vm) != []                              # staged, not visible
    assert vm.get_zvol("tank", "v") is None
    source.abort()
    sink.abort()
    sink.abort()
    assert leftovers(vm) == [] and vm.get_zvol("tank", "v") is None


def test_staging_of_a_receiver_that_died_is_swept(hosts):
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(MIB))
    nas.snapshot("tank", "v", "s1")
    data = send_bytes(nas, "s1")
    child = multiprocessing.get_context("fork").Process(target=lambda: None)
    child.start()
    child.join()
    pool = vm.root / "vm" / "zfs" / "tank"
    dead = pool / f".receiving-{child.pid}-0123abcd-v"
    (dead / "snapshots").mkdir(parents=True)
    (dead / "data").write_bytes(b"half a volume")
    mine = vm.receive("tank", "w")
    mine.write(data[:1000])                                  # a live receiver: left alone
    transfer(nas, vm, "s1")
    assert not dead.exists()
    assert len(leftovers(vm)) == 1
    mine.abort()
    assert leftovers(vm) == []


# ------------------------------------------------------- how a slice is taken
def _events(data, cuts):
    """Decode ``data`` cut at ``cuts``; payloads as bytes, so events compare by content."""
    decoder, out, pos = stream.Decoder(), [], 0
    for cut in list(cuts) + [len(data)]:
        for event in decoder.feed(data[pos:cut]):
            out.append(("data", event[1], bytes(event[2])) if event[0] == "data" else event)
        pos = cut
    decoder.finish()
    return out


def test_the_events_do_not_depend_on_where_the_slices_end(hosts):
    nas, _ = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    scribble(nas, random.Random(11), 20)
    nas.snapshot("tank", "v", "s1")
    scribble(nas, random.Random(12), 10)
    snapshots.Volume.of(nas.root, "nas", "tank", "v").discard(3 * BLOCK, 2 * BLOCK)
    nas.snapshot("tank", "v", "s2")
    for data in (send_bytes(nas, "s1"), send_bytes(nas, "s2", "s1")):
        whole = _events(data, [])
        assert whole[0][0] == "header" and whole[-1] == ("end",)
        rng = random.Random(len(data))
        every_byte_near_the_end = range(len(data) - 200, len(data))
        assert _events(data, every_byte_near_the_end) == whole
        assert _events(data, sorted(rng.sample(range(1, len(data)), 300))) == whole


def test_bytes_after_the_end_are_refused_however_they_arrive(hosts):
    nas, _ = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(MIB))
    nas.snapshot("tank", "v", "s1")
    data = send_bytes(nas, "s1")
    for cuts in ([], [len(data) - 10], [len(data)]):
        with pytest.raises(stream.StreamError, match=r"data after the end record"):
            _events(data + b"x", cuts)


def _stream_with_a_zero_block(header, blocks):
    """A stream as another sender may make it: a DATA record of zeros among the others."""
    enc = stream.Encoder(header)
    out = [enc.start()]
    for b in sorted(blocks):
        out += enc.data(b, blocks[b])
    out.append(enc.end())
    return b"".join(out)


@pytest.mark.parametrize("resumable", [False, True])
def test_a_block_of_zeros_in_a_stream_lands_as_a_hole(hosts, resumable):
    nas, vm = hosts
    header = stream.Header(SIZE, BLOCK, "s1", 1234)
    data = _stream_with_a_zero_block(header, {2: os.urandom(BLOCK), 3: bytes(BLOCK),
                                              4: os.urandom(BLOCK)})
    sink = vm.receive("tank", "v", resumable=resumable)
    feed(sink, data)
    sink.close()
    assert data_blocks(folder(vm) / "data") == {2, 4}
    assert dev(vm).read(3 * BLOCK, BLOCK) == bytes(BLOCK)
    nas.create_zvol("tank", "w", SIZE, sparse=True)
    dev(nas, "w").write(3 * BLOCK, os.urandom(2 * BLOCK))
    nas.snapshot("tank", "w", "a")
    transfer(nas, vm, "a", vol="w")
    following = stream.Header(SIZE, BLOCK, "b", 5678, "a", snapshot_of(nas, "w", "a").guid)
    sink = vm.receive("tank", "w", resumable=resumable)
    feed(sink, _stream_with_a_zero_block(following, {3: bytes(BLOCK)}))
    sink.close()
    assert data_blocks(folder(vm, "w") / "data") == {4}
    assert dev(vm, "w", snap="a").read(3 * BLOCK, BLOCK) == dev(nas, "w", snap="a").read(
        3 * BLOCK, BLOCK)


def _receive_in_a_child(root, data):
    driver = zfs.SimZfs(root, "vm")
    sink = driver.receive("tank", "child")
    sink.write(data)
    sink.close()


def test_a_forked_child_receives_after_its_parent_did(hosts):
    """The digest workers are threads; a child forked after the parent used them makes its own."""
    nas, vm = hosts
    nas.create_zvol("tank", "v", SIZE, sparse=True)
    dev(nas).write(0, os.urandom(4 * MIB))
    nas.snapshot("tank", "v", "s1")
    data = transfer(nas, vm, "s1")
    child = multiprocessing.get_context("fork").Process(target=_receive_in_a_child,
                                                        args=(vm.root, data))
    child.start()
    child.join(120)                                    # a guard against a hang, not a measure
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    assert dev(vm, "child").read(0, SIZE) == dev(vm).read(0, SIZE)
