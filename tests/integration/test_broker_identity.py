"""One broker identity per node: rocks sync host imgstorage against the real broker.

A node's user is tried here with pika exactly as a compromised node would use
it: what its role needs works, everything else is refused by the broker.
Users are global to a broker, so every node name carries this run's own
suffix, and every user made here is deleted at the end.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid

import pika
import pika.exceptions
import pytest

from imgstorage.brokeradmin import BrokerAdmin, node_permissions
from imgstorage.config import from_dict
from imgstorage.simcluster import SimCluster, broker_url

from .conftest import fails, ok

RUN = uuid.uuid4().hex[:6]
NAS, VMC, VMC2, GONE = (f"nas-{RUN}", f"vmc-a-{RUN}", f"vmc-b-{RUN}", f"vmc-gone-{RUN}")
EXCHANGE = "rocks.vm-manage"


@pytest.fixture(scope="module")
def frontend(tmp_path_factory, vhost):
    """A frontend (the administrator is guest) with a NAS and two containers registered."""
    c = SimCluster(tmp_path_factory.mktemp("identity"), broker_url(vhost), nas=[NAS],
                   containers=[VMC, VMC2])
    (c.workdir / "db").mkdir(exist_ok=True)
    try:
        ok(c.rocks("add", "host", NAS, "appliance=nas"))
        ok(c.rocks("add", "host", VMC, "appliance=vm-container"))
        ok(c.rocks("add", "host", VMC2, "appliance=compute"))
        ok(c.rocks("set", "host", "attr", VMC2, "img_storage_vm", "true"))
        ok(c.rocks("add", "host", "compute-9-9", "appliance=compute"))   # not a node
        yield c
    finally:
        for user in (NAS, VMC, VMC2, GONE):
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)


@pytest.fixture(scope="module")
def synced(frontend):
    out = ok(frontend.rocks("sync", "host", "imgstorage"))
    return frontend, out


def report(c: SimCluster, host: str) -> dict:
    return json.loads(ok(c.rocks("report", "host", "imgstorage", host)))


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url.split(",")[0]))


def admin_channel(c: SimCluster):
    conn = connect(c.broker)
    return conn, conn.channel()


def refused(url: str, operation) -> int:
    """The reply code with which the broker closes the channel on ``operation``."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as exc:
            operation(ch)
            ch.basic_qos(prefetch_count=1)   # a round trip: an async refusal surfaces here
        return exc.value.reply_code
    finally:
        conn.close()


def state(c: SimCluster, vhost: str):
    """Users, permissions and queues as the broker has them."""
    a = BrokerAdmin(vhost)
    users = {u: t for u, t in a.list_users().items() if u.endswith(RUN)}
    return users, a.list_permissions(), a.list_queues()


# ----------------------------------------------------------------- sync
def test_sync_makes_one_user_per_node_and_twice_changes_nothing(synced, vhost):
    c, out = synced
    lines = out.splitlines()
    assert sorted(lines[:-1]) == sorted([f"{NAS}: created (user, quorum queue)",
                                         f"{VMC}: created (user, quorum queue)",
                                         f"{VMC2}: created (user, quorum queue)"])
    assert lines[-1] == "3 created, 0 updated, 0 unchanged"
    users, perms, queues = state(c, vhost)
    assert users == {NAS: [], VMC: [], VMC2: []}
    for node in (NAS, VMC, VMC2):
        assert perms[node] == node_permissions(node, EXCHANGE)
        assert queues[node] == "quorum"
    passwords = {n: report(c, n)["broker_url"] for n in (NAS, VMC, VMC2)}

    again = ok(c.rocks("sync", "host", "imgstorage")).splitlines()
    assert sorted(again[:-1]) == sorted(f"{n}: unchanged" for n in (NAS, VMC, VMC2))
    assert again[-1] == "0 created, 0 updated, 3 unchanged"
    assert state(c, vhost) == (users, perms, queues)
    assert {n: report(c, n)["broker_url"] for n in (NAS, VMC, VMC2)} == passwords
    for node, url in passwords.items():
        connect(url).close()                    # the password in the report still works


