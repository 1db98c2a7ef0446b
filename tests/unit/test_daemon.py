from imgstorage.config import from_dict
from imgstorage.daemon import Daemon, SeenMessages
from imgstorage.messaging import Envelope


class FakeResponder:
    def __init__(self):
        self.replies, self.done_calls = [], 0

    def reply(self, message):
        self.replies.append(message)

    def done(self):
        self.done_calls += 1


def env(action, message_id="m1", user="guest", **body):
    return Envelope(action=action, body={"action": action, **body}, message_id=message_id,
                    reply_to="q", user_id=user, deadline=None)


def make(**cfg):
    calls = []

    def handler(e):
        calls.append(e.message_id)
        return {"action": "zvol_mapped", "status": "success"}

    d = Daemon(from_dict({"name": "nas-0-0", **cfg}), {"map_zvol": handler},
               restricted={"map_zvol"})
    return d, calls


def run_inline(d, e, r):
    d.dispatch(e, r, None)
    d.work_pool.shutdown(wait=True)


def test_seen_messages():
    seen = SeenMessages(size=2)
    assert seen.check("a") is None
    assert seen.check("a") is SeenMessages.RUNNING
    seen.finish("a", {"ok": 1})
    assert seen.check("a") == {"ok": 1}
    seen.check("b"), seen.check("c")
    assert seen.check("a") is None          # forgotten: only the newest ids are kept
    assert seen.check(None) is None


def test_duplicate_message_runs_once_and_gets_the_same_answer():
    d, calls = make()
    r1, r2 = FakeResponder(), FakeResponder()
    d.dispatch(env("map_zvol"), r1, None)
    d.work_pool.shutdown(wait=True)
    d.dispatch(env("map_zvol"), r2, None)
    assert calls == ["m1"]
    assert r2.replies == r1.replies and r2.done_calls == 1


def test_a_quick_action_delivered_twice_runs_twice_and_nothing_is_remembered():
    calls = []

    def listing(e):
        calls.append(e.message_id)
        return {"action": "list_zvols", "status": "success", "body": [{"zvol": "v"}] * 100}

    d = Daemon(from_dict({"name": "nas-0-0"}), {"list_zvols": listing},
               quick_actions={"list_zvols"})
    r1, r2 = FakeResponder(), FakeResponder()
    d.dispatch(env("list_zvols"), r1, None)
    d.dispatch(env("list_zvols"), r2, None)
    d.quick_pool.shutdown(wait=True)
    assert calls == ["m1", "m1"] and r1.replies == r2.replies and len(r1.replies) == 1
    assert r1.done_calls == r2.done_calls == 1
    assert d.seen.check("m1") is None and d.seen.bytes == len("m1")   # only now marked


def test_admin_users_restrict_management_actions():
    d, calls = make(admin_users=["admin"])
    r = FakeResponder()
    run_inline(d, env("map_zvol", user="compute-0-3"), r)
    assert calls == []
    assert "compute-0-3 is not allowed to ask for map_zvol" in r.replies[0]["error"]
    d, calls = make(admin_users=["admin"])
    r = FakeResponder()
    run_inline(d, env("map_zvol", user="admin"), r)
    assert calls == ["m1"] and r.replies[0]["status"] == "success"


def test_unknown_action_and_malformed_message():
    d, _ = make()
    r = FakeResponder()
    d.dispatch(env("format_disk"), r, None)
    assert r.replies[0]["error"] == "unknown action: format_disk" and r.done_calls == 1
    r = FakeResponder()
    d.dispatch(None, r, "malformed JSON: x")
    assert r.replies[0]["status"] == "error" and r.done_calls == 1


def test_requests_get_workers_of_their_own_and_the_broker_hands_over_enough():
    """Requests mostly wait on the kernel or a peer: their workers are not the few
    transfers a NAS runs at once, and a listing is never stuck behind busy workers."""
    d = Daemon(from_dict({"name": "nas-0-0", "img_sync_workers": 2, "request_workers": 40}),
               {})
    assert d.work_pool._max_workers == 40
    assert d.consumer.prefetch == 40 + d.quick_pool._max_workers > 40
    d.work_pool.shutdown()
    d.quick_pool.shutdown()
    assert Daemon(from_dict({"name": "nas-0-0"}), {}).work_pool._max_workers == 64
