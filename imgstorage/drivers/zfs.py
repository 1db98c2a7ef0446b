"""ZFS volumes through the ``zfs``/``zpool`` commands or OpenZFS's libzfs_core.

Listing always goes through ``zfs list -Hp``: scripted mode is tab separated
with exact byte counts, and libzfs_core has no stable listing call.  Creating
and destroying use libzfs_core when pyzfs is installed, because errno values
are sturdier than parsed text; the command stays the fallback for what the
library cannot do the same way.

Sync mode adds snapshots and streams.  A stream is a child process (``zfs
send`` writing to a pipe, ``zfs receive`` reading one) wrapped as a
ByteSource or ByteSink; the same wrappers carry the remote commands that
imgstorage.transfer runs over ssh, so a refused stream reads the same
whichever host refused it.

Resumable streams and holds, as OpenZFS 2.1 (bookworm's zfsutils-linux
2.1.11) does them on a real kernel (tests/kernel, ``zfs-resume-by-hand``):

* ``zfs receive -s -F`` combines with every stream sync mode sends: a full
  stream into a new zvol, a full stream into an existing zvol without
  snapshots, an incremental stream.  Cut short (the sender died, or the
  receiving process was killed), the receive keeps what arrived.  Into a new
  zvol the zvol itself is left behind, marked inconsistent and without a
  /dev/zvol link; into an existing zvol the partial state is a hidden
  ``pool/zvol/%recv`` child and the zvol keeps its data.  In every case
  ``zfs get receive_resume_token pool/zvol`` reports the token on
  ``pool/zvol`` itself, and any new stream is refused ("contains
  partially-complete state") until the sender resumes (``zfs send -t``) or
  the state is thrown away (``zfs receive -A``, which destroys a new zvol
  altogether and only the ``%recv`` child of an existing one).
* A hold makes ``zfs destroy`` of the snapshot, and ``zfs destroy -r`` of its
  zvol, fail with "dataset is busy"; nothing is destroyed.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, List, Optional, Sequence

from .. import naming
from ..errors import (CommandError, DriverError, NotFoundError, NotResumableError,
                      ValidationError)
from ..runner import Runner
from .base import HOLD_TAG, ByteSink, ByteSource, ZvolInfo

log = logging.getLogger(__name__)

VOLBLOCKSIZE = 128 * 1024
# The original tools created every zvol this way: metadata-only ARC caching
# (the VM's own page cache holds the data) and large blocks for streaming.
CREATE_OPTIONS = ["-o", "primarycache=metadata", "-o", "volblocksize=128K"]
LIST_FIELDS = "name,volsize,used,refer"
DEVICE_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
# libzfs_core hands properties to the kernel untranslated, and the kernel
# takes index properties as numbers: 1 is "metadata" for primarycache.
PRIMARYCACHE_METADATA = 1
# Once ``zfs send`` has written its last byte it only has to exit.
SEND_EXIT_TIMEOUT = 120.0
# ``zfs receive`` commits after end of input: it replays the tail of the
# stream and syncs a transaction group, which a busy pool can make slow.
RECEIVE_COMMIT_TIMEOUT = 600.0
STDERR_TAIL = 64 * 1024
# What ``zfs get receive_resume_token`` prints: a version, a checksum and a
# length in hex, then the compressed token in hex, joined by dashes.  Nothing
# else may travel as a token: it goes on a command line, locally and over ssh.


def _missing(stderr: str) -> bool:
    return "dataset does not exist" in stderr


def _no_snapshot(stderr: str) -> bool:
    # ``zfs destroy pool/vol@snap`` words a missing snapshot this way.
    return "could not find any snapshots to destroy" in stderr or _missing(stderr)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _missing_line(stderr: str) -> str:
    """The line that says what is missing (``zfs holds`` adds "no datasets available")."""
    for line in stderr.splitlines():
        if "dataset does not exist" in line or "no longer exists" in line:
            return line.strip()
    return _last_line(stderr)


def _resume_refused(stderr: str) -> Optional[str]:
    """zfs's own line when ``zfs send -t`` refuses a token ("cannot resume send: ..."):
    the snapshot is gone or changed, or the token is corrupt; None otherwise."""
    for line in stderr.splitlines():
        if line.strip().startswith("cannot resume send"):
            return line.strip()
    return None


# The one rule for tokens (imgstorage.naming), under the name the driver and
# the ssh transport use before a token goes on a command line.
check_resume_token = naming.resume_token


def _check_tag(tag: str) -> str:
    # ``zfs hold``/``release`` take the tag as their first operand: one that
    # starts with "-" would be read as an option.
    if not isinstance(tag, str) or not tag or tag.startswith("-") or any(
            c.isspace() for c in tag):
        raise ValidationError(f"invalid zfs hold tag {tag!r}")
    return tag


def _number(text: str) -> int:
    return 0 if text in ("-", "") else int(text)


def parse_zfs_list(stdout: str) -> List[ZvolInfo]:
    """Rows of ``zfs list -Hp -o name,volsize,used,refer``."""
    zvols = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 4:
                raise ValueError("expected 4 fields")
            zvols.append(ZvolInfo(fields[0], _number(fields[1]), _number(fields[2]),
                                  _number(fields[3])))
        except ValueError as exc:
            log.warning("ignoring unreadable zfs list line %r: %s", line, exc)
    return zvols


def parse_snapshot_list(stdout: str, dataset: str) -> List[str]:
    """Snapshot names (the part after ``@``) of ``dataset``, in the order listed.

    ``-d 1`` already keeps other datasets out; the prefix check is there so a
    line we did not ask for can never be taken for one of ours.
    """
    prefix = dataset + "@"
    names = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(prefix) and len(line) > len(prefix):
            names.append(line[len(prefix):])
        elif line:
            log.warning("ignoring unexpected zfs list line %r", line)
    return names


def parse_send_size(output: str) -> Optional[int]:
    r"""The byte estimate in the parsable output of ``zfs send -nP``.

    OpenZFS prints one line per stream (``full\tTO\tBYTES`` or
    ``incremental\tFROM\tTO\tBYTES``; ``-I`` gives one per intermediate
    snapshot) and then ``size\tBYTES`` with the total.  The total wins; the
    per-stream lines are summed only when a version printed no total.
    """
    total = None
    streams = []
    for line in output.splitlines():
        fields = line.strip().split("\t")
        try:
            if fields[0] == "size" and len(fields) == 2:
                total = int(fields[1])
            elif ((fields[0] == "full" and len(fields) == 3)
                  or (fields[0] == "incremental" and len(fields) == 4)):
                streams.append(int(fields[-1]))
        except ValueError:
            log.warning("ignoring unreadable zfs send estimate line %r", line)
    if total is not None:
        return total
    if streams:
        return sum(streams)
    return None


def parse_holds(stdout: str, snapshot: str) -> List[str]:
    r"""The tags in ``zfs holds -H`` output: ``NAME\tTAG\tTIMESTAMP`` per hold."""
    tags = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0] == snapshot and fields[1]:
            tags.append(fields[1])
        else:
            log.warning("ignoring unexpected zfs holds line %r", line)
    return tags


def send_argv(pool: str, zvol: str, snap: str, base: Optional[str] = None,
              estimate: bool = False) -> List[str]:
    """``zfs send``'s argv; shared with the ssh transport, which runs it remotely.

    ``-I`` rather than ``-i``: the original scripts sent every intermediate
    snapshot too, so the receiver ends up with the same history.
    """
    argv = ["zfs", "send"]
    if estimate:
        argv.append("-nP")
    if base:
        argv += ["-I", f"@{base}"]
    argv.append(f"{pool}/{zvol}@{snap}")
    return argv


def send_resume_argv(token: str, estimate: bool = False) -> List[str]:
    """``zfs send -t``'s argv: the token names the snapshot, its base and the offset."""
    argv = ["zfs", "send"]
    if estimate:
        argv.append("-nP")
    return argv + ["-t", check_resume_token(token)]


