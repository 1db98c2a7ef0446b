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
    ("default_pool", "../etc"), ("timeout", -1), ("target", "iet"),
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
