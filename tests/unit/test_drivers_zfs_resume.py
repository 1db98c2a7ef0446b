"""Resumable streams and holds of the real ZFS drivers, against real zfs output.

Every fixture here was recorded by the kernel tier's ``zfs-resume-by-hand``
scenario (OpenZFS 2.1.11 on Debian bookworm): the source zvol is
``tank/ksr-a`` with snapshots ``s1`` and ``s2``; ``tank/ksr-b`` received a
cut full stream (new zvol) and later a cut incremental; ``tank/ksr-d`` is an
existing zvol without snapshots that received a cut full stream.  Streams run
a small Python child in place of ``zfs`` that replays the recorded stderr and
exit status around real bytes.
"""
from __future__ import annotations

import errno
import sys
import types
from typing import List

import pytest

from imgstorage.drivers.base import HOLD_TAG, ZfsDriver
from imgstorage.drivers.zfs import (CommandSink, CommandSource, LibZfsCoreZfs, ReceiveInterrupted,
                                    ReceiveMismatch, ZfsCli, check_resume_token,
                                    is_receive_mismatch, parse_holds, parse_send_size,
                                    receive_argv, send_argv, send_resume_argv, stream_error)
from imgstorage.errors import (CommandError, DriverError, NotFoundError, NotResumableError,
                               ValidationError)
from imgstorage.runner import Runner
from imgstorage.transfer import SSH_OPTIONS, pump, ssh_sink, ssh_source
from tests.unit.replay import ReplayRunner, load_fixture

SRC = "ksr-a"
NEW = "ksr-b"          # the zvol a full stream created
EXISTING = "ksr-d"     # a zvol that was there before the stream
GET_TOKEN = ["zfs", "get", "-H", "-o", "value", "receive_resume_token"]


def token_in(fixture: str) -> str:
    """The token a fixture's command line carries after ``-t``."""
    words = load_fixture(fixture).command.split()
    return words[words.index("-t") + 1]


TOKEN_FULL = token_in("zfs/real_send_resume_estimate.txt")
TOKEN_INCREMENTAL = token_in("zfs/real_send_resume_estimate_incremental.txt")
TOKEN_GONE = token_in("zfs/real_send_resume_gone.txt")


def cli(runner) -> ZfsCli:
    return ZfsCli(runner, path_exists=lambda path: True)


# ------------------------------------------------------------ the fixtures
def test_the_recorded_tokens_are_the_ones_the_cut_receives_printed():
    # The cut receive names the command to resume with; zfs get reports the same token.
    cut = load_fixture("zfs/real_receive_resumable_cut.txt")
    assert cut.stderr.splitlines()[-1] == f"    zfs send -t {TOKEN_FULL}"
    assert load_fixture("zfs/real_resume_token_new.txt").stdout == TOKEN_FULL + "\n"
    cut = load_fixture("zfs/real_receive_resumable_cut_incremental.txt")
    assert cut.stderr.splitlines()[-1] == f"    zfs send -t {TOKEN_INCREMENTAL}"
    # A full stream cut at the same byte into an existing zvol: the very same token.
    assert load_fixture("zfs/real_resume_token_existing.txt").stdout == TOKEN_FULL + "\n"
    assert token_in("zfs/real_send_resume.txt") == TOKEN_FULL
    assert token_in("zfs/real_send_resume_incremental.txt") == TOKEN_INCREMENTAL


@pytest.mark.parametrize("token", [TOKEN_FULL, TOKEN_INCREMENTAL, TOKEN_GONE])
def test_real_tokens_pass_the_check(token):
    assert token.startswith("1-") and len(token) > 100
    assert check_resume_token(token) == token


@pytest.mark.parametrize("token", [
    "", "1-ab cd", "1-ab;reboot", "1-ab/cd", "1.2", "--t=x", "1-ab\n", "1-ab$(id)",
    "t" * 4097, "caf\u00e9",
    None, 12, b"1-abc",
])
def test_anything_else_is_refused_as_a_token(token):
    with pytest.raises(ValidationError, match="invalid zfs resume token"):
        check_resume_token(token)


def test_a_long_bad_token_is_not_echoed_whole():
    with pytest.raises(ValidationError) as err:
        check_resume_token("x" * 5000)
    assert len(str(err.value)) < 120