def receive_argv(pool: str, zvol: str, resumable: bool = False) -> List[str]:
    """``zfs receive``'s argv.

    ``-F`` rolls the destination back to its newest snapshot first: the VM
    container's copy has been written since, and those writes are exactly
    what the incremental stream replaces.  ``-s`` keeps what arrived of a
    stream that is cut short, for ``zfs send -t`` to continue; it combines
    with ``-F`` for full and incremental streams alike, and a resumed stream
    is received with the same two flags.
    """
    return ["zfs", "receive", *(["-s"] if resumable else []), "-F", f"{pool}/{zvol}"]


# ------------------------------------------------------------------ streams
class ReceiveMismatch(CommandError):
    """The destination's snapshots do not line up with the stream.

    A separate class because the caller can do something about it: start
    over with a full stream into a fresh zvol instead of failing the sync.
    """


_MISMATCH_MARKERS = (
    "does not match incremental source",     # newest snapshot is not the stream's base
    "has been modified since most recent snapshot",  # only without -F
    "destination has snapshots",             # a full stream into a zvol with history
)


_PARTIAL_MARKER = "Partially received snapshot is saved"


class ReceiveInterrupted(CommandError):
    """A resumable receive was cut short and kept what arrived.

    ``zfs receive -s`` ends its complaint with the ``zfs send -t TOKEN``
    command to resume with; the message keeps the cause and leaves the long
    token out (``resume_token`` reads it from the destination).
    """

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stderr: str) -> None:
        super().__init__(argv, returncode, stderr)
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        cut = next((i for i, line in enumerate(lines) if line.startswith(_PARTIAL_MARKER)),
                   len(lines))
        cause = " ".join(lines[:cut]) or "the stream ended early"
        self.args = (f"`{' '.join(self.argv)}` failed (exit {returncode}): {cause} "
                     "The partially received stream was kept and can be resumed.",)