def test_sync_repairs_what_was_changed_by_hand(synced, vhost):
    c, _ = synced
    a = BrokerAdmin(vhost)
    a.set_permissions(VMC, node_permissions("other", EXCHANGE))
    a.change_password(VMC, "changed-by-hand")
    out = ok(c.rocks("sync", "host", "imgstorage", VMC)).splitlines()
    assert out == [f"{VMC}: updated (password, permissions)", "0 created, 1 updated, 0 unchanged"]
    assert a.user_permissions(VMC) == node_permissions(VMC, EXCHANGE)
    connect(report(c, VMC)["broker_url"]).close()


def test_sync_refuses_hosts_that_run_no_daemon(synced):
    c, _ = synced
    fails(c.rocks("sync", "host", "imgstorage", "compute-9-9"),
          "host compute-9-9 is neither a NAS nor a VM container")
    fails(c.rocks("sync", "host", "imgstorage", "nobody-9"), "unknown host nobody-9")


def test_the_password_is_in_no_attribute_listing(synced):
    c, _ = synced
    password = pika.URLParameters(report(c, NAS)["broker_url"]).credentials.password
    assert password and password not in ok(c.rocks("list", "host", "attr"))


# --------------------------------------------------------------- report
def test_report_carries_the_node_own_identity(synced, tmp_path):
    c, _ = synced
    nas = from_dict(report(c, NAS))
    assert nas.broker_user == NAS and nas.admin_users == ["guest"] and nas.nas_users is None
    assert nas.broker_url.endswith("@127.0.0.1:5672/" + c.broker.rsplit("/", 1)[1])
    vm = from_dict(report(c, VMC2))
    assert vm.broker_user == VMC2 and vm.admin_users == ["guest"] and vm.nas_users == [NAS]
    ok(c.rocks("set", "host", "attr", VMC, "imgstorage-admin-users", "root, ops"))
    assert from_dict(report(c, VMC)).admin_users == ["root", "ops"]

    path = tmp_path / "imgstorage.conf"
    path.write_text("old")
    os.chmod(path, 0o644)
    old = os.umask(0)
    try:
        assert ok(c.rocks("report", "host", "imgstorage", NAS, f"file={path}")) == ""
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert from_dict(json.loads(path.read_text())).broker_user == NAS
    assert [p.name for p in tmp_path.iterdir()] == ["imgstorage.conf"]


def test_report_before_sync_says_what_to_run(synced):
    c, _ = synced
    ok(c.rocks("add", "host", GONE, "appliance=vm-container"))
    try:
        fails(c.rocks("report", "host", "imgstorage", GONE),
              f"run 'rocks sync host imgstorage {GONE}' first")
    finally:
        ok(c.rocks("remove", "host", GONE))


