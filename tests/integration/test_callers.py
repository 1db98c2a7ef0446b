"""Strict mode: a container's own broker credentials cannot touch what is not its own.

The cluster is set up as README.rst tells an operator (``rocks sync host
imgstorage``, each node's configuration from ``rocks report host imgstorage``),
so the broker's permissions are the real, narrow ones.

One cluster, every node its own broker user; vm-container-0-14 runs a VM on a
sync-mode zvol of nas-0-0 and compute-0-3 attacks it with its own credentials
(the ones its daemon connects with): every container request to the other
container and to its own, a forged merge report and management requests to
the NAS.  Each is refused, the zvol, its device and its copy stay as they
were, and the normal workflow still brings every byte home.
"""
from __future__ import annotations

import json
import random

import pika
import pika.exceptions
import pytest

from imgstorage import protocol
from imgstorage.config import from_dict
from imgstorage.errors import ForbiddenError, RemoteError
from imgstorage.messaging import RpcClient

from .conftest import ok, strict_cluster
from .sync_helpers import (FAST, MIB, NAS, POOL, REGION, SLOW, do_writes, log_of, nas_row,
                           phase_writes, prepare_zvol, read, set_zvolattr, storagedev,
                           storagemap, sync_map, target_of, unmap_and_check, wait_local,
                           wait_until)

VICTIM, ATTACKER = FAST, SLOW


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vhost):
    yield from strict_cluster(tmp_path_factory, vhost, "callers")


def as_node(c, node: str) -> RpcClient:
    """A client with ``node``'s own broker credentials, as its daemon has them."""
    return RpcClient(from_dict(json.loads(c.config_path(node).read_text())))


def container_requests(zvol: str):
    return [
        {"action": "clean_zvol", "zvol": zvol},
        {"action": "del_local", "zvol": zvol},
        {"action": "send_zvol", "zvol": zvol, "snap": "imgstorage-stolen"},
        {"action": "recv_zvol", "zvol": zvol, "restart": True},
        {"action": "sync_zvol", "zvol": zvol},
        {"action": "unmap_zvol", "zvol": zvol, "target": target_of(zvol)},
        {"action": "map_zvol", "zvol": zvol, "target": target_of(zvol), "nas": NAS,
         "nas_node": NAS, "sync": False},
        {"action": "list_dev"},
        {"action": "initiator_name"},
    ]


def what_shows(c, zvol: str) -> tuple:
    """The zvol as the operator sees it on the NAS and on its container."""
    shown = storagemap(c)[zvol]
    dev = storagedev(c, VICTIM)[zvol]
    return ({k: shown[k] for k in ("state", "host", "zpool", "target")},
            {k: dev[k] for k in ("zvol", "lvm", "status", "size (gb)", "block dev")})


def attack_containers(c, zvol: str) -> None:
    with as_node(c, ATTACKER) as rpc:
        for node in (VICTIM, ATTACKER):
            for message in container_requests(zvol):
                reply = rpc.call(node, message, timeout=20)
                assert protocol.error_code(reply) == ForbiddenError.code, (node, reply)
                assert ATTACKER in reply["error"], reply
        # ping stays open
        assert rpc.request(VICTIM, {"action": "ping"}, timeout=20)["node"] == VICTIM


def test_a_containers_credentials_cannot_touch_another_containers_zvol(cluster):
    c, zvol = cluster, "guarded"
    rng = random.Random(42)
    image, tail = prepare_zvol(c, zvol, VICTIM, 512 * 1024, seed=42)
    set_zvolattr(c, zvol, "uploadspeed", 400000)      # the copy is still running at first
    dev = sync_map(c, zvol, VICTIM)
    do_writes(c, VICTIM, dev, image, phase_writes(rng, 3))

    # while the NAS copies the zvol to its container
    attack_containers(c, zvol)
    assert read(c, VICTIM, dev, 0, REGION) == image.bytes()

    # on the local copy alone, the state clean_zvol and del_local would destroy
    wait_local(c, VICTIM, zvol)
    do_writes(c, VICTIM, dev, image, phase_writes(rng, 3))
    before = what_shows(c, zvol)
    attack_containers(c, zvol)
    assert what_shows(c, zvol) == before
    assert read(c, VICTIM, dev, 0, REGION) == image.bytes()
    assert f"{POOL}/{zvol}" in ok(c.sim("zfs", "list", "--host", VICTIM))
    refusals = [line for line in log_of(c, VICTIM).splitlines()
                if f"refused clean_zvol of {zvol} from broker user '{ATTACKER}'" in line]
    assert len(refusals) == 2, refusals

    # a forged merge report from the wrong container changes nothing on the NAS
    with as_node(c, ATTACKER) as rpc:
        rpc.notify(NAS, {"action": "zvol_synced", "zvol": zvol, "status": "error",
                         "error": "forged report"})
    wait_until("the NAS's refusal of the forged report",
               lambda: f"refused zvol_synced of {zvol} from broker user '{ATTACKER}'"
               in log_of(c, NAS))
    assert nas_row(c, zvol)["last_error"] is None
    assert what_shows(c, zvol) == before

    # the normal workflow still works, every byte home
    do_writes(c, VICTIM, dev, image, phase_writes(rng, 2, big=MIB))
    unmap_and_check(c, VICTIM, zvol, image, tail)