# ------------------------------------------------------------------- argv
def test_receive_argv_puts_s_before_f():
    assert receive_argv("tank", NEW) == ["zfs", "receive", "-F", "tank/ksr-b"]
    assert receive_argv("tank", NEW, resumable=True) == ["zfs", "receive", "-s", "-F",
                                                         "tank/ksr-b"]
    # what the scenario ran, word for word
    assert " ".join(receive_argv("tank", NEW, True)) in \
        load_fixture("zfs/real_receive_resumable_cut.txt").command


def test_send_resume_argv():
    assert send_resume_argv(TOKEN_FULL) == ["zfs", "send", "-t", TOKEN_FULL]
    assert send_resume_argv(TOKEN_FULL, estimate=True) == ["zfs", "send", "-nP", "-t", TOKEN_FULL]
    assert " ".join(send_resume_argv(TOKEN_FULL, estimate=True)) == \
        load_fixture("zfs/real_send_resume_estimate.txt").command
    with pytest.raises(ValidationError):
        send_resume_argv("--help=x")
    # The shape allows a leading dash; after -t it is only ever the option's value.
    assert send_resume_argv("-v") == ["zfs", "send", "-t", "-v"]


def test_plain_send_argv_is_unchanged():
    assert send_argv("tank", SRC, "s2", "s1") == ["zfs", "send", "-I", "@s1", "tank/ksr-a@s2"]


def test_the_real_drivers_are_still_zfs_drivers():
    assert isinstance(cli(ReplayRunner()), ZfsDriver)


# ------------------------------------------------------------ resume_token
@pytest.mark.parametrize("zvol, fixture, token", [
    (NEW, "zfs/real_resume_token_new.txt", TOKEN_FULL),                 # the zvol itself
    (NEW, "zfs/real_resume_token_incremental.txt", TOKEN_INCREMENTAL),  # its %recv child
    (EXISTING, "zfs/real_resume_token_existing.txt", TOKEN_FULL),       # its %recv child
])
def test_resume_token_is_read_from_the_zvol_in_every_case(zvol, fixture, token):
    runner = ReplayRunner().expect(GET_TOKEN + [f"tank/{zvol}"], fixture)
    assert cli(runner).resume_token("tank", zvol) == token
    runner.assert_all_used()


def test_no_partial_state_is_none():
    runner = ReplayRunner().expect(GET_TOKEN + ["tank/ksr-b"], "zfs/real_resume_token_none.txt")
    assert cli(runner).resume_token("tank", NEW) is None


def test_a_zvol_that_does_not_exist_has_no_token():
    runner = ReplayRunner().expect(GET_TOKEN + ["tank/ksr-b"],
                                   "zfs/real_resume_token_missing.txt")
    assert cli(runner).resume_token("tank", NEW) is None


def test_a_token_of_an_unexpected_shape_is_a_driver_error():
    runner = ReplayRunner().expect(GET_TOKEN + ["tank/v"], stdout="1-ab cd; reboot\n")
    with pytest.raises(DriverError, match="printed no resume token") as err:
        cli(runner).resume_token("tank", "v")
    assert not isinstance(err.value, ValidationError)


def test_other_failures_of_zfs_get_are_reported():
    runner = ReplayRunner().expect(GET_TOKEN + ["tank/v"], returncode=1,
                                   stderr="internal error: Permission denied\n")
    with pytest.raises(CommandError, match="Permission denied"):
        cli(runner).resume_token("tank", "v")


# ------------------------------------------------------------ abort_resume
@pytest.mark.parametrize("zvol, fixture", [
    ("ksr-e", "zfs/real_receive_abort.txt"),              # a new zvol: destroyed
    (EXISTING, "zfs/real_receive_abort_existing.txt"),    # an existing one: its %recv
    (EXISTING, "zfs/real_receive_abort_none.txt"),        # exit 1: nothing to abort
    ("ksr-e", "zfs/real_receive_abort_missing.txt"),      # exit 2: no such zvol
])
def test_abort_resume_succeeds_whether_or_not_there_is_state(zvol, fixture):
    runner = ReplayRunner().expect(["zfs", "receive", "-A", f"tank/{zvol}"], fixture)
    cli(runner).abort_resume("tank", zvol)
    runner.assert_all_used()


def test_the_no_op_cases_really_failed_in_zfs():
    # ... so the driver is what turns them into success.
    assert load_fixture("zfs/real_receive_abort_none.txt").returncode == 1
    missing = load_fixture("zfs/real_receive_abort_missing.txt")
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[0] == "cannot open 'tank/ksr-e': dataset does not exist"
    assert "usage:" in missing.stderr


