"""How long a handler may work for a caller: the deadline on the receiver's clock."""
import time

import pytest

from imgstorage.messaging import Envelope, _deadline, answer_margin


def test_no_headers_no_deadline():
    assert _deadline({}, 1000.0) is None


def test_a_receiver_whose_clock_runs_behind_still_stops_in_time():
    # The caller's wall clock is 3 s ahead of ours: its absolute deadline looks 3 s later to us.
    now = 1000.0
    headers = {"x-deadline-ms": int((now + 3 + 20) * 1000), "x-timeout-ms": 20000}
    assert _deadline(headers, now) == pytest.approx(now + 20)


def test_a_receiver_whose_clock_runs_ahead_keeps_the_earlier_deadline():
    now = 1000.0
    headers = {"x-deadline-ms": int((now - 3 + 20) * 1000), "x-timeout-ms": 20000}
    assert _deadline(headers, now) == pytest.approx(now + 17)


def test_a_request_from_an_older_caller_has_only_the_absolute_deadline():
    assert _deadline({"x-deadline-ms": 1_020_000}, 1000.0) == pytest.approx(1020.0)


@pytest.mark.parametrize("headers", [
    {"x-deadline-ms": "soon"}, {"x-timeout-ms": True}, {"x-timeout-ms": -5},
    {"x-timeout-ms": 0}, {"x-deadline-ms": None, "x-timeout-ms": 1.5}])
def test_headers_of_the_wrong_type_are_ignored(headers):
    assert _deadline(headers, 1000.0) is None


@pytest.mark.parametrize("timeout,margin", [(2, 1.0), (8, 1.0), (20, 2.0), (45, 4.5), (600, 5.0)])
def test_the_answer_margin_is_a_tenth_between_one_and_five_seconds(timeout, margin):
    assert answer_margin(timeout) == pytest.approx(margin)


def _env(deadline):
    return Envelope(action="x", body={}, message_id=None, reply_to=None, user_id=None,
                    deadline=deadline)


def test_budget_keeps_the_margin_back():
    env = _env(time.time() + 20)
    assert 17.5 < env.budget(99) <= 18.0


def test_budget_without_deadline_uses_the_default_less_its_margin():
    assert _env(None).budget(30) == pytest.approx(27.0)


def test_budget_is_never_below_a_second():
    assert _env(time.time() - 5).budget(30) == 1.0
