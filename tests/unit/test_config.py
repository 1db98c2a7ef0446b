import json

import pytest

from imgstorage import config
from imgstorage.errors import ConfigError


def write(tmp_path, data):
    path = tmp_path / "imgstorage.conf"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_loads_object_and_original_list_form(tmp_path):
    cfg = config.load(write(tmp_path, {"name": "nas-0-0", "network": "ibnet"}))
    assert cfg.name == "nas-0-0" and cfg.network == "ibnet"
    cfg = config.load(write(tmp_path, [{"name": "nas-0-0", "img_sync_workers": "5"}]))
    assert cfg.img_sync_workers == 5


def test_env_var_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSTORAGE_CONF", write(tmp_path, {"name": "compute-0-3"}))
    assert config.load().name == "compute-0-3"


@pytest.mark.parametrize("key,value", [
    ("name", "bad/name"), ("backend", "zfs"), ("transport", "ftp"), ("img_sync_workers", 0),
    ("broker_url", "http://x"), ("chap", "perhaps"), ("admin_users", "root"),
    ("default_pool", "../etc"), ("timeout", -1), ("target", "iet"), ("request_workers", 0),
    ("request_workers", 2000), ("log_format", "xml"), ("log_format", "JSON"), ("log_format", 1),
])
def test_invalid_key_is_named(tmp_path, key, value):
    with pytest.raises(ConfigError) as exc:
        config.load(write(tmp_path, {key: value}))
    assert f"invalid key '{key}'" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_key_is_named(tmp_path):
    cfg = config.load(write(tmp_path, {"backend": "real"}))
    with pytest.raises(ConfigError, match="missing key 'name'"):
        cfg.require("name")
    with pytest.raises(ConfigError, match="missing key 'sim_root'"):
        config.load(write(tmp_path, {"backend": "sim"}))


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.conf"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load(write(tmp_path, "{name:"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        config.load(write(tmp_path, "[1, 2]"))


def test_broker_user_comes_from_url():
    cfg = config.from_dict({"broker_url": "amqp://img-storage:pw@fe:5672/img-storage"})
    assert cfg.broker_user == "img-storage"


def readme_example(**changes):
    """README.rst's example configuration, with some keys changed (None drops a key)."""
    data = {"name": "vm-container-0-14",
            "broker_url": "amqp://img-storage:SECRET@frontend:5672/img-storage",
            "db": "/var/lib/imgstorage/vm.db", "backend": "real", "network": "ibnet",
            "log_file": "/var/log/imgstorage/img-storage-vm.log"}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_simulated_streams_default_to_loopback(tmp_path):
    # every simulated node is a process on one machine: its name does not resolve
    from imgstorage.vm.streams import advertised_address
    cfg = config.load(write(tmp_path, readme_example(backend="sim", sim_root=str(tmp_path))))
    assert (cfg.stream_address, cfg.stream_bind) == ("127.0.0.1", "127.0.0.1")
    assert advertised_address(cfg) == "127.0.0.1"


def test_real_streams_default_to_the_node_name_on_the_storage_network(tmp_path):
    # a stream endpoint listens on the storage address only, never on every interface
    from imgstorage.vm.streams import advertised_address
    cfg = config.load(write(tmp_path, readme_example()))
    assert (cfg.stream_address, cfg.stream_bind) == (None, None)
    assert advertised_address(cfg) == "vm-container-0-14.ibnet"


def test_a_broker_cluster_is_a_comma_separated_list(tmp_path):
    urls = "amqp://u:p@b1:5701/v, amqp://u:p@b2:5702/v,amqps://u:p@b3:5703/v"
    cfg = config.load(write(tmp_path, readme_example(broker_url=urls)))
    assert cfg.broker_urls == ["amqp://u:p@b1:5701/v", "amqp://u:p@b2:5702/v",
                               "amqps://u:p@b3:5703/v"]
    assert cfg.broker_user == "u"
    with pytest.raises(ConfigError, match="broker_url"):
        config.load(write(tmp_path, readme_example(broker_url="amqp://u:p@b1/v,http://b2/")))
    with pytest.raises(ConfigError, match="same user"):
        config.load(write(tmp_path, readme_example(broker_url="amqp://u:p@b1/v,amqp://w:p@b2/v")))


def test_an_amqps_broker_url_is_accepted(tmp_path):
    cfg = config.load(write(tmp_path, readme_example(broker_url="amqps://u:p@frontend:5671/v")))
    assert cfg.broker_urls == ["amqps://u:p@frontend:5671/v"]


def test_explicit_stream_settings_win_on_the_simulated_kernel(tmp_path):
    cfg = config.load(write(tmp_path, readme_example(
        backend="sim", sim_root=str(tmp_path), stream_address="10.1.2.3", stream_bind="0.0.0.0")))
    assert (cfg.stream_address, cfg.stream_bind) == ("10.1.2.3", "0.0.0.0")
    cfg = config.load(write(tmp_path, readme_example(
        backend="sim", sim_root=str(tmp_path), stream_bind="10.1.2.3")))
    assert (cfg.stream_address, cfg.stream_bind) == ("127.0.0.1", "10.1.2.3")


def readme_keys():
    """The first column of README.rst's configuration key table."""
    from pathlib import Path
    lines = (Path(__file__).resolve().parents[2] / "README.rst").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["key"]
                 and i > 0 and set(lines[i - 1].strip()) <= {"=", " "} and lines[i - 1].strip())
    rule = lines[start - 1]
    width = len(rule.strip().split()[0])
    indent = len(rule) - len(rule.lstrip())
    keys, rules = [], 0
    for line in lines[start + 1:]:
        if line.strip() and set(line.strip()) <= {"=", " "}:
            rules += 1
            if rules == 2:
                return keys
            continue
        cell = line[indent:indent + width].strip()
        if cell:
            keys.append(cell)
    raise AssertionError("README.rst's key table does not end")


def test_readme_lists_exactly_the_accepted_keys():
    keys = readme_keys()
    assert len(keys) == len(set(keys)), keys
    assert set(keys) == config.KNOWN_KEYS


@pytest.mark.parametrize("value", [-1, "300", True])
def test_pool_wait_must_be_seconds(tmp_path, value):
    with pytest.raises(ConfigError, match="invalid key 'pool_wait'"):
        config.load(write(tmp_path, {"pool_wait": value}))


def test_pool_wait_defaults_to_five_minutes(tmp_path):
    assert config.load(write(tmp_path, {})).pool_wait == 300
    assert config.load(write(tmp_path, {"pool_wait": 0})).pool_wait == 0