@pytest.mark.parametrize("node", [VICTIM, ATTACKER])
def test_the_nas_takes_no_management_from_a_container(cluster, node):
    c = cluster
    zvol = f"kept-{node}"
    ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, VICTIM, "1", "img_sync=false"))
    before = storagemap(c)[zvol]
    with as_node(c, node) as rpc:
        for message in ({"action": "map_zvol", "zvol": "stolen", "zpool": POOL,
                         "remotehost": node, "size": 1},
                        {"action": "unmap_zvol", "zvol": zvol},
                        {"action": "del_zvol", "zvol": zvol, "zpool": POOL},
                        {"action": "clean_zvol", "zvol": zvol, "force": True},
                        {"action": "set_attrs", "attrs": {"frequency": "1"}},
                        {"action": "list_zvols"}, {"action": "get_attrs"},
                        {"action": "get_zvol_attrs", "zvol": zvol}):
            with pytest.raises(RemoteError) as err:
                rpc.request(NAS, message, timeout=20)
            assert err.value.code == ForbiddenError.code, err.value
        assert rpc.request(NAS, {"action": "ping"}, timeout=20)["node"] == NAS
    assert storagemap(c)[zvol] == before and "stolen" not in storagemap(c)
    assert f"{POOL}/stolen" not in ok(c.sim("zfs", "list", "--host", NAS))
    ok(c.rocks("remove", "host", "storagemap", NAS, zvol))


# ------------------------------------------------------------ the broker itself
def node_connection(c, node: str) -> pika.BlockingConnection:
    """A raw AMQP connection with ``node``'s own credentials, as an attacker holding them
    would open it (the daemons' own code would refuse to do most of what follows)."""
    cfg = from_dict(json.loads(c.config_path(node).read_text()))
    return pika.BlockingConnection(pika.URLParameters(cfg.broker_urls[0]))


def refused_by_broker(conn: pika.BlockingConnection, attempt) -> int:
    """The reply code of the broker's refusal (it closes the channel it was tried on)."""
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        attempt(ch)
    return err.value.reply_code


def test_the_broker_keeps_a_container_out_of_other_nodes_queues(cluster):
    c = cluster
    queues = {node: None for node in [NAS, VICTIM]}
    conn = node_connection(c, ATTACKER)
    try:
        exchange = from_dict(json.loads(c.config_path(ATTACKER).read_text())).exchange
        for node in queues:
            # read another node's requests (CHAP secrets, stream tokens)
            assert refused_by_broker(conn, lambda ch: ch.basic_consume(
                queue=node, on_message_callback=lambda *a: None)) == 403
            assert refused_by_broker(conn, lambda ch: ch.basic_get(queue=node)) == 403
            # route another node's requests to a queue of its own
            assert refused_by_broker(conn, lambda ch: ch.queue_bind(
                queue=ATTACKER, exchange=exchange, routing_key=node)) == 403
            assert refused_by_broker(conn, lambda ch: ch.queue_purge(queue=node)) == 403
            assert refused_by_broker(conn, lambda ch: ch.queue_delete(queue=node)) == 403
        assert refused_by_broker(conn, lambda ch: ch.queue_declare(
            queue="", exclusive=True)) == 403
        # a message under another node's name: the broker checks user_id
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            ch.basic_publish(exchange=exchange, routing_key=VICTIM, body=b'{"action":"ping"}',
                             properties=pika.BasicProperties(user_id=NAS))
        assert err.value.reply_code == 406
    finally:
        conn.close()
    # every node still serves
    for node in (NAS, VICTIM, ATTACKER):
        with as_node(c, VICTIM if node == NAS else NAS) as rpc:
            assert rpc.request(node, {"action": "ping"}, timeout=20)["node"] == node


def test_no_daemon_answers_into_a_queue_or_runs_a_reply(cluster):
    c = cluster
    zvol = "answered"
    ok(c.rocks("add", "host", "storagemap", NAS, POOL, zvol, VICTIM, "1", "img_sync=false"))
    before = (storagemap(c)[zvol], storagedev(c, VICTIM)[zvol])
    conn = node_connection(c, ATTACKER)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        # 1. ask the NAS something with the victim's queue as reply_to: the answer
        #    would arrive there under the NAS's user, as if the NAS had asked
        ch.basic_publish(exchange="", routing_key=NAS, body=protocol.encode({"action": "ping"}),
                         properties=pika.BasicProperties(user_id=ATTACKER, reply_to=VICTIM,
                                                         message_id="forged-reply-to"))
        # 2. a "reply" dropped straight into the victim's queue
        ch.basic_publish(exchange="", routing_key=VICTIM,
                         body=protocol.encode({"action": "clean_zvol", "zvol": zvol}),
                         properties=pika.BasicProperties(user_id=ATTACKER,
                                                         correlation_id="forged-answer"))
    finally:
        conn.close()
    wait_until("the NAS's refusal to answer into a queue", lambda: (
        f"refused a request from broker user '{ATTACKER}': its reply_to '{VICTIM}'"
        in log_of(c, NAS)))
    wait_until("the victim dropping the forged reply", lambda: (
        f"dropped a reply (from broker user '{ATTACKER}') that arrived on queue {VICTIM}"
        in log_of(c, VICTIM)))
    assert "pong" not in log_of(c, VICTIM)
    assert (storagemap(c)[zvol], storagedev(c, VICTIM)[zvol]) == before
    ok(c.rocks("remove", "host", "storagemap", NAS, zvol))
