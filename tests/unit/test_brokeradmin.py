"""brokeradmin: the rabbitmqctl argument lists it builds and how it reads the answers.

The answers are what rabbitmqctl 3.10 printed on this project's test machine
(tests/fixtures/rabbitmqctl/).
"""
from __future__ import annotations

import re

import pytest

from imgstorage.brokeradmin import (BrokerAdmin, BrokerAdminError,
                                    Permissions, escape, node_permissions, vhost_of,
                                    with_credentials)
from imgstorage.config import from_dict

from .replay import ReplayRunner

VHOST = "imgstorage-fixture"
CTL = ["rabbitmqctl", "-q"]
NODE_PERMS = Permissions("^$", r"^(rocks\.vm\-manage|amq\.default)$", r"^nas\-0\-0$")


def admin(runner: ReplayRunner, node=None) -> BrokerAdmin:
    return BrokerAdmin(VHOST, node=node, runner=runner)


def test_node_permissions_are_anchored_and_escaped():
    assert node_permissions("nas-0-0", "rocks.vm-manage") == NODE_PERMS
    perms = node_permissions("nas-0-0", "rocks.vm-manage")
    # Python's re reads these the way PCRE does: exact names only.
    assert re.fullmatch(perms.read, "nas-0-0")
    for other in ("nas-0-00", "nas-0-0x", "nasX0-0", "nas-0-1", "amq.rabbitmq.reply-to"):
        assert not re.search(perms.read, other), other
    for name in ("rocks.vm-manage", "amq.default"):
        assert re.search(perms.write, name)
    for name in ("rocksXvm-manage", "amq.direct", "rocks.vm-manage2", ""):
        assert not re.search(perms.write, name), name
    assert not re.search(perms.configure, "nas-0-0") and re.search(perms.configure, "")
    assert escape("a.b-c_d") == r"a\.b\-c_d"


def test_vhost_and_credentials_in_urls():
    assert vhost_of("amqp://u:p@h:5672/img-storage") == "img-storage"
    assert vhost_of("amqp://u:p@h:5672/%2F") == "/"
    assert vhost_of("amqp://u:p@h:5672") == "/"
    assert vhost_of("amqp://u:p@h/a%2Fb") == "a/b"
    urls = ["amqp://admin:secret@b1:5701/img-storage", "amqps://admin:secret@[::1]:5702/img-storage?heartbeat=5"]
    out = with_credentials(urls, "nas-0-0", "p@ss:/w rd")
    assert out == ("amqp://nas-0-0:p%40ss%3A%2Fw%20rd@b1:5701/img-storage,"
                   "amqps://nas-0-0:p%40ss%3A%2Fw%20rd@[::1]:5702/img-storage?heartbeat=5")
    cfg = from_dict({"name": "nas-0-0", "broker_url": out})
    assert cfg.broker_user == "nas-0-0" and len(cfg.broker_urls) == 2


def test_list_users_and_permissions_from_real_output():
    r = ReplayRunner()
    r.expect(CTL + ["list_users", "--formatter", "json"], "rabbitmqctl/list_users.txt")
    r.expect(CTL + ["list_permissions", "-p", VHOST, "--formatter", "json"],
             "rabbitmqctl/list_permissions.txt")
    r.expect(CTL + ["list_user_permissions", "nas-0-0", "--formatter", "json"],
             "rabbitmqctl/list_user_permissions.txt")
    a = admin(r)
    assert a.list_users() == {"fx-nas-0-0": [], "guest": ["administrator"], "nas-0-0": []}
    assert a.list_permissions() == {"nas-0-0": NODE_PERMS}
    assert a.user_permissions("nas-0-0") == NODE_PERMS
    r.assert_all_used()


