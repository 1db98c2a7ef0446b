"""The read-only registry reader gives the registry's own answers, without SQLAlchemy."""
from __future__ import annotations

import sqlite3

import pytest

from imgstorage.errors import NotFoundError, ValidationError
from imgstorage.frontend.lookup import RegistryReader
from imgstorage.frontend.registry import Registry


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "frontend.db")
    with Registry(path) as r:
        r.add_host("nas-0-0", "nas")
        r.add_host("compute-0-3", "compute")
        r.add_host("vm-container-0-14", "vm-container")
        r.add_host("storage-1", "compute")
        r.set_attr("img_storage_nas", "yes", host="storage-1")
        r.set_attr("img_sync", "true", appliance="vm-container")
        r.set_attr("img_sync", "maybe", host="compute-0-3")
        r.set_attr("vm_container_zpool", "fast", host="vm-container-0-14")
        r.add_vm("vm-container-0-14", "compute")
    return path


@pytest.fixture
def both(db):
    registry, reader = Registry(db), RegistryReader.open(db)
    assert reader is not None
    yield registry, reader
    registry.close()
    reader.close()


def outcome(fn):
    try:
        value = fn()
    except (NotFoundError, ValidationError) as exc:
        return type(exc).__name__, str(exc)
    return getattr(value, "name", value)


@pytest.mark.parametrize("host", ["nas-0-0", "compute-0-3", "vm-container-0-14", "storage-1",
                                  "compute-0-14-0", "nowhere-9", "bad/name"])
def test_the_reader_answers_as_the_registry_does(both, host):
    registry, reader = both
    for ask in (lambda r: r.get_host(host), lambda r: r.get_nas(host),
                lambda r: r.is_nas(host), lambda r: r.attr(host, "vm_container_zpool"),
                lambda r: r.attr(host, "img_sync"), lambda r: r.attr_bool(host, "img_sync"),
                lambda r: r.get_host(host).is_virtual):
        assert outcome(lambda: ask(reader)) == outcome(lambda: ask(registry))


def test_the_reader_changes_nothing(db, both):
    _registry, reader = both
    with pytest.raises(sqlite3.OperationalError):
        reader.conn.execute("DELETE FROM hosts")


def test_no_reader_before_there_is_a_registry(tmp_path):
    assert RegistryReader.open(str(tmp_path / "none.db")) is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert RegistryReader.open(str(empty)) is None          # a file without the tables