def test_abort_resume_reports_other_failures():
    runner = ReplayRunner().expect(["zfs", "receive", "-A", "tank/v"], returncode=1,
                                   stderr="cannot destroy 'tank/v/%recv': dataset is busy\n")
    with pytest.raises(CommandError, match="dataset is busy"):
        cli(runner).abort_resume("tank", "v")


# ---------------------------------------------------------- send_resume_size
def test_resume_estimate_of_a_full_stream_skips_the_token_contents():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", TOKEN_FULL],
                                   "zfs/real_send_resume_estimate.txt")
    assert cli(runner).send_resume_size("tank", SRC, TOKEN_FULL) == 4472952


def test_resume_estimate_of_an_incremental_stream():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", TOKEN_INCREMENTAL],
                                   "zfs/real_send_resume_estimate_incremental.txt")
    assert cli(runner).send_resume_size("tank", SRC, TOKEN_INCREMENTAL) == 3323480


def test_the_token_contents_are_not_read_as_estimates():
    text = load_fixture("zfs/real_send_resume_estimate.txt").stdout
    contents = "".join(line + "\n" for line in text.splitlines()
                       if not line.startswith(("full\t", "size\t")))
    assert "\tbytes = 0x1e80d8" in contents and "\ttoname = tank/ksr-a@s1" in contents
    assert parse_send_size(contents) is None
    # the estimate is what is left: bytes already received are not counted again
    assert parse_send_size(text) == 4472952


def test_resume_estimate_of_a_destroyed_snapshot_is_not_resumable():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", TOKEN_GONE],
                                   "zfs/real_send_resume_gone.txt")
    with pytest.raises(NotResumableError) as err:
        cli(runner).send_resume_size("tank", SRC, TOKEN_GONE)
    assert str(err.value) == ("cannot resume send: 'tank/ksr-a@s3' used in the initial send "
                              "no longer exists")
    assert err.value.code == "not_resumable"


def test_resume_estimate_of_a_corrupt_token_is_not_resumable():
    # zfs 2.1.11's words for a token that fails its checksum
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", "1-abc-12-789c"], returncode=255,
                                   stderr="cannot resume send: resume token is corrupt "
                                          "(incorrect checksum)\n")
    with pytest.raises(NotResumableError) as err:
        cli(runner).send_resume_size("tank", SRC, "1-abc-12-789c")
    assert str(err.value) == "cannot resume send: resume token is corrupt (incorrect checksum)"


def test_resume_estimate_of_a_missing_pool_is_not_found():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", TOKEN_FULL], returncode=1,
                                   stderr="cannot open 'nopool/v': dataset does not exist\n")
    with pytest.raises(NotFoundError) as err:
        cli(runner).send_resume_size("tank", SRC, TOKEN_FULL)
    assert not isinstance(err.value, NotResumableError)


def test_a_resumed_stream_refused_after_it_started_is_not_resumable():
    rec = load_fixture("zfs/real_send_resume_gone.txt")
    err = stream_error(["zfs", "send", "-t", TOKEN_GONE], rec.returncode, rec.stderr)
    assert isinstance(err, NotResumableError) and isinstance(err, CommandError)
    assert err.code == "not_resumable" and "no longer exists" in str(err)


def test_resume_estimate_without_a_size_is_an_error():
    runner = ReplayRunner().expect(["zfs", "send", "-nP", "-t", TOKEN_FULL],
                                   stdout="resume token contents:\nnvlist version: 0\n")
    with pytest.raises(DriverError, match="printed no size estimate"):
        cli(runner).send_resume_size("tank", SRC, TOKEN_FULL)


def test_a_bad_token_never_reaches_zfs():
    runner = ReplayRunner()
    for call in (lambda d: d.send_resume_size("tank", SRC, "a/b"),
                 lambda d: d.send_resume("tank", SRC, "1 2")):
        with pytest.raises(ValidationError):
            call(cli(runner))
    assert runner.calls == []


# ------------------------------------------------------------- live streams
PLAYER = r"""
import sys
mode, stderr_file, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "produce":
    sys.stdout.buffer.write(bytes(range(256)) * 4096)
    sys.stdout.buffer.flush()
else:
    while sys.stdin.buffer.read1(65536):
        pass
if stderr_file != "-":
    sys.stderr.write(open(stderr_file).read())
sys.exit(code)
"""