def test_permissions_of_a_missing_user_are_none_but_a_dead_node_is_an_error():
    r = ReplayRunner()
    r.expect(CTL + ["list_user_permissions", "nobody-0-0", "--formatter", "json"],
             "rabbitmqctl/list_user_permissions_missing.txt")
    r.expect(CTL + ["list_users", "--formatter", "json"], "rabbitmqctl/list_users.txt")
    assert admin(r).user_permissions("nobody-0-0") is None
    r.assert_all_used()

    r = ReplayRunner()
    down = ["rabbitmqctl", "-n", "rabbit@nowhere", "-q"]
    r.expect(down + ["list_users", "--formatter", "json"], "rabbitmqctl/node_down.txt")
    with pytest.raises(BrokerAdminError) as exc:
        admin(r, node="rabbit@nowhere").list_users()
    text = str(exc.value)
    assert "\n" not in text and "unable to perform an operation on node 'rabbit@nowhere'" in text


def test_queues_and_bindings_from_real_output():
    r = ReplayRunner()
    r.expect(CTL + ["list_queues", "-p", VHOST, "name", "type", "--formatter", "json"],
             "rabbitmqctl/list_queues.txt")
    r.expect(CTL + ["list_bindings", "-p", VHOST, "source_name", "destination_name",
                    "destination_kind", "routing_key", "--formatter", "json"],
             "rabbitmqctl/list_bindings.txt")
    a = admin(r)
    assert a.list_queues() == {"nas-0-0": "quorum", "compute-0-3": "classic"}
    # compute-0-3 is bound only to the default exchange
    assert a.bindings() == {("", "nas-0-0", "nas-0-0"), ("", "compute-0-3", "compute-0-3"),
                            ("rocks.vm-manage", "nas-0-0", "nas-0-0")}


def test_passwords_go_through_stdin_never_argv():
    r = ReplayRunner()
    r.expect(CTL + ["add_user", "nas-0-0"], "rabbitmqctl/add_user_ok.txt")
    r.expect(CTL + ["change_password", "nas-0-0"], "rabbitmqctl/change_password_ok.txt")
    r.expect(CTL + ["authenticate_user", "nas-0-0"], "rabbitmqctl/authenticate_user_ok.txt")
    r.expect(CTL + ["authenticate_user", "nas-0-0"], "rabbitmqctl/authenticate_user_bad.txt")
    r.expect(CTL + ["authenticate_user", "nobody-0-0"],
             "rabbitmqctl/authenticate_user_missing.txt")
    a = admin(r)
    a.add_user("nas-0-0", "S3cret-pw")
    a.change_password("nas-0-0", "N3w-pw")
    assert a.authenticate("nas-0-0", "N3w-pw") is True
    assert a.authenticate("nas-0-0", "wrong") is False
    assert a.authenticate("nobody-0-0", "wrong") is False
    assert [c.input for c in r.calls] == ["S3cret-pw", "N3w-pw", "N3w-pw", "wrong", "wrong"]
    assert not any(secret in arg for c in r.calls for arg in c.argv
                   for secret in ("S3cret-pw", "N3w-pw", "wrong"))
    assert {"S3cret-pw", "N3w-pw", "wrong"} <= set(r.redacted)


def test_refusals_are_one_line_errors():
    r = ReplayRunner()
    r.expect(CTL + ["add_user", "nas-0-0"], "rabbitmqctl/add_user_exists.txt")
    r.expect(CTL + ["list_permissions", "-p", "no-such-vhost", "--formatter", "json"],
             "rabbitmqctl/list_permissions_no_vhost.txt")
    with pytest.raises(BrokerAdminError, match='User "nas-0-0" already exists$'):
        admin(r).add_user("nas-0-0", "x")
    with pytest.raises(BrokerAdminError, match="Virtual host 'no-such-vhost' does not exist"):
        BrokerAdmin("no-such-vhost", runner=r).list_permissions()
    r2 = ReplayRunner().expect(CTL + ["list_users", "--formatter", "json"], not_found=True)
    with pytest.raises(BrokerAdminError, match="rabbitmqctl: command not found"):
        admin(r2).list_users()


