#!/usr/bin/python3
"""The test agent inside a kernel-tier guest: the runner's hands on that node.

It answers one JSON request per TCP connection (a line in, a line out) on the
guest's user-network address, which only the runner's loopback port forward
reaches.  It never touches imgstorage's own state: it runs commands (to start
a daemon, to read the kernel's view), writes test patterns onto block
devices, and summarises a device's bytes so the runner can compare them with
what it expects.  Only the Python standard library: the guest's python3.

Reads and writes use O_DIRECT, as a VM with cache=none would, so neither
side's page cache can hide what really is on the device.
"""
from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import random
import re
import socketserver
import subprocess
import sys
import time

ALIGN = 4096
CHUNK = 1 << 20
ZERO = bytes(CHUNK)


def pattern(seed: int, length: int) -> bytes:
    """The same bytes on the host and in the guest (both run Python 3.11)."""
    return random.Random(seed).randbytes(length)


def _buffer(length: int) -> mmap.mmap:
    return mmap.mmap(-1, max(ALIGN, (length + ALIGN - 1) // ALIGN * ALIGN))


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def direct_write(path: str, offset: int, data: bytes) -> None:
    if offset % ALIGN or len(data) % ALIGN:
        raise ValueError(f"unaligned write: offset {offset}, length {len(data)}")
    buf = _buffer(len(data))
    buf[:len(data)] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        with memoryview(buf) as whole:
            done = 0
            while done < len(data):
                with whole[done:len(data)] as rest:
                    done += os.pwrite(fd, rest, offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def direct_chunks(path: str, offset: int = 0, length: int = None):
    """Yield (offset, bytes) of the device in 1 MiB pieces, read with O_DIRECT."""
    size = device_size(path)
    end = size if length is None else min(size, offset + length)
    buf = _buffer(CHUNK)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = offset
        while pos < end:
            want = min(CHUNK, end - pos)
            aligned = (want + ALIGN - 1) // ALIGN * ALIGN
            with memoryview(buf) as whole, whole[:aligned] as part:
                got = os.preadv(fd, [part], pos)
            if got <= 0:
                raise OSError(f"short read at {pos} of {path}")
            yield pos, bytes(buf[:min(got, want)])
            pos += min(got, want)
    finally:
        os.close(fd)
        buf.close()


# ------------------------------------------------------------------ operations
def op_ping(req):
    return {"host": os.uname().nodename, "uptime": float(open("/proc/uptime").read().split()[0])}


def op_run(req):
    started = time.monotonic()
    try:
        proc = subprocess.run(req["argv"], input=req.get("input"), capture_output=True,
                              text=True, timeout=req.get("timeout", 120))
    except subprocess.TimeoutExpired as exc:
        return {"rc": None, "stdout": exc.stdout or "", "stderr": exc.stderr or "",
                "timed_out": True, "seconds": time.monotonic() - started}
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "seconds": round(time.monotonic() - started, 3)}


def _do_writes(path, writes):
    for w in writes:
        data = (base64.b64decode(w["data"]) if "data" in w
                else pattern(w["seed"], w["length"]))
        direct_write(path, w["offset"], data)


def op_write(req):
    started = time.monotonic()
    _do_writes(req["path"], req["writes"])
    return {"seconds": round(time.monotonic() - started, 3)}


def _probe(argv):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def op_write_when(req):
    """Poll ``probe`` until its output matches ``match``; then write; then probe again.

    Done here rather than from the runner, so the writes land within
    milliseconds of the phase being seen, however slow the emulation is.
    """
    deadline = time.monotonic() + req.get("timeout", 120)
    rx = re.compile(req["match"])
    while True:
        before = _probe(req["probe"])
        if rx.search(before):
            break
        if time.monotonic() >= deadline:
            return {"matched": False, "before": before}
        time.sleep(req.get("interval", 0.05))
    started = time.monotonic()
    _do_writes(req["path"], req["writes"])
    took = time.monotonic() - started
    return {"matched": True, "before": before, "after": _probe(req["probe"]),
            "seconds": round(took, 3)}


def op_summary(req):
    """Per 1 MiB chunk: None when all zero, else its sha256; plus the device size."""
    started = time.monotonic()
    path = req["path"]
    chunks = []
    for _pos, data in direct_chunks(path, req.get("offset", 0), req.get("length")):
        chunks.append(None if data == ZERO[:len(data)] else hashlib.sha256(data).hexdigest())
    return {"size": device_size(path), "chunks": chunks,
            "seconds": round(time.monotonic() - started, 3)}


def op_read(req):
    out = bytearray()
    for _pos, data in direct_chunks(req["path"], req["offset"], req["length"]):
        out += data
    return {"data": base64.b64encode(bytes(out)).decode()}


OPS = {"ping": op_ping, "run": op_run, "write": op_write, "write_when": op_write_when,
       "summary": op_summary, "read": op_read}


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        try:
            req = json.loads(line)
            reply = {"ok": True, **OPS[req["op"]](req)}
        except Exception as exc:  # the runner shows it; the agent stays up
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    address = sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 7000
    with Server((address, port), Handler) as server:
        print(f"agent listening on {address}:{port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