class PlayerRunner(Runner):
    """Records the argv the driver built; a Python child plays zfs's part."""

    def __init__(self, mode: str, stderr_file: str = "-", code: int = 0) -> None:
        self.args = [mode, stderr_file, str(code)]
        self.argvs: List[List[str]] = []

    def popen(self, argv, **kwargs):
        self.argvs.append([str(a) for a in argv])
        return super().popen([sys.executable, "-c", PLAYER, *self.args], **kwargs)


def stderr_file(fixture: str, tmp_path) -> str:
    path = tmp_path / "stderr.txt"
    path.write_text(load_fixture(fixture).stderr)
    return str(path)


def test_resumable_receive_runs_s_and_f(tmp_path):
    runner = PlayerRunner("consume")
    sink = cli(runner).receive("tank", NEW, resumable=True)
    assert isinstance(sink, CommandSink)
    sink.write(b"x" * 100000)
    sink.close()
    assert runner.argvs == [["zfs", "receive", "-s", "-F", "tank/ksr-b"]]


def test_receive_is_not_resumable_unless_asked():
    runner = PlayerRunner("consume")
    sink = cli(runner).receive("tank", NEW)
    sink.close()
    assert runner.argvs == [["zfs", "receive", "-F", "tank/ksr-b"]]


@pytest.mark.parametrize("fixture, cause", [
    ("zfs/real_receive_resumable_cut.txt",
     "cannot receive new filesystem stream: checksum mismatch or incomplete stream."),
    ("zfs/real_receive_resumable_cut_existing.txt",
     "cannot receive new filesystem stream: checksum mismatch or incomplete stream."),
    ("zfs/real_receive_resumable_cut_incremental.txt",
     "cannot receive incremental stream: checksum mismatch or incomplete stream."),
])
def test_a_cut_resumable_receive_says_why_and_that_it_kept_the_data(fixture, cause, tmp_path):
    rec = load_fixture(fixture)
    runner = PlayerRunner("consume", stderr_file(fixture, tmp_path), rec.returncode)
    sink = cli(runner).receive("tank", NEW, resumable=True)
    sink.write(b"\0" * 2000000)
    with pytest.raises(ReceiveInterrupted) as err:
        sink.close()
    text = str(err.value)
    assert text == (f"`zfs receive -s -F tank/ksr-b` failed (exit 1): {cause} "
                    "The partially received stream was kept and can be resumed.")
    assert "zfs send -t" not in text           # the 200-character token stays out of it
    assert err.value.stderr == rec.stderr     # ... but nothing zfs said is lost
    assert isinstance(err.value, CommandError) and not is_receive_mismatch(err.value)


@pytest.mark.parametrize("fixture", ["zfs/real_receive_resumable_refused.txt",
                                     "zfs/real_receive_resumable_refused_incremental.txt"])
def test_a_new_stream_refused_for_partial_state_is_neither_a_cut_nor_a_mismatch(fixture):
    rec = load_fixture(fixture)
    err = stream_error(["zfs", "receive", "-s", "-F", "tank/ksr-b"], rec.returncode, rec.stderr)
    assert type(err) is CommandError
    assert 'contains partially-complete state from "zfs receive -s"' in str(err)
    assert not is_receive_mismatch(err)


def test_plain_receive_failures_keep_their_classes():
    rec = load_fixture("zfs/real_receive_truncated.txt")
    assert type(stream_error(["zfs"], rec.returncode, rec.stderr)) is CommandError
    rec = load_fixture("zfs/real_receive_full_over_history.txt")
    assert isinstance(stream_error(["zfs"], rec.returncode, rec.stderr), ReceiveMismatch)


def test_send_resume_streams_from_the_token():
    runner = PlayerRunner("produce")
    source = cli(runner).send_resume("tank", SRC, TOKEN_FULL)
    assert isinstance(source, CommandSource)
    data = b""
    while True:
        piece = source.read(1 << 20)
        if not piece:
            break
        data += piece
    source.close()
    assert data == bytes(range(256)) * 4096
    assert runner.argvs == [["zfs", "send", "-t", TOKEN_FULL]]


