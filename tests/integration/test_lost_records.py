"""A NAS killed between a transfer's last byte and its own record of it.

The kill tests in test_kill_sync.py land wherever the kill happens to land.
These put the NAS's database exactly in the state such a kill leaves (the
stream arrived, the record did not) and start the daemon on it, so the
narrow window is tested every time rather than once in a while.
"""
from __future__ import annotations

import random
import signal
import sqlite3
import time

import pytest

from .sync_helpers import (FAST, KIB, NAS, assert_container_clean, assert_nas_holds, diagnose,
                           do_writes, nas_row, phase_writes, prepare_zvol, set_zvolattr,
                           sync_cluster_body, sync_map, unmap, wait_nas_state, wait_until)


@pytest.fixture(scope="module")
def lc(tmp_path_factory, vhost):
    yield from sync_cluster_body(tmp_path_factory, vhost, "lost")


def rewrite_nas_row(c, zvol: str, **values) -> None:
    """Set columns of the stopped NAS's record, as a kill at the right moment leaves them."""
    assert c.stop(NAS, sig=signal.SIGKILL) == -signal.SIGKILL
    columns = sorted(values)
    db = sqlite3.connect(str(c.db_path(NAS)), timeout=10)
    try:
        with db:
            db.execute("UPDATE nas_zvols SET " + ", ".join(f"{k} = ?" for k in columns)
                       + " WHERE zvol = ?", [values[k] for k in columns] + [zvol])
    finally:
        db.close()
    c.start([NAS])


def log_of(c) -> str:
    return c.log_path(NAS).read_text(errors="replace")


def finish(c, zvol: str, image, tail) -> None:
    unmap(c, zvol)
    wait_nas_state(c, zvol, "unmapped", timeout=90)
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert_nas_holds(c, zvol, image, tail)
    assert_container_clean(c, FAST, zvol)


def copied_and_pulled(c, zvol: str, seed: int):
    """A sync map running from its local copy after one periodic pull; the snapshots of both."""
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, FAST, 256 * KIB, seed=seed)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = sync_map(c, zvol, FAST)
    wait_nas_state(c, zvol, "local")
    copied = nas_row(c, zvol)["last_snapshot"]
    do_writes(c, FAST, dev, image, phase_writes(rng, 4))
    set_zvolattr(c, zvol, "nextsync", int(time.time()))          # pull now
    pulled = wait_until("a periodic pull", lambda: (lambda r: r["last_snapshot"] if r["state"] ==
                        "local" and r["last_snapshot"] != copied else None)(nas_row(c, zvol)),
                        show=lambda: diagnose(c, zvol))
    return rng, image, tail, dev, copied, pulled


def test_a_pull_received_whole_but_not_recorded_is_taken_as_the_base(lc):
    c, zvol = lc, "lost-pull"
    rng, image, tail, dev, copied, pulled = copied_and_pulled(c, zvol, seed=21)
    # killed while pulling, after the receive finished and before it was recorded
    rewrite_nas_row(c, zvol, state="pulling", last_snapshot=copied, transfer_snapshot=pulled)
    wait_nas_state(c, zvol, "local")
    do_writes(c, FAST, dev, image, phase_writes(rng, 4))
    set_zvolattr(c, zvol, "nextsync", int(time.time()))
    wait_until("the next pull", lambda: (lambda r: r["state"] == "local" and r["last_snapshot"]
                                         not in (copied, pulled))(nas_row(c, zvol)),
               show=lambda: diagnose(c, zvol))
    assert nas_row(c, zvol)["last_error"] is None, diagnose(c, zvol)
    assert f"of {zvol}: snapshot {pulled} had arrived whole before the daemon stopped" \
        in log_of(c)
    finish(c, zvol, image, tail)


def test_a_final_pull_received_whole_but_not_recorded_still_ends(lc):
    c, zvol = lc, "lost-final"
    rng, image, tail, dev, copied, pulled = copied_and_pulled(c, zvol, seed=22)
    do_writes(c, FAST, dev, image, phase_writes(rng, 4))
    # The unmap starts the final pull; the NAS is stopped first so that the record is
    # rewound to a final pull whose stream (the periodic one here) arrived unrecorded.
    rewrite_nas_row(c, zvol, last_snapshot=copied, transfer_snapshot=pulled)
    finish(c, zvol, image, tail)
    assert f"of {zvol}: snapshot {pulled} had arrived whole before the daemon stopped" \
        in log_of(c)


def test_a_copy_whose_merge_answer_was_lost_is_not_sent_again(lc):
    c, zvol = lc, "lost-copy"
    rng = random.Random(zvol)
    image, tail = prepare_zvol(c, zvol, FAST, 256 * KIB, seed=23)
    set_zvolattr(c, zvol, "frequency", 3600)
    dev = sync_map(c, zvol, FAST)
    do_writes(c, FAST, dev, image, phase_writes(rng, 4))
    wait_nas_state(c, zvol, "local")
    copied = nas_row(c, zvol)["last_snapshot"]
    # killed after sync_zvol reached the container and before the NAS recorded the merge
    rewrite_nas_row(c, zvol, state="uploading", last_snapshot=None, transfer_snapshot=copied)
    wait_nas_state(c, zvol, "local")
    row = nas_row(c, zvol)
    assert row["last_error"] is None and row["last_snapshot"] == copied, diagnose(c, zvol)
    assert row["transfer_snapshot"] is None, row
    assert f"NAS->VM copy of {zvol}: {FAST} has snapshot {copied} already (local there)" \
        in log_of(c)
    assert f"NAS->VM copy of {zvol} to {FAST}" not in log_of(c).split(
        f"has snapshot {copied} already")[1], "the copy was sent again"
    do_writes(c, FAST, dev, image, phase_writes(rng, 4))
    finish(c, zvol, image, tail)