def test_delete_user_twice():
    r = ReplayRunner()
    r.expect(CTL + ["delete_user", "nas-0-0"], "rabbitmqctl/delete_user_ok.txt")
    r.expect(CTL + ["delete_user", "nas-0-0"], "rabbitmqctl/delete_user_missing.txt")
    a = admin(r)
    assert a.delete_user("nas-0-0") is True
    assert a.delete_user("nas-0-0") is False


def _expect_state(r: ReplayRunner, users: str, auth: str, perms: str) -> None:
    r.expect(CTL + ["list_users", "--formatter", "json"], stdout=users)
    r.expect(CTL + ["authenticate_user", "nas-0-0"], f"rabbitmqctl/{auth}.txt")
    r.expect(CTL + ["list_user_permissions", "nas-0-0", "--formatter", "json"],
             stdout=perms)


def test_ensure_user_creates_then_changes_nothing():
    r = ReplayRunner()
    r.expect(CTL + ["list_users", "--formatter", "json"], stdout='[\n{"user":"guest","tags":[]}\n]\n')
    r.expect(CTL + ["add_user", "nas-0-0"], "rabbitmqctl/add_user_ok.txt")
    set_perms = CTL + ["set_permissions", "-p", VHOST, "nas-0-0", "^$",
                       r"^(rocks\.vm\-manage|amq\.default)$", r"^nas\-0\-0$"]
    r.expect(set_perms, "rabbitmqctl/set_permissions_ok.txt")
    assert admin(r).ensure_user("nas-0-0", "pw", NODE_PERMS) == ["user"]
    r.assert_all_used()

    r = ReplayRunner()
    _expect_state(r, '[\n{"user":"nas-0-0","tags":[]}\n]\n', "authenticate_user_ok",
                  f'[\n{{"vhost":"{VHOST}","configure":"^$","write":"^(rocks\\\\.vm\\\\-manage|'
                  f'amq\\\\.default)$","read":"^nas\\\\-0\\\\-0$"}}\n]\n')
    assert admin(r).ensure_user("nas-0-0", "pw", NODE_PERMS) == []
    assert [c.argv[2] for c in r.calls] == ["list_users", "authenticate_user",
                                            "list_user_permissions"]

    # with the users and permissions read once for many users: only the password is checked
    r = ReplayRunner()
    r.expect(CTL + ["authenticate_user", "nas-0-0"], "rabbitmqctl/authenticate_user_ok.txt")
    assert admin(r).ensure_user("nas-0-0", "pw", NODE_PERMS, users={"nas-0-0": []},
                                permissions={"nas-0-0": NODE_PERMS}) == []
    assert len(r.calls) == 1


def test_ensure_user_repairs_password_permissions_and_tags():
    r = ReplayRunner()
    _expect_state(r, '[\n{"user":"nas-0-0","tags":["management"]}\n]\n',
                  "authenticate_user_bad",
                  f'[\n{{"vhost":"{VHOST}","configure":".*","write":".*","read":".*"}}\n]\n')
    r.expect(CTL + ["change_password", "nas-0-0"], "rabbitmqctl/change_password_ok.txt")
    r.expect(CTL + ["set_permissions", "-p", VHOST, "nas-0-0", "^$",
                    r"^(rocks\.vm\-manage|amq\.default)$", r"^nas\-0\-0$"],
             "rabbitmqctl/set_permissions_ok.txt")
    r.expect(CTL + ["set_user_tags", "nas-0-0"], "rabbitmqctl/set_user_tags_ok.txt")
    assert admin(r).ensure_user("nas-0-0", "pw", NODE_PERMS) == ["password", "permissions",
                                                                 "tags"]
    r.assert_all_used()


def test_a_named_broker_node_comes_first():
    r = ReplayRunner()
    r.expect(["rabbitmqctl", "-n", "rabbit@frontend", "-q", "delete_user", "nas-0-0"],
             "rabbitmqctl/delete_user_ok.txt")
    assert admin(r, node="rabbit@frontend").delete_user("nas-0-0")