def test_send_resume_ignores_the_names_it_is_given():
    # The token names the snapshot; the names are there for the simulated driver.
    runner = PlayerRunner("produce")
    cli(runner).send_resume("otherpool", "other", TOKEN_FULL).abort()
    assert runner.argvs == [["zfs", "send", "-t", TOKEN_FULL]]


def test_send_resume_of_a_destroyed_snapshot_fails_at_close(tmp_path):
    runner = PlayerRunner("none", stderr_file("zfs/real_send_resume_gone.txt", tmp_path), 255)
    source = cli(runner).send_resume("tank", SRC, TOKEN_GONE)
    assert source.read(4096) == b""
    with pytest.raises(CommandError, match="used in the initial send no longer exists") as err:
        source.close()
    assert err.value.returncode == 255


# -------------------------------------------------------------------- holds
SNAP = "tank/ksr-a@s1"


def test_hold_with_the_default_tag():
    runner = ReplayRunner().expect(["zfs", "hold", "imgstorage", SNAP], "zfs/real_hold.txt")
    cli(runner).hold("tank", SRC, "s1")
    runner.assert_all_used()
    assert HOLD_TAG == "imgstorage"


def test_holding_twice_is_success():
    runner = ReplayRunner().expect(["zfs", "hold", "imgstorage", SNAP], "zfs/real_hold_exists.txt")
    cli(runner).hold("tank", SRC, "s1", HOLD_TAG)
    assert load_fixture("zfs/real_hold_exists.txt").returncode == 1


def test_hold_of_a_missing_snapshot_is_not_found():
    runner = ReplayRunner().expect(["zfs", "hold", "imgstorage", "tank/ksr-a@nosuch"],
                                   "zfs/real_hold_missing.txt")
    with pytest.raises(NotFoundError) as err:
        cli(runner).hold("tank", SRC, "nosuch")
    assert str(err.value) == "cannot hold snapshot 'tank/ksr-a@nosuch': dataset does not exist"


def test_hold_with_another_tag():
    runner = ReplayRunner().expect(["zfs", "hold", "backup", SNAP])
    cli(runner).hold("tank", SRC, "s1", "backup")
    runner.assert_all_used()


@pytest.mark.parametrize("tag", ["", "-r", "two words", "tab\there"])
def test_tags_that_zfs_would_misread_are_refused(tag):
    runner = ReplayRunner()
    with pytest.raises(ValidationError, match="invalid zfs hold tag"):
        cli(runner).hold("tank", SRC, "s1", tag)
    with pytest.raises(ValidationError):
        cli(runner).release("tank", SRC, "s1", tag)
    assert runner.calls == []


def test_release():
    runner = ReplayRunner().expect(["zfs", "release", "imgstorage", SNAP], "zfs/real_release.txt")
    cli(runner).release("tank", SRC, "s1")
    runner.assert_all_used()


def test_releasing_what_is_not_held_is_success():
    runner = ReplayRunner().expect(["zfs", "release", "imgstorage", SNAP],
                                   "zfs/real_release_none.txt")
    cli(runner).release("tank", SRC, "s1")
    assert "no such tag on this dataset" in load_fixture("zfs/real_release_none.txt").stderr


def test_release_on_a_missing_zvol_is_not_found():
    runner = ReplayRunner().expect(["zfs", "release", "imgstorage", "tank/nosuch@s1"],
                                   "zfs/real_release_missing.txt")
    with pytest.raises(NotFoundError) as err:
        cli(runner).release("tank", "nosuch", "s1")
    assert str(err.value) == "cannot open 'tank/nosuch': dataset does not exist"


def test_release_reports_other_failures():
    runner = ReplayRunner().expect(["zfs", "release", "imgstorage", SNAP], returncode=1,
                                   stderr="cannot release hold from snapshot 'tank/ksr-a@s1': "
                                          "permission denied\n")
    with pytest.raises(CommandError, match="permission denied"):
        cli(runner).release("tank", SRC, "s1")


def test_holds_lists_the_tags():
    runner = ReplayRunner().expect(["zfs", "holds", "-H", SNAP], "zfs/real_holds.txt")
    assert cli(runner).holds("tank", SRC, "s1") == ["imgstorage"]


def test_no_holds_is_an_empty_list():
    runner = ReplayRunner().expect(["zfs", "holds", "-H", SNAP], "zfs/real_holds_none.txt")
    assert cli(runner).holds("tank", SRC, "s1") == []