class ResumeRefused(CommandError, NotResumableError):
    """``zfs send -t`` refused its token once the stream had started (its snapshot
    went away meanwhile): the transfer must start over, as NotResumableError says."""

    code = NotResumableError.code


def stream_error(argv: Sequence[str], returncode: Optional[int], stderr: str) -> CommandError:
    """The error for a failed send or receive, from what the command printed."""
    flat = " ".join(stderr.split())   # zfs wraps some messages over two lines
    if _resume_refused(stderr):
        return ResumeRefused(argv, returncode, stderr)
    if any(marker in flat for marker in _MISMATCH_MARKERS):
        return ReceiveMismatch(argv, returncode, stderr)
    if _PARTIAL_MARKER in flat:
        return ReceiveInterrupted(argv, returncode, stderr)
    return CommandError(argv, returncode, stderr)


def is_receive_mismatch(exc: BaseException) -> bool:
    """Whether a failed transfer needs a fresh full stream rather than a retry.

    By text as well as by class: the refusal may have crossed a socket or
    come from the simulated driver, and then only its words survive.
    """
    if isinstance(exc, ReceiveMismatch):
        return True
    flat = " ".join(str(exc).split())
    return any(marker in flat for marker in _MISMATCH_MARKERS)


class _StreamProcess:
    """A child process at one end of a pipe, its stderr kept aside.

    stderr goes to an unlinked temporary file rather than a pipe: nobody
    reads stderr while the data flows, and a child blocked on a full stderr
    pipe would stall the stream forever.
    """

    def __init__(self, runner: Runner, argv: Sequence[str], *, produces: bool,
                 wait_timeout: float,
                 classify: Callable[[Sequence[str], Optional[int], str], CommandError]) -> None:
        self.argv = [str(a) for a in argv]
        self._wait_timeout = wait_timeout
        self._classify = classify
        self._lock = threading.Lock()
        self._done = False
        self._stderr = tempfile.TemporaryFile()
        try:
            if produces:
                self._proc = runner.popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=self._stderr)
            else:
                self._proc = runner.popen(self.argv, stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=self._stderr)
        except BaseException:
            self._stderr.close()
            raise

    def _stderr_text(self) -> str:
        try:
            size = os.fstat(self._stderr.fileno()).st_size
            self._stderr.seek(max(0, size - STDERR_TAIL))
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def _kill(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # Stuck in the kernel (D state); nothing more we can do from here.
            log.warning("%s did not exit after SIGKILL", self.argv)

    def _release(self) -> None:
        self._done = True
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except (OSError, ValueError):
                    pass   # a flush into a dead child: its status says why
        self._stderr.close()

    def _finish(self, timeout: float) -> None:
        """Reap the child; a non-zero exit becomes an error holding its stderr."""
        try:
            returncode = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with self._lock:
                self._kill()
                stderr = self._stderr_text()
                self._release()
            raise CommandError(self.argv, None, stderr, timed_out=True) from None
        with self._lock:
            stderr = self._stderr_text()
            self._release()
        if returncode != 0:
            raise self._classify(self.argv, returncode, stderr)

    def _check_open(self) -> None:
        if self._done:
            raise DriverError(f"the stream of `{' '.join(self.argv)}` is already closed")

    def abort(self) -> None:
        """Kill the child; what it produced or received is thrown away."""
        with self._lock:
            if self._done:
                return
            self._kill()
            self._release()


class CommandSource(_StreamProcess):
    """ByteSource over a command's stdout (``zfs send``, locally or over ssh)."""

    def __init__(self, runner: Runner, argv: Sequence[str], *,
                 wait_timeout: float = SEND_EXIT_TIMEOUT,
                 classify: Callable[[Sequence[str], Optional[int], str], CommandError] = stream_error
                 ) -> None:
        super().__init__(runner, argv, produces=True, wait_timeout=wait_timeout, classify=classify)

    def read(self, n: int) -> bytes:
        self._check_open()
        try:
            # read1: whatever the pipe holds, so progress and cancel checks
            # keep pace with a slow producer instead of waiting for n bytes.
            return self._proc.stdout.read1(n)
        except (OSError, ValueError) as exc:
            raise DriverError(f"reading from `{' '.join(self.argv)}` failed: {exc}") from None

    def close(self) -> None:
        """Wait for the producer; raise if it failed (the stream is then incomplete).

        Closing before the end makes the producer fail on a broken pipe,
        which is the truth: the stream was not consumed.
        """
        if self._done:
            return
        try:
            self._proc.stdout.close()
        except OSError:
            pass
        self._finish(self._wait_timeout)


class CommandSink(_StreamProcess):
    """ByteSink over a command's stdin (``zfs receive``, locally or over ssh)."""

    def __init__(self, runner: Runner, argv: Sequence[str], *,
                 wait_timeout: float = RECEIVE_COMMIT_TIMEOUT,
                 classify: Callable[[Sequence[str], Optional[int], str], CommandError] = stream_error
                 ) -> None:
        super().__init__(runner, argv, produces=False, wait_timeout=wait_timeout, classify=classify)

    def write(self, data: bytes) -> None:
        self._check_open()
        try:
            self._proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self._consumer_quit()
        except (OSError, ValueError) as exc:
            if self._done:   # aborted from another thread while we were blocked
                raise DriverError(f"the stream of `{' '.join(self.argv)}` was aborted") from None
            raise DriverError(f"writing to `{' '.join(self.argv)}` failed: {exc}") from None

    def close(self) -> None:
        """End the input and wait for the consumer to commit; raise if it did not."""
        if self._done:
            return
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            self._consumer_quit()
            return
        except (OSError, ValueError):
            pass
        self._finish(self._wait_timeout)

    def _consumer_quit(self) -> None:
        """The consumer exited mid-stream: report its reason, not the broken pipe."""
        if self._done:
            raise DriverError(f"the stream of `{' '.join(self.argv)}` was aborted")
        self._finish(min(self._wait_timeout, SEND_EXIT_TIMEOUT))
        raise DriverError(f"`{' '.join(self.argv)}` exited before reading the whole stream")


class ZfsCli:
    """ZfsDriver on the ``zfs`` and ``zpool`` commands."""

    def __init__(self, runner: Runner, *, device_timeout: float = DEVICE_TIMEOUT,
                 path_exists: Callable[[str], bool] = os.path.exists,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.device_timeout = device_timeout
        self._path_exists = path_exists
        self._sleep = sleep
        self._clock = clock

    # ------------------------------------------------------------ queries
    def list_pools(self) -> List[str]:
        out = self.runner.run(["zpool", "list", "-Hp", "-o", "name"]).stdout
        return [line.strip() for line in out.splitlines()
                if line.strip() and line.strip() != "no pools available"]

    def pool_exists(self, pool: str) -> bool:
        return pool in self.list_pools()

    def list_zvols(self, pool: Optional[str] = None) -> List[ZvolInfo]:
        argv = ["zfs", "list", "-Hp", "-o", LIST_FIELDS, "-t", "volume"]
        if pool is not None:
            argv += ["-r", pool]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if pool is not None and _missing(result.stderr):
                return []
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_zfs_list(result.stdout)

    def get_zvol(self, pool: str, zvol: str) -> Optional[ZvolInfo]:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "list", "-Hp", "-o", LIST_FIELDS, "-t", "volume", name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return None
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        for info in parse_zfs_list(result.stdout):
            if info.name == name:
                return info
        return None

    def device_path(self, pool: str, zvol: str) -> str:
        return f"/dev/zvol/{pool}/{zvol}"

    # ------------------------------------------------------------ changes
    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None:
        _check_size(size_bytes)
        argv = ["zfs", "create", *CREATE_OPTIONS, "-V", str(size_bytes)]
        if sparse:
            argv.append("-s")
        argv.append(f"{pool}/{zvol}")
        self.runner.run(argv)
        self._wait_for_device(self.device_path(pool, zvol))

    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "destroy"] + (["-r"] if recursive else []) + [name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise NotFoundError(f"zvol {name} does not exist")
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    # ---------------------------------------------------------- snapshots
    def snapshot(self, pool: str, zvol: str, snap: str) -> None:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "snapshot", f"{name}@{snap}"]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise NotFoundError(f"zvol {name} does not exist")
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def list_snapshots(self, pool: str, zvol: str) -> List[str]:
        name = f"{pool}/{zvol}"
        argv = ["zfs", "list", "-Hp", "-t", "snapshot", "-o", "name", "-s", "creation",
                "-d", "1", name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                # Not an empty list: "no snapshots" would send a full stream
                # over a zvol that is simply not there.
                raise NotFoundError(f"zvol {name} does not exist")
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        return parse_snapshot_list(result.stdout, name)

    def destroy_snapshot(self, pool: str, zvol: str, snap: str) -> None:
        full = f"{pool}/{zvol}@{snap}"
        argv = ["zfs", "destroy", full]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _no_snapshot(result.stderr):
                raise NotFoundError(f"snapshot {full} does not exist")
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    # ------------------------------------------------------------ streams
    def send_size(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> int:
        """Estimated stream size, so progress can show a percentage and an ETA."""
        argv = send_argv(pool, zvol, snap, base, estimate=True)
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise NotFoundError(_last_line(result.stderr))
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        size = parse_send_size(result.stdout)
        if size is None:
            # Some versions printed the dry run's verbose lines on stderr.
            size = parse_send_size(result.stderr)
        if size is None:
            raise DriverError(f"`{' '.join(argv)}` printed no size estimate")
        return size

    def send(self, pool: str, zvol: str, snap: str, base: Optional[str] = None) -> ByteSource:
        return CommandSource(self.runner, send_argv(pool, zvol, snap, base))

    def receive(self, pool: str, zvol: str, resumable: bool = False) -> ByteSink:
        """``zfs receive -F`` (``-s -F`` when resumable) reading the sink's bytes.

        A resumable sink that is aborted or cut short keeps what arrived: the
        kernel saves the partial state when the receive is killed as well as
        when its input ends early.  ``abort_resume`` throws it away.
        """
        return CommandSink(self.runner, receive_argv(pool, zvol, resumable))

    # --------------------------------------------------- resumable streams
    def resume_token(self, pool: str, zvol: str) -> Optional[str]:
        """The token of a cut resumable receive into ``pool/zvol``; None if nothing is partial.

        The property of ``pool/zvol`` covers both places the partial state can
        be: the zvol itself (a full stream into a new zvol) and its hidden
        ``%recv`` child (a stream into an existing zvol).  A zvol that does
        not exist has nothing partial.
        """
        name = f"{pool}/{zvol}"
        argv = ["zfs", "get", "-H", "-o", "value", "receive_resume_token", name]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return None
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        value = result.stdout.strip()
        if value in ("", "-"):
            return None
        try:
            return check_resume_token(value)
        except ValidationError:
            raise DriverError(f"`{' '.join(argv)}` printed no resume token: "
                              f"{value[:80]!r}") from None

    def abort_resume(self, pool: str, zvol: str) -> None:
        """``zfs receive -A``: forget a partial receive; no-op when there is none.

        A zvol that only exists because of the partial receive (a full stream
        into a new zvol) goes altogether; an existing zvol loses its
        ``%recv`` child and keeps its data and snapshots.
        """
        name = f"{pool}/{zvol}"
        argv = ["zfs", "receive", "-A", name]
        result = self.runner.run(argv, check=False)
        if result.returncode == 0:
            return
        # exit 1: "'pool/zvol' does not have any resumable receive state to abort";
        # exit 2: "cannot open 'pool/zvol': dataset does not exist" and the usage text.
        if "does not have any resumable receive state" in result.stderr or _missing(result.stderr):
            return
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def send_resume(self, pool: str, zvol: str, token: str) -> ByteSource:
        """``zfs send -t TOKEN``: the rest of the stream a cut receive asked for.

        ``pool``/``zvol`` are not used: the token names the snapshot (by name
        and guid, and ``zfs send -t`` finds it by guid wherever it is now)
        and the offset to continue from.  A token comes from the other node,
        so callers check it with :meth:`send_resume_size` first, which refuses
        one naming another dataset.  A snapshot that is gone fails the
        stream at close, in zfs's words ("used in the initial send no longer
        exists").
        """
        return CommandSource(self.runner, send_resume_argv(token))

    def send_resume_size(self, pool: str, zvol: str, token: str) -> int:
        """What is left of a resumed stream, estimated by ``zfs send -nP -t``.

        The dry run prints the decoded token first (``resume token
        contents:`` and its nvlist, tab indented) and then the usual
        ``full``/``incremental`` and ``size`` lines, counting only the bytes
        the receiver does not have yet.  The token comes from the other node:
        one whose ``toname`` is not a snapshot of ``pool/zvol`` would send
        another dataset, and is refused.
        """
        argv = send_resume_argv(token, estimate=True)
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            refused = _resume_refused(result.stderr)
            if refused:
                raise NotResumableError(refused)
            if _missing(result.stderr):
                raise NotFoundError(_missing_line(result.stderr))
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        size = parse_send_size(result.stdout)
        if size is None:
            size = parse_send_size(result.stderr)
        if size is None:
            raise DriverError(f"`zfs send -nP -t {token[:24]}...` printed no size estimate")
        named = [line.strip()[len("toname = "):] for line in result.stdout.splitlines()
                 if line.strip().startswith("toname = ")]
        if len(named) != 1 or named[0].split("@", 1)[0] != f"{pool}/{zvol}":
            raise ValidationError(f"the resume token names {named[0] if named else 'no snapshot'}"
                                  f", not a snapshot of {pool}/{zvol}")
        return size

    # -------------------------------------------------------------- holds
    def hold(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None:
        """``zfs hold``; a hold with this tag already there is success."""
        self._tag("hold", pool, zvol, snap, tag, "tag already exists on this dataset")

    def release(self, pool: str, zvol: str, snap: str, tag: str = HOLD_TAG) -> None:
        """``zfs release``; no hold with this tag is success."""
        self._tag("release", pool, zvol, snap, tag, "no such tag on this dataset")

    def _tag(self, verb: str, pool: str, zvol: str, snap: str, tag: str, done: str) -> None:
        """Run ``zfs hold|release``; ``done`` is how zfs says the goal was already met."""
        argv = ["zfs", verb, _check_tag(tag), f"{pool}/{zvol}@{snap}"]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0 and done not in result.stderr:
            self._snapshot_error(argv, result)

    def holds(self, pool: str, zvol: str, snap: str) -> List[str]:
        """The tags of the holds on ``pool/zvol@snap`` (none: empty output, exit 0)."""
        full = f"{pool}/{zvol}@{snap}"
        argv = ["zfs", "holds", "-H", full]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            self._snapshot_error(argv, result)
        return parse_holds(result.stdout, full)

    # ------------------------------------------------------- kept copies
    def snapshot_guid(self, pool: str, zvol: str, snap: str) -> int:
        """``zfs get guid`` of a snapshot: equal on two hosts only when one was received
        from the other, which is what lets an incremental stream build on it."""
        full = f"{pool}/{zvol}@{snap}"
        argv = ["zfs", "get", "-Hp", "-o", "value", "guid", full]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            self._snapshot_error(argv, result)
        value = result.stdout.strip()
        if not value.isdigit():
            raise DriverError(f"`{' '.join(argv)}` printed no guid: {value[:80]!r}")
        return int(value)

    def rollback(self, pool: str, zvol: str, snap: str, recursive: bool = False) -> None:
        """``zfs rollback [-r]``: the zvol's data becomes the snapshot's again."""
        argv = ["zfs", "rollback"] + (["-r"] if recursive else []) + [f"{pool}/{zvol}@{snap}"]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            self._snapshot_error(argv, result)

    def pool_available(self, pool: str) -> int:
        """``zfs get available`` of the pool's root: what a new thick zvol may reserve."""
        argv = ["zfs", "get", "-Hp", "-o", "value", "available", pool]
        result = self.runner.run(argv, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise NotFoundError(_missing_line(result.stderr))
            raise CommandError(argv, result.returncode, result.stderr, result.stdout)
        value = result.stdout.strip()
        if not value.isdigit():
            raise DriverError(f"`{' '.join(argv)}` printed no size: {value[:80]!r}")
        return int(value)

    @staticmethod
    def _snapshot_error(argv: List[str], result) -> None:
        """A missing snapshot (or zvol) is NotFoundError in zfs's words; the rest as is."""
        if _missing(result.stderr):
            raise NotFoundError(_missing_line(result.stderr))
        raise CommandError(argv, result.returncode, result.stderr, result.stdout)

    def _wait_for_device(self, path: str) -> None:
        """udev makes the /dev/zvol link after zfs returns; callers open it at once."""
        if self._path_exists(path):
            return
        try:
            self.runner.run(["udevadm", "settle", f"--timeout={int(self.device_timeout)}",
                             f"--exit-if-exists={path}"],
                            check=False, timeout=self.device_timeout + 10)
        except CommandError as exc:
            # No udevadm (a container) or it hung: the polling below decides.
            log.debug("udevadm settle: %s", exc)
        deadline = self._clock() + self.device_timeout
        while not self._path_exists(path):
            if self._clock() >= deadline:
                raise DriverError(f"{path} did not appear within {self.device_timeout:g} s "
                                  "of creating the zvol")
            self._sleep(POLL_INTERVAL)


def _check_size(size_bytes: int) -> None:
    # ZFS refuses a volsize that is not a multiple of volblocksize; say so in
    # our words before the library answers with a bare EINVAL.
    if not isinstance(size_bytes, int) or size_bytes <= 0 or size_bytes % VOLBLOCKSIZE:
        raise DriverError(f"zvol size {size_bytes!r} is not a positive multiple of 128 KiB")


class LibZfsCoreZfs(ZfsCli):
    """ZfsDriver that creates and destroys through pyzfs's libzfs_core.

    A thick (non-sparse) zvol still goes through ``zfs create``: the command
    sizes its refreservation from the pool's layout (parity, metadata), which
    libzfs_core leaves to the caller.
    """

    def __init__(self, runner: Runner, lzc: Any = None, **kwargs: Any) -> None:
        super().__init__(runner, **kwargs)
        if lzc is None:
            import libzfs_core as lzc
            import libzfs_core.exceptions  # noqa: F401 - binds lzc.exceptions
        self.lzc = lzc
        self._zfs_error = lzc.exceptions.ZFSError

    def create_zvol(self, pool: str, zvol: str, size_bytes: int, sparse: bool = False) -> None:
        if not sparse:
            super().create_zvol(pool, zvol, size_bytes, sparse=False)
            return
        _check_size(size_bytes)
        name = f"{pool}/{zvol}"
        props = {b"volsize": size_bytes, b"volblocksize": VOLBLOCKSIZE,
                 b"primarycache": PRIMARYCACHE_METADATA}
        try:
            self.lzc.lzc_create(name.encode(), ds_type="zvol", props=props)
        except self._zfs_error as exc:
            raise self._create_error(name, pool, exc) from None
        self._wait_for_device(self.device_path(pool, zvol))

    def _create_error(self, name: str, pool: str, exc: Exception) -> DriverError:
        """Word the failure as ``zfs create`` would, so operators see one vocabulary."""
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            if not self.lzc.lzc_exists(pool.encode()):
                return DriverError(f"cannot create '{name}': no such pool '{pool}'")
            return DriverError(f"cannot create '{name}': parent does not exist")
        if code == errno.EEXIST:
            return DriverError(f"cannot create '{name}': dataset already exists")
        return DriverError(f"cannot create '{name}': {exc}")

    def destroy(self, pool: str, zvol: str, recursive: bool = True) -> None:
        name = f"{pool}/{zvol}"
        try:
            self.lzc.lzc_destroy(name.encode())
            return
        except self._zfs_error as exc:
            code = getattr(exc, "errno", None)
            if code == errno.ENOENT:
                raise NotFoundError(f"zvol {name} does not exist") from None
            # EBUSY: snapshots (or an open device); EEXIST: child datasets.
            # ``zfs destroy -r`` removes the former and names the real cause
            # of the latter, so hand those cases to the command.
            if not (recursive and code in (errno.EBUSY, errno.EEXIST)):
                raise DriverError(f"cannot destroy '{name}': {exc}") from None
        super().destroy(pool, zvol, recursive=True)

    def snapshot(self, pool: str, zvol: str, snap: str) -> None:
        name = f"{pool}/{zvol}@{snap}"
        try:
            self.lzc.lzc_snapshot([name.encode()])
        except self._zfs_error as exc:
            code = _first_errno(exc)
            if code == errno.ENOENT:
                raise NotFoundError(f"zvol {pool}/{zvol} does not exist") from None
            if code == errno.EEXIST:
                raise DriverError(f"cannot create snapshot '{name}': dataset already exists") from None
            raise DriverError(f"cannot create snapshot '{name}': {exc}") from None

    def destroy_snapshot(self, pool: str, zvol: str, snap: str) -> None:
        name = f"{pool}/{zvol}@{snap}"
        # lzc_destroy_snaps silently skips a snapshot that is not there; ask
        # first so a wrong name is reported as the command would.
        if not self.lzc.lzc_exists(name.encode()):
            raise NotFoundError(f"snapshot {name} does not exist")
        try:
            self.lzc.lzc_destroy_snaps([name.encode()], defer=False)
        except self._zfs_error as exc:
            code = _first_errno(exc)
            if code == errno.EBUSY:
                reason = "dataset is busy"
            elif code == errno.EEXIST:
                reason = "snapshot is cloned"
            else:
                reason = str(exc)
            raise DriverError(f"cannot destroy snapshot {name}: {reason}") from None


def _first_errno(exc: Exception) -> Optional[int]:
    """pyzfs reports batch calls as a list of per-name errors; ours hold one name."""
    errors = getattr(exc, "errors", None)
    if errors:
        code = getattr(errors[0], "errno", None)
        if code is not None:
            return code
    return getattr(exc, "errno", None)


def make_zfs(runner: Runner) -> ZfsCli:
    """The best ZFS driver this machine can run."""
    try:
        import libzfs_core
    except ImportError:
        return ZfsCli(runner)
    return LibZfsCoreZfs(runner, libzfs_core)
