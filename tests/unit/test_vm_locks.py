"""A container's request waits a moment for a zvol that is held, and no longer.

The merge monitor holds a zvol while it finishes a merge; an operator's unmap
that arrived in that moment used to be refused as busy.
"""
from __future__ import annotations

import threading
import time

import pytest

from imgstorage.config import from_dict
from imgstorage.db import create_schema, make_engine
from imgstorage.drivers import node_drivers
from imgstorage.errors import BusyError, ImgStorageError
from imgstorage.messaging import Envelope
from imgstorage.vm import handlers as vm_handlers
from imgstorage.vm.models import Base as VmBase
from imgstorage.vm.service import VmService


@pytest.fixture
def container(tmp_path):
    cfg = from_dict({"name": "compute-0-3", "backend": "sim", "sim_root": str(tmp_path / "sim"),
                     "db": str(tmp_path / "vm.db")})
    engine = make_engine(cfg.db)
    create_schema(engine, VmBase)
    service = VmService(cfg, engine, node_drivers(cfg))
    return service, vm_handlers.build(service)


def unmap_request(zvol: str, timeout: float) -> Envelope:
    return Envelope(action="unmap_zvol", body={"action": "unmap_zvol", "zvol": zvol},
                    message_id="m1", reply_to="q", user_id="guest",
                    deadline=time.time() + timeout)


class Holder:
    """Holds a zvol the way the merge monitor does, until told to let go."""

    def __init__(self, service: VmService, zvol: str):
        self.holding = threading.Event()
        self.release = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(service, zvol), daemon=True)

    def _run(self, service: VmService, zvol: str) -> None:
        with service.zvol_lock(zvol, raise_busy=False) as got:
            assert got
            self.holding.set()
            self.release.wait(30)
            self.released.set()

    def __enter__(self):
        self.thread.start()
        assert self.holding.wait(10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(10)
        return False


def test_an_unmap_waits_for_a_zvol_the_monitor_holds_briefly(container):
    service, handlers = container
    with Holder(service, "v") as holder:
        result = {}

        def ask():
            result["reply"] = handlers["unmap_zvol"](unmap_request("v", 30))
            result["after_release"] = holder.released.is_set()

        asker = threading.Thread(target=ask)
        asker.start()
        # the request is waiting, not refused
        asker.join(0.5)
        assert asker.is_alive() and "reply" not in result
        holder.release.set()
        asker.join(10)
    assert result["after_release"] is True
    assert result["reply"]["status"] == "success", result


def test_a_zvol_held_past_the_wait_is_refused_as_busy(container):
    service, handlers = container
    with Holder(service, "v"):
        with pytest.raises(BusyError, match="^ZVol v is busy$"):
            handlers["unmap_zvol"](unmap_request("v", 3))
        # the holder still has it: the refused request took nothing
        with service.zvol_lock("v", raise_busy=False) as got:
            assert got is False


def test_without_a_wait_a_held_zvol_is_busy_at_once(container):
    service, _ = container
    with Holder(service, "v"):
        with pytest.raises(BusyError):
            with service.zvol_lock("v"):
                pass


# ------------------------------------------- the lock table stays as it is used
def test_names_merely_sent_leave_the_lock_table_empty(container):
    service, handlers = container
    for n in range(100):        # whole requests, for zvols this container never had
        handlers["unmap_zvol"](unmap_request(f"never-mapped-{n}", 5))
    assert service._locks == {}
    for n in range(10_000):     # and the lock itself, left normally or by an error
        try:
            with service.zvol_lock(f"name-{n}"):
                if n % 2:
                    raise ImgStorageError("refused")
        except ImgStorageError:
            pass
    assert service._locks == {}


def test_an_entry_lives_while_its_zvol_is_held_or_waited_for(container):
    service, _ = container
    with Holder(service, "vol1") as holder:
        assert set(service._locks) == {"vol1"}
        with pytest.raises(BusyError):
            with service.zvol_lock("vol1", wait=0.01):
                pass
        assert set(service._locks) == {"vol1"}      # the holder still has it
        holder.release.set()
        assert holder.released.wait(10)
    holder.thread.join(10)
    assert service._locks == {}


def test_a_lock_taken_again_after_its_entry_went_still_excludes(container):
    service, _ = container
    with service.zvol_lock("vol1"):
        pass
    assert service._locks == {}
    with Holder(service, "vol1") as holder:
        with service.zvol_lock("vol1", raise_busy=False) as got:
            assert got is False
        holder.release.set()
        assert holder.released.wait(10)
    holder.thread.join(10)
    with service.zvol_lock("vol1") as got:
        assert got is True
    assert service._locks == {}