def test_holds_of_a_missing_snapshot_names_it_not_the_summary_line():
    runner = ReplayRunner().expect(["zfs", "holds", "-H", "tank/ksr-a@nosuch"],
                                   "zfs/real_holds_missing.txt")
    with pytest.raises(NotFoundError) as err:
        cli(runner).holds("tank", SRC, "nosuch")
    assert str(err.value) == "cannot open 'tank/ksr-a@nosuch': dataset does not exist"
    assert load_fixture("zfs/real_holds_missing.txt").stderr.splitlines()[-1] == \
        "no datasets available"


def test_parse_holds_keeps_every_tag_of_the_snapshot_only():
    line = load_fixture("zfs/real_holds.txt").stdout.splitlines()[0]
    stamp = line.split("\t")[2]
    text = (f"{SNAP}\timgstorage\t{stamp}\n{SNAP}\tother\t{stamp}\n"
            f"tank/ksr-a@s2\tstray\t{stamp}\nNAME  TAG  TIMESTAMP\n\n")
    assert parse_holds(text, SNAP) == ["imgstorage", "other"]


# ---------------------------------------------------- destroying what is held
def test_destroy_of_a_held_snapshot_is_an_error_in_zfs_words():
    runner = ReplayRunner().expect(["zfs", "destroy", SNAP], "zfs/real_destroy_snapshot_held.txt")
    with pytest.raises(DriverError) as err:
        cli(runner).destroy_snapshot("tank", SRC, "s1")
    assert not isinstance(err.value, NotFoundError)
    assert str(err.value) == ("`zfs destroy tank/ksr-a@s1` failed (exit 1): "
                              "cannot destroy snapshot tank/ksr-a@s1: dataset is busy")


def test_recursive_destroy_of_a_zvol_with_a_held_snapshot_fails_once():
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/ksr-a"],
                                   "zfs/real_destroy_recursive_held.txt")
    with pytest.raises(DriverError, match="cannot destroy snapshot tank/ksr-a@s1: dataset is busy"):
        cli(runner).destroy("tank", SRC)
    assert len(runner.calls) == 1


class FakeZFSError(Exception):
    def __init__(self, code: int, errors=None) -> None:
        self.errno = code
        self.errors = errors or []
        super().__init__(f"[Errno {code}]")


def fake_lzc(*, destroy_error=None, destroy_snaps_error=None, existing=()):
    calls = []

    def lzc_destroy(name):
        calls.append(("destroy", name))
        if destroy_error is not None:
            raise destroy_error

    def lzc_destroy_snaps(snaps, defer):
        calls.append(("destroy_snaps", list(snaps), defer))
        if destroy_snaps_error is not None:
            raise destroy_snaps_error

    def lzc_exists(name):
        return name in existing

    return types.SimpleNamespace(lzc_destroy=lzc_destroy, lzc_destroy_snaps=lzc_destroy_snaps,
                                 lzc_exists=lzc_exists, calls=calls,
                                 exceptions=types.SimpleNamespace(ZFSError=FakeZFSError))


def test_lzc_destroy_of_a_zvol_with_a_held_snapshot_falls_back_once_and_fails():
    # pyzfs on bookworm: lzc_destroy of a zvol with snapshots is DatasetBusy (EBUSY).
    lzc = fake_lzc(destroy_error=FakeZFSError(errno.EBUSY))
    runner = ReplayRunner().expect(["zfs", "destroy", "-r", "tank/ksr-a"],
                                   "zfs/real_destroy_recursive_held.txt")
    driver = LibZfsCoreZfs(runner, lzc, path_exists=lambda path: True)
    with pytest.raises(DriverError, match="cannot destroy snapshot tank/ksr-a@s1: dataset is busy"):
        driver.destroy("tank", SRC)
    assert lzc.calls == [("destroy", b"tank/ksr-a")]
    assert runner.argvs == [["zfs", "destroy", "-r", "tank/ksr-a"]]


def test_lzc_destroy_of_a_held_snapshot_reads_as_the_command_does():
    # SnapshotDestructionFailure holding one SnapshotIsHeld, both EBUSY
    lzc = fake_lzc(existing=(b"tank/ksr-a@s1",),
                   destroy_snaps_error=FakeZFSError(errno.EBUSY, [FakeZFSError(errno.EBUSY)]))
    driver = LibZfsCoreZfs(ReplayRunner(), lzc, path_exists=lambda path: True)
    with pytest.raises(DriverError) as err:
        driver.destroy_snapshot("tank", SRC, "s1")
    assert str(err.value) == load_fixture("zfs/real_destroy_snapshot_held.txt").stderr.strip()