# ---------------------------------------------------- what a node may do
def test_a_node_user_can_do_what_its_role_needs(synced):
    c, _ = synced
    url = report(c, VMC)["broker_url"]
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.exchange_declare(EXCHANGE, passive=True)
        ch.queue_declare(VMC, passive=True)
        # a notification to the NAS, published with its own validated user_id
        ch.basic_publish(EXCHANGE, NAS, b'{"action": "ping"}',
                         pika.BasicProperties(user_id=VMC), mandatory=True)
        # its own queue, and a direct reply-to queue for its own requests
        ch.basic_consume(VMC, lambda *a: None)
        ch.basic_consume("amq.rabbitmq.reply-to", lambda *a: None, auto_ack=True)
    finally:
        conn.close()
    aconn, ach = admin_channel(c)
    try:
        method, props, body = ach.basic_get(NAS, auto_ack=True)
        assert body == b'{"action": "ping"}' and props.user_id == VMC
        # a request to the container, answered through direct reply-to
        replies = []
        ach.basic_consume("amq.rabbitmq.reply-to", lambda _c, _m, _p, b: replies.append(b),
                          auto_ack=True)
        ach.basic_publish(EXCHANGE, VMC, b"request",
                          pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        conn = connect(url)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            got = None
            while got is None or got[0] is None:
                got = ch.basic_get(VMC, auto_ack=True)
            assert got[2] == b"request"
            ch.basic_publish("", got[1].reply_to, b"reply", pika.BasicProperties(user_id=VMC))
        finally:
            conn.close()
        while not replies:
            aconn.process_data_events(time_limit=0.2)
        assert replies == [b"reply"]
    finally:
        aconn.close()


def test_a_node_user_is_refused_everything_else(synced):
    c, _ = synced
    url = report(c, VMC)["broker_url"]
    assert refused(url, lambda ch: ch.queue_declare("evil", durable=True)) == 403
    assert refused(url, lambda ch: ch.queue_declare("", exclusive=True)) == 403
    assert refused(url, lambda ch: ch.queue_declare(VMC, durable=True,
                                                    arguments={"x-queue-type": "quorum"})) == 403
    assert refused(url, lambda ch: ch.exchange_declare(EXCHANGE, "direct", durable=True)) == 403
    assert refused(url, lambda ch: ch.exchange_declare("evil", "fanout")) == 403
    # no binding of any queue, its own included, to another node's routing key
    assert refused(url, lambda ch: ch.queue_bind(VMC, EXCHANGE, routing_key=VMC2)) == 403
    assert refused(url, lambda ch: ch.queue_bind(VMC2, EXCHANGE, routing_key=VMC2)) == 403
    # another node's queue cannot be read, purged or deleted; its own cannot be deleted
    assert refused(url, lambda ch: ch.basic_consume(VMC2, lambda *a: None)) == 403
    assert refused(url, lambda ch: ch.basic_get(NAS)) == 403
    assert refused(url, lambda ch: ch.queue_purge(VMC2)) == 403
    assert refused(url, lambda ch: ch.queue_delete(VMC2)) == 403
    assert refused(url, lambda ch: ch.queue_delete(VMC)) == 403
    # publishing elsewhere, or as somebody else
    assert refused(url, lambda ch: ch.basic_publish("amq.direct", NAS, b"x")) == 403
    assert refused(url, lambda ch: ch.basic_publish(
        EXCHANGE, NAS, b"x", pika.BasicProperties(user_id="guest"))) == 406
    users, _perms, queues = state(c, c.broker.rsplit("/", 1)[1])
    assert "evil" not in queues and set(users) == {NAS, VMC, VMC2}


# ---------------------------------------------------------------- remove
def test_remove_host_removes_its_user_and_queue(synced, vhost):
    c, _ = synced
    ok(c.rocks("add", "host", GONE, "appliance=vm-container"))
    ok(c.rocks("sync", "host", "imgstorage", GONE))
    users, _perms, queues = state(c, vhost)
    assert GONE in users and GONE in queues
    assert ok(c.rocks("remove", "host", GONE)) == ""
    users, perms, queues = state(c, vhost)
    assert GONE not in users and GONE not in perms and GONE not in queues
    fails(c.rocks("report", "host", "imgstorage", GONE), f"unknown host {GONE}")


def test_remove_host_with_the_broker_out_of_reach_warns_and_removes(synced, vhost):
    c, _ = synced
    ok(c.rocks("add", "host", GONE, "appliance=vm-container"))
    ok(c.rocks("sync", "host", "imgstorage", GONE))
    conf = json.loads(c.config_path("frontend").read_text())
    conf["broker_node"] = "rabbit@nowhere"
    path = c.workdir / "etc" / "frontend-unreachable.conf"
    path.write_text(json.dumps(conf))
    proc = c.rocks("--config", str(path), "remove", "host", GONE)
    assert proc.returncode == 0
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning - broker user {GONE} and queue {GONE} "
                                               "are left behind")
    assert f"rabbitmqctl delete_user {GONE}" in err[0]
    fails(c.rocks("list", "host", GONE), f"unknown host {GONE}")
    assert GONE in state(c, vhost)[0]           # left behind, as the warning said
    BrokerAdmin(vhost).delete_user(GONE)
