"""Who may ask: a container's broker credentials cannot map or delete anything."""
from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from imgstorage.config import from_dict
from imgstorage.errors import RemoteError
from imgstorage.messaging import RpcClient
from imgstorage.simcluster import SimCluster, broker_url


@pytest.fixture(scope="module")
def container_user(vhost):
    name, password = f"vmc-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    subprocess.run(["rabbitmqctl", "-q", "add_user", name, password], check=True,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, name, ".*", ".*", ".*"],
                   check=True, capture_output=True)
    yield name, password
    subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, vhost):
    c = SimCluster(tmp_path_factory.mktemp("auth"), broker_url(vhost),
                   node_settings={"nas-0-0": {"admin_users": ["guest"]}})
    c.make_pools()
    c.start()
    yield c
    c.stop_all()


class AnyNodeReply(RpcClient):
    """A caller that takes the answer of this cluster's daemons, which all run as guest
    (a caller with other credentials takes replies only from a user named after the node)."""

    def accepts(self, correlation_id, user_id) -> bool:
        return correlation_id in self._asked


def client(cluster, user=None, password=None) -> RpcClient:
    cfg = json.loads(cluster.config_path("frontend").read_text())
    if user:
        cfg["broker_url"] = cfg["broker_url"].replace("guest:guest", f"{user}:{password}")
    return AnyNodeReply(from_dict(cfg))


MAP = {"action": "map_zvol", "zvol": "authvol", "zpool": "tank", "remotehost": "compute-0-3",
       "size": 1}


def test_container_credentials_are_refused(guarded, container_user):
    user, password = container_user
    with client(guarded, user, password) as rpc:
        for message in (MAP, {"action": "del_zvol", "zvol": "authvol", "zpool": "tank"},
                        {"action": "set_attrs", "attrs": {"frequency": "1"}}):
            with pytest.raises(RemoteError, match=f"{user} may not ask nas-0-0 for"):
                rpc.request("nas-0-0", message, timeout=10)
        # listings name hosts and targets: an administrator's too
        with pytest.raises(RemoteError, match=f"{user} may not ask nas-0-0 for list_zvols"):
            rpc.request("nas-0-0", {"action": "list_zvols"}, timeout=10)
    assert "tank/authvol" not in guarded.sim("zfs", "list", "--host", "nas-0-0").stdout.decode()


def test_a_forged_user_id_is_stopped_by_the_broker(guarded, container_user):
    """Claiming to be 'guest' over a container's connection: the broker refuses it."""
    import pika
    from imgstorage.messaging import DIRECT_REPLY_TO, connect
    user, password = container_user
    rpc = client(guarded, user, password)
    conn = connect(rpc.config)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.AMQPError):
            ch.basic_publish("rocks.vm-manage", "nas-0-0", json.dumps(MAP).encode(),
                             pika.BasicProperties(user_id="guest", reply_to=DIRECT_REPLY_TO),
                             mandatory=True)
            conn.process_data_events(time_limit=1)
    finally:
        if conn.is_open:
            conn.close()


def test_admin_user_may_map(guarded):
    with client(guarded) as rpc:
        reply = rpc.request("nas-0-0", MAP, timeout=30)
        assert reply["bdev"].startswith("/dev/sd")
        rpc.request("nas-0-0", {"action": "unmap_zvol", "zvol": "authvol"}, timeout=30)
        rpc.request("nas-0-0", {"action": "del_zvol", "zvol": "authvol", "zpool": "tank"},
                    timeout=30)