def test_lzc_driver_holds_and_resumes_through_the_command():
    runner = (ReplayRunner()
              .expect(["zfs", "hold", "imgstorage", SNAP], "zfs/real_hold_exists.txt")
              .expect(["zfs", "holds", "-H", SNAP], "zfs/real_holds.txt")
              .expect(GET_TOKEN + ["tank/ksr-d"], "zfs/real_resume_token_existing.txt")
              .expect(["zfs", "receive", "-A", "tank/ksr-d"],
                      "zfs/real_receive_abort_existing.txt"))
    driver = LibZfsCoreZfs(runner, fake_lzc(), path_exists=lambda path: True)
    driver.hold("tank", SRC, "s1")
    assert driver.holds("tank", SRC, "s1") == [HOLD_TAG]
    assert driver.resume_token("tank", EXISTING) == TOKEN_FULL
    driver.abort_resume("tank", EXISTING)
    runner.assert_all_used()


# ---------------------------------------------------------------------- ssh
class SshRunner(Runner):
    def __init__(self, script: str = "pass") -> None:
        self.script = script
        self.argvs: List[List[str]] = []

    def popen(self, argv, **kwargs):
        self.argvs.append(list(argv))
        return super().popen([sys.executable, "-c", self.script], **kwargs)


SSH = ["ssh", *SSH_OPTIONS, "img-storage@compute-0-3"]


class Collect:
    def __init__(self) -> None:
        self.data = b""
        self.committed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.committed = True

    def abort(self) -> None:
        pass


def test_ssh_source_resumes_from_a_token():
    runner = SshRunner("import sys; sys.stdout.buffer.write(b'the rest')")
    source = ssh_source(runner, "img-storage", "compute-0-3", "tank", SRC, "s1",
                        resume_token=TOKEN_FULL)
    sink = Collect()
    assert pump(source, sink) == 8 and sink.data == b"the rest" and sink.committed
    # the token is one plain word: the remote shell gets it unquoted and whole
    assert runner.argvs == [SSH + ["zfs", "send", "-t", TOKEN_FULL]]


def test_ssh_source_without_a_token_is_unchanged():
    runner = SshRunner()
    ssh_source(runner, "img-storage", "compute-0-3", "tank", SRC, "s2", "s1").abort()
    assert runner.argvs == [SSH + ["zfs", "send", "-I", "@s1", "tank/ksr-a@s2"]]


@pytest.mark.parametrize("token", ["", "1-ab;reboot", "$(id)", "-oProxyCommand=x", "a\nb"])
def test_ssh_source_refuses_a_bad_token_before_running_anything(token):
    runner = SshRunner()
    with pytest.raises(ValidationError):
        ssh_source(runner, "img-storage", "compute-0-3", "tank", SRC, "s1", resume_token=token)
    assert runner.argvs == []


def test_ssh_sink_resumable_runs_receive_s_f_remotely():
    runner = SshRunner("import sys; sys.stdin.buffer.read()")
    sink = ssh_sink(runner, "img-storage", "compute-0-3", "tank", NEW, resumable=True)
    sink.write(b"stream")
    sink.close()
    assert runner.argvs == [SSH + ["zfs", "receive", "-s", "-F", "tank/ksr-b"]]


def test_ssh_sink_is_not_resumable_by_default():
    runner = SshRunner()
    ssh_sink(runner, "img-storage", "compute-0-3", "tank", NEW).abort()
    assert runner.argvs == [SSH + ["zfs", "receive", "-F", "tank/ksr-b"]]


def test_a_cut_remote_resumable_receive_is_reported_as_kept(tmp_path):
    path = stderr_file("zfs/real_receive_resumable_cut_incremental.txt", tmp_path)
    runner = SshRunner("import sys; sys.stdin.buffer.read(); "
                       f"sys.stderr.write(open({path!r}).read()); sys.exit(1)")
    sink = ssh_sink(runner, "img-storage", "compute-0-3", "tank", NEW, resumable=True)
    sink.write(b"\0" * 1000)
    with pytest.raises(ReceiveInterrupted, match="can be resumed"):
        sink.close()
